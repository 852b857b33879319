"""QA loaders (real files, Search-R1 jsonl/parquet, malformed rows, hub names) and the synthetic world."""
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import data
from data import DataError, Example, load_qa, make_world, write_world

ROOT = Path(__file__).resolve().parent.parent
QA_DIR = ROOT.parent / "shared" / "data" / "qa"
needs_qa = pytest.mark.skipif(not QA_DIR.is_dir(), reason=f"shared data absent: no QA files in {QA_DIR}")

SEARCH_R1_PROMPT = (
    "Answer the given question. ... For example, <answer> Beijing </answer>. Question: {question}\n"
)


def search_r1_row(i: int, question: str, answers: list[str], source: str = "nq") -> dict:
    """A row as Search-R1's data_process/nq_search.py writes it (the original id/question columns dropped)."""
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": SEARCH_R1_PROMPT.format(question=question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
        "extra_info": {"split": "train", "index": i},
    }


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- loaders


@needs_qa
def test_load_real_flashrag_files():
    bamboogle = load_qa(QA_DIR / "bamboogle_test.jsonl")
    assert len(bamboogle) == 125
    first = bamboogle[0]
    assert first == Example(id="test_0", question="Who was president of the United States in the year that "
                            "Citibank was founded?", golden_answers=["james madison"], source="bamboogle_test")
    assert first.uid == "bamboogle_test/test_0"
    for name, n in [("nq_test_1k.jsonl", 1000), ("popqa_test_1k.jsonl", 1000), ("musique_dev.jsonl", 2417)]:
        examples = load_qa(QA_DIR / name)
        assert len(examples) == n
        assert all(e.question and e.golden_answers and all(isinstance(a, str) for a in e.golden_answers)
                   for e in examples)
    # ids repeat across benchmark files ("test_3283" is in NQ and TriviaQA); uids do not
    nq, tqa = load_qa(QA_DIR / "nq_test_1k.jsonl"), load_qa(QA_DIR / "triviaqa_test_1k.jsonl")
    assert {e.id for e in nq} & {e.id for e in tqa}
    assert not {e.uid for e in nq} & {e.uid for e in tqa}
    assert [e.id for e in load_qa(str(QA_DIR / "2wiki_dev.jsonl"), limit=5)] == [f"2wiki_{i}" for i in range(5)]


def test_load_search_r1_jsonl(tmp_path):
    rows = [search_r1_row(0, "who wrote the hobbit", ["J. R. R. Tolkien", "Tolkien"]),
            search_r1_row(1, "Which band sang Creep?", ["Radiohead"], source="hotpotqa")]
    rows[1]["id"] = "hp_7"  # a kept original id wins over extra_info.index
    rows[1]["question"] = "Which band sang Creep?"
    rows[1]["golden_answers"] = ["ignored: the reward reads reward_model"]
    examples = load_qa(write_jsonl(tmp_path / "train.jsonl", rows))
    assert examples == [
        Example(id="0", question="who wrote the hobbit", golden_answers=["J. R. R. Tolkien", "Tolkien"], source="nq"),
        Example(id="hp_7", question="Which band sang Creep?", golden_answers=["Radiohead"], source="hotpotqa"),
    ]
    assert [e.uid for e in examples] == ["nq/0", "hotpotqa/hp_7"]


def test_load_search_r1_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [search_r1_row(i, f"question number {i}", [f"answer {i}", f"alias {i}"]) for i in range(5)]
    path = tmp_path / "nq_hotpotqa_train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = load_qa(path, limit=3)
    assert [(e.id, e.question, e.golden_answers, e.source) for e in examples] == [
        (str(i), f"question number {i}", [f"answer {i}", f"alias {i}"], "nq") for i in range(3)]
    assert len(load_qa(path)) == 5


def test_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=re.escape(f"{path}: reading parquet needs pyarrow")):
        load_qa(path)


@pytest.mark.parametrize("bad_line, message", [
    ('{"id": "2", "question": "q?", "golden_answers": ["a"]', r"line 2: bad JSON"),
    ('{"id": "2", "golden_answers": ["a"]}', r"line 2: missing field 'question'"),
    ('{"id": "2", "question": "", "golden_answers": ["a"]}', r"line 2: field 'question' must be a non-empty"),
    ('{"id": "2", "question": "q?"}', r"line 2: missing field 'golden_answers'"),
    ('{"id": "2", "question": "q?", "golden_answers": "a"}', r"line 2: field 'golden_answers' must be a non-empty"),
    ('{"id": "2", "question": "q?", "golden_answers": ["a", 3]}', r"line 2: field 'golden_answers' must be"),
    ('{"id": "2", "question": "q?", "golden_answers": []}', r"line 2: field 'golden_answers' must be"),
    ('["q?", ["a"]]', r"line 2: a row must be a JSON object"),
    ('{"id": "2", "prompt": [], "reward_model": {}}', r"line 2: field 'prompt' holds no user message"),
    ('{"id": "2", "question": "q?", "reward_model": {"ground_truth": {}}}',
     r"line 2: missing field 'reward_model.ground_truth.target'"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": "1", "question": "q?", "golden_answers": ["a"]}, bad_line])
    with pytest.raises(DataError, match=re.escape(str(path) + ":") + message):
        load_qa(path)


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"id": "1", "question": "q?", "golden_answers": ["a"]}, "", "  ",
                                               '{"id": "2", "question": "q?"}'])
    with pytest.raises(DataError, match=re.escape(f"{path}:line 4: missing field 'golden_answers'")):
        load_qa(path)


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_bytes(b'{"id": "1", "question": "q?", "golden_answers": ["a"]}\n{"question": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:line 2: not UTF-8")):
        load_qa(path)


def test_malformed_parquet_row_names_the_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q?", "golden_answers": ["a"]},
                                         {"question": None, "golden_answers": ["a"]}]), path)
    with pytest.raises(DataError, match=re.escape(f"{path}:row 1: missing field 'question'")):
        load_qa(path)
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=re.escape(f"{path}: not a readable parquet file")):
        load_qa(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_qa(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="no dev.jsonl"):
        load_qa(tmp_path, split="dev")


def test_hub_name_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_qa("RUC-NLPIR/FlashRAG_datasets/nq")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("RUC-NLPIR/FlashRAG_datasets/nq: ")
    assert "offline" in message and "local" in message


def test_hub_name_without_datasets_package(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"PeterJinGo/nq_hotpotqa_train: .*needs the `datasets` package"):
        load_qa("PeterJinGo/nq_hotpotqa_train", split="train")


# ---------------------------------------------------------------- evaluation sets


def qa_rows(prefix: str, n: int, source: str | None = None) -> list[dict]:
    rows = [{"id": f"{prefix}_{i}", "question": f"{prefix} question {i}?", "golden_answers": [f"a{i}"]} for i in range(n)]
    return [{**r, "data_source": source} for r in rows] if source else rows


def test_eval_sets_in_flashrag_folders_keep_their_folder_names(tmp_path):
    for name, n in (("nq", 3), ("triviaqa", 2)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "test.jsonl", qa_rows(name, n))
    sets = data.load_eval_sets([str(tmp_path / "nq" / "test.jsonl"), str(tmp_path / "triviaqa" / "test.jsonl")])
    assert {k: [e.id for e in v] for k, v in sets.items()} == {"nq": ["nq_0", "nq_1", "nq_2"],
                                                               "triviaqa": ["triviaqa_0", "triviaqa_1"]}


def test_a_mixed_file_is_split_by_data_source(tmp_path):
    rows = qa_rows("n", 2, "nq") + qa_rows("h", 3, "hotpotqa") + qa_rows("b", 1, "bamboogle")
    sets = data.load_eval_sets([str(write_jsonl(tmp_path / "test.jsonl", rows))])
    assert {k: len(v) for k, v in sets.items()} == {"nq": 2, "hotpotqa": 3, "bamboogle": 1}


def test_same_name_from_different_folders_is_told_apart_and_a_true_duplicate_is_an_error(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder / "nq").mkdir(parents=True)
        write_jsonl(tmp_path / folder / "nq" / "test.jsonl", qa_rows(folder, 2))
    a, b = str(tmp_path / "a" / "nq" / "test.jsonl"), str(tmp_path / "b" / "nq" / "test.jsonl")
    sets = data.load_eval_sets([a, b])
    assert {k: v[0].id for k, v in sets.items()} == {"a/nq": "a_0", "b/nq": "b_0"}
    with pytest.raises(DataError, match="given twice"):
        data.load_eval_sets([a, str(tmp_path / "a" / "nq" / ".." / "nq" / "test.jsonl")])


def test_benchmark_names_are_looked_up_in_the_data_dir(tmp_path):
    (tmp_path / "nq").mkdir()
    write_jsonl(tmp_path / "nq" / "test.jsonl", qa_rows("nq", 2))
    (tmp_path / "qa").mkdir()
    write_jsonl(tmp_path / "qa" / "bamboogle_test_1k.jsonl", qa_rows("bb", 3))
    assert data.find_benchmark_file(tmp_path, "nq") == tmp_path / "nq" / "test.jsonl"
    sets = data.load_eval_sets(["nq", "bamboogle"], data_dir=tmp_path)
    assert {k: len(v) for k, v in sets.items()} == {"nq": 2, "bamboogle": 3}
    with pytest.raises(FileNotFoundError, match="no file for benchmark 'popqa'"):
        data.load_eval_sets(["popqa"], data_dir=tmp_path)
    with pytest.raises(DataError, match="--data-dir"):
        data.load_eval_sets(["nq"])


# ---------------------------------------------------------------- the synthetic world


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0)


def titles(world) -> list[str]:
    return [row["contents"].split("\n", 1)[0] for row in world.corpus]


def test_world_default_sizes_and_format(world):
    assert 250 <= len(world.corpus) <= 500
    assert len(world.train) == 800 and len(world.test) == 200
    hops = [len(world.plans[e.id]) for e in world.train + world.test]
    assert set(hops) == {1, 2}
    assert abs(hops.count(2) / len(hops) - 0.4) < 0.01
    for row in world.corpus:
        assert set(row) == {"id", "contents"} and isinstance(row["id"], str)
        title, text = row["contents"].split("\n", 1)
        assert re.fullmatch(r'"[A-Z][a-z]+( [A-Z][a-z]+)?"', title)  # title line in double quotes, as wiki-18
        assert text.startswith(title.strip('"') + " ") and text.endswith(".")
    assert len(set(titles(world))) == len(world.corpus)  # one passage per entity, names unique
    assert len({r["id"] for r in world.corpus}) == len(world.corpus)
    ids = [e.id for e in world.train + world.test]
    assert len(set(ids)) == len(ids) and set(ids) == set(world.plans)
    assert all(e.source == "synthetic" for e in world.train + world.test)


def test_world_questions_split_by_question(world):
    train_q, test_q = {e.question for e in world.train}, {e.question for e in world.test}
    assert len(train_q) == len(world.train) and len(test_q) == len(world.test)
    assert not train_q & test_q


def test_every_gold_answer_is_in_its_supporting_passage(world):
    by_title = {row["contents"].split("\n", 1)[0].strip('"'): row["contents"] for row in world.corpus}
    for e in world.train + world.test:
        plan = world.plans[e.id]
        assert e.golden_answers == [plan[-1][1]]
        assert e.golden_answers[0] not in e.question  # the question never gives the answer away
        for query, answer in plan:  # each step: search the entity's name, read the next name/year in its passage
            assert query in by_title, f"{e.id}: plan query {query!r} is not a passage title"
            assert answer in by_title[query].split("\n", 1)[1]
        for (_, a), (q, _) in zip(plan, plan[1:]):  # bridge: the first answer is the second query
            assert a == q
        assert plan[0][0] in e.question


def test_names_avoid_english_and_each_other(world):
    template_words = set()
    for template in [t for templates in [*data.SINGLE_HOP.values(), *data.TWO_HOP.values()] for t in templates]:
        template_words |= set(re.findall(r"[a-z]+", template.lower()))
    for row in world.corpus:
        template_words |= {w for w in re.findall(r"[A-Za-z]+", row["contents"]) if w.islower()}
    name_words = {}
    for name, facts in world.facts.items():
        for w in name.split():
            name_words.setdefault(w.lower(), set()).add(facts["kind"])
        if "country" in facts:
            name_words.setdefault(facts["country"].lower(), set()).add("country")
    assert not set(name_words) & template_words
    assert not set(name_words) & data._ENGLISH
    assert all(len(kinds) == 1 for kinds in name_words.values())  # a word names one kind of thing only


def test_world_files_byte_identical_for_a_seed(tmp_path):
    a = write_world(make_world(seed=3), tmp_path / "a")
    b = write_world(make_world(seed=3), tmp_path / "b")
    c = write_world(make_world(seed=4), tmp_path / "c")
    assert set(a) == {"corpus", "train", "test"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes()
        assert a[key].read_bytes() != c[key].read_bytes()


def test_world_identical_across_processes():
    # a set or a str hash leaking into the generator would change the files between runs
    code = ("import hashlib, data; w = data.make_world(seed=5); "
            "print(hashlib.sha256(repr((w.corpus, w.train, w.test, w.plans)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**os.environ, "PYTHONHASHSEED": seed}, check=True).stdout
               for seed in ("1", "2")}
    assert len(digests) == 1


def test_written_world_loads_back(tmp_path, world):
    paths = write_world(world, tmp_path)
    assert load_qa(tmp_path, split="train") == world.train
    assert load_qa(paths["test"]) == world.test
    rows = [json.loads(line) for line in paths["test"].read_text().splitlines()]
    assert {r["id"]: [tuple(s) for s in r["plan"]] for r in rows} == {e.id: world.plans[e.id] for e in world.test}
    corpus = [json.loads(line) for line in paths["corpus"].read_text().splitlines()]
    assert corpus == world.corpus


def test_world_scales():
    small = make_world(seed=1, scale=0.5, num_train=100, num_test=50)
    big = make_world(seed=1, scale=32, num_train=100, num_test=50)
    assert len(small.corpus) == 160 and len(big.corpus) == 32 * 320
    assert len(set(titles(big))) == len(big.corpus)
    assert len(big.train) == 100 and len(big.test) == 50
    with pytest.raises(ValueError, match="raise the entity counts"):
        make_world(scale=0.05)


def test_bm25_finds_supporting_passages(world):
    search = pytest.importorskip("search")
    if not hasattr(search, "BM25Retriever"):
        pytest.skip("search.BM25Retriever is not written yet")
    retriever = search.BM25Retriever(passages=[search.parse_corpus_row(row) for row in world.corpus])
    single = [e for e in world.train + world.test if len(world.plans[e.id]) == 1]
    results = retriever.search([e.question for e in single], 3)
    hits = sum(f'"{world.plans[e.id][0][0]}"' in [p.title for p in top] for e, top in zip(single, results))
    assert hits / len(single) >= 0.9, f"supporting passage in the top 3 for {hits}/{len(single)} single-hop questions"
    # the ideal query (the entity's name) finds the entity's own passage first
    queries = sorted({q for plan in world.plans.values() for q, _ in plan})
    top1 = [top[0].title for top in retriever.search(queries, 1)]
    assert sum(t == f'"{q}"' for q, t in zip(queries, top1)) / len(queries) >= 0.99


def test_no_test_fact_is_asked_in_training_in_any_wording(world):
    """A fact is an entity and a relation path (here: the first entity and the number of hops, since each kind of
    entity has one path of each length); paraphrases must not carry a test fact into the training split."""
    fact = {e.id: (world.plans[e.id][0][0], len(world.plans[e.id])) for e in world.train + world.test}
    train = {fact[e.id] for e in world.train}
    test = [fact[e.id] for e in world.test]
    assert len(set(test)) == len(test) and not train & set(test)


def test_questions_spread_evenly_over_relation_paths_and_types():
    world = make_world(seed=0, scale=8.0, num_train=6000)  # the default run's world: no path runs out of entities
    path = {e.id: (world.facts[world.plans[e.id][0][0]]["kind"], len(world.plans[e.id])) for e in world.train}
    counts = Counter(path.values())
    facts = Counter(p for p, _ in {(path[e.id], world.plans[e.id][0][0]) for e in world.train})  # per path
    assert len(counts) == len(data.SINGLE_HOP) + len(data.TWO_HOP)
    for hops in (1, 2):  # water-filled shares: even, except paths that ran out (every fact in all 3 wordings)
        full = [n for p, n in counts.items() if p[1] == hops and n == 3 * facts[p]]
        even = [n for p, n in counts.items() if p[1] == hops and n != 3 * facts[p]]
        assert even and max(even) - min(even) <= 1 and all(n < min(even) for n in full), counts
    types = Counter(world.question_type(e) for e in world.test)
    for e in world.test:
        kind = world.question_type(e)
        assert (kind == "year") == e.golden_answers[0].isdigit()
        assert kind == "year" or (kind == "two_hop") == (len(world.plans[e.id]) == 2)
    assert set(types) == {"one_hop", "two_hop", "year"}
