"""QA records, loaders for FlashRAG / Search-R1 files and hub datasets, and the built-in synthetic world.

    examples = load_qa("../shared/data/qa/nq_test_1k.jsonl")      # FlashRAG jsonl: {"id","question","golden_answers"}
    examples = load_qa("nq_hotpotqa_train.parquet", split="train")  # Search-R1 parquet / jsonl
    examples = load_qa("RUC-NLPIR/FlashRAG_datasets/nq")              # hub name (needs `datasets` and a network)
    world = make_world(seed=0)                                      # fictional encyclopedia + questions
    write_world(world, "synthetic/")                                # corpus.jsonl, train.jsonl, test.jsonl

The synthetic world is the embedded default for demos, tests and the tiny model (tiny.py): invented people,
places and organisations, one short passage per entity in Search-R1 corpus format, and single-hop and two-hop
(bridge) questions whose answers are only in the passages, so an agent has to search to answer them.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Example:
    id: str
    question: str
    golden_answers: list[str]
    source: str = ""

    @property
    def uid(self) -> str:
        """Id unique across datasets (`source/id`): ids such as "test_0" repeat between benchmark files."""
        return f"{self.source}/{self.id}"


class DataError(ValueError):
    """A malformed or unreadable QA file; the message names the file, the line (or row) and the field."""


# ---------------------------------------------------------------- loaders


def load_qa(path_or_name: str | os.PathLike, *, split: str = "test", limit: int | None = None) -> list[Example]:
    """Questions from a FlashRAG jsonl, a Search-R1 jsonl/parquet, a folder holding `{split}.jsonl`, or a hub name.

    FlashRAG rows: {"id", "question", "golden_answers": [str]}. Search-R1 rows add "data_source", "prompt"
    (chat messages whose user turn ends "Question: ...") and "reward_model": {"ground_truth": {"target": [...]}};
    the target is what Search-R1's reward reads, so it wins over "golden_answers" when both are present, and the
    question is taken from "question" or else from the prompt. `source` is data_source, or else the dataset's name
    from the path: the file stem, or the folder's name for a split-named file (FlashRAG's `nq/test.jsonl` -> "nq").
    A name that is not a local path ("RUC-NLPIR/FlashRAG_datasets/nq", "PeterJinGo/nq_hotpotqa_train") is loaded
    with the `datasets` client; `split` only matters for folders and hub names.
    """
    path = Path(path_or_name).expanduser()
    name = str(path_or_name)
    if path.is_dir():
        found = [path / f"{split}{ext}" for ext in (".jsonl", ".parquet", ".json")]
        found = [p for p in found if p.exists()]
        if not found:
            raise FileNotFoundError(f"{path}: no {split}.jsonl, {split}.parquet or {split}.json in this folder")
        path = found[0]
    elif not path.exists():
        if _looks_like_path(name):
            raise FileNotFoundError(f"{name}: no such file")
        return _load_hub(name, split, limit)
    if path.suffix == ".parquet":
        rows = _read_parquet(path, limit)
        where = "row"
    elif path.suffix == ".json":
        rows = _read_json_list(path, limit)
        where = "item"
    else:
        rows = _read_jsonl(path, limit)
        where = "line"
    return [_to_example(row, f"{path}:{where} {n}", dataset_name(path), i) for i, (n, row) in enumerate(rows)]


SPLIT_NAMES = ("train", "dev", "test", "val", "validation")


def dataset_name(path: Path) -> str:
    """nq_test_1k.jsonl -> "nq_test_1k"; FlashRAG's nq/test.jsonl -> "nq" (the stem alone would name every set "test")."""
    return path.parent.resolve().name if path.stem.lower() in SPLIT_NAMES else path.stem


def _looks_like_path(name: str) -> bool:
    return (name.startswith((".", "/", "~")) or "\\" in name
            or name.endswith((".jsonl", ".json", ".parquet")) or name.count("/") > 2)


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[int, object]]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append((n, json.loads(line)))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:line {n}: bad JSON ({e.msg} at column {e.colno})") from None
    return rows


def _read_json_list(path: Path, limit: int | None) -> list[tuple[int, object]]:
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:line {e.lineno}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json QA file must hold a list of rows, got {type(items).__name__}")
    return list(enumerate(items[:limit] if limit is not None else items))


def _read_parquet(path: Path, limit: int | None) -> list[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or use jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({str(e).strip().splitlines()[0]})") from None
    if limit is not None:
        table = table.slice(0, limit)
    return list(enumerate(table.to_pylist()))


def _question_from_prompt(prompt) -> str | None:
    """The question of a Search-R1 prompt: the text after the last "Question:" of the last user message."""
    if isinstance(prompt, list):  # chat messages
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role", "user") == "user"]
        prompt = users[-1] if users else None
    if not isinstance(prompt, str):
        return None
    head, sep, tail = prompt.rpartition("Question:")
    return (tail if sep else prompt).strip() or None


def _to_example(row, where: str, stem: str, index: int) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if question is None and "prompt" in row:
        question = _question_from_prompt(row["prompt"])
        if question is None:
            raise DataError(f"{where}: field 'prompt' holds no user message with a question")
    if question is None:
        raise DataError(f"{where}: missing field 'question' (or a Search-R1 'prompt')")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string, got {question!r:.80}")
    if "reward_model" in row:
        field_name = "reward_model.ground_truth.target"
        try:
            answers = row["reward_model"]["ground_truth"]["target"]
        except (KeyError, TypeError):
            raise DataError(f"{where}: missing field '{field_name}'") from None
        if isinstance(answers, str):  # some Search-R1-style sets store one answer as a plain string
            answers = [answers]
    elif "golden_answers" in row:
        field_name, answers = "golden_answers", row["golden_answers"]
    else:
        raise DataError(f"{where}: missing field 'golden_answers' (or Search-R1 'reward_model.ground_truth.target')")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of strings, got {answers!r:.80}")
    ident = row.get("id")
    if ident is None:
        extra = row.get("extra_info")
        ident = extra.get("index") if isinstance(extra, dict) else None
    ident = str(index) if ident is None else str(ident)
    source = row.get("data_source") or stem
    return Example(id=ident, question=question.strip(), golden_answers=list(answers), source=str(source))


def _load_hub(name: str, split: str, limit: int | None) -> list[Example]:
    """"owner/repo" or "owner/repo/config" through the `datasets` client (online only)."""
    if any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"{name}: not a local file, and hub datasets cannot be loaded offline (HF_HUB_OFFLINE is set); "
                        f"pass a local FlashRAG/Search-R1 .jsonl or .parquet file")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{name}: not a local file, and loading it from the hub needs the `datasets` package "
                        f"(pip install datasets); or pass a local FlashRAG/Search-R1 .jsonl or .parquet file") from None
    parts = name.split("/")
    if len(parts) not in (2, 3):
        raise DataError(f"{name}: not a local file, nor a hub name of the form owner/repo or owner/repo/config")
    repo, config = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        ds = datasets.load_dataset(repo, config, split=split if limit is None else f"{split}[:{limit}]")
    except Exception as e:  # noqa: BLE001 - the client's errors are many and long; one clear line instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{name}: hub dataset could not be loaded (split {split!r}): {first}") from e
    stem = config or parts[1]
    return [_to_example(row, f"{name}:row {i}", stem, i) for i, row in enumerate(ds)]


# ---------------------------------------------------------------- evaluation sets


def find_benchmark_file(data_dir: Path, name: str) -> Path:
    """FlashRAG's layout (DIR/nq/test.jsonl) or flat files (DIR/nq_test.jsonl, DIR/qa/nq_test_1k.jsonl, ...)."""
    tried = []
    for folder in (data_dir, data_dir / "qa"):
        for pattern in (f"{name}/test.jsonl", f"{name}/dev.jsonl", f"{name}_test.jsonl", f"{name}_dev.jsonl",
                        f"{name}_test_*.jsonl", f"{name}_dev_*.jsonl", f"{name}.jsonl"):
            tried.append(str(folder / pattern))
            hits = sorted(folder.glob(pattern))
            if hits:
                return hits[0]
    raise FileNotFoundError(f"no file for benchmark {name!r} under {data_dir} (tried {', '.join(tried[:4])}, ...)")


def load_eval_sets(specs: list[str], data_dir: str | os.PathLike | None = None) -> dict[str, list[Example]]:
    """{name: examples} for each spec: a file, a folder or a hub name; with `data_dir`, also a benchmark name
    looked up there (find_benchmark_file, named as given: "nq").

    A file whose rows carry several data_source values (Search-R1's test.parquet, seven benchmarks) becomes one
    set per source. Otherwise a set is named by its data_source, or by the dataset's name from its path
    (dataset_name). Two different files that would share a name are told apart by their folders
    ("a/nq", "b/nq"); the same file given twice is an error.
    """
    loaded, seen = [], {}  # (name, path or None, examples); resolved path -> spec
    for spec in specs:
        path = Path(spec).expanduser()
        named = None
        if not path.exists() and "/" not in spec and "." not in spec:  # a benchmark name: nq, hotpotqa, ...
            if data_dir is None:
                raise DataError(f"{spec}: no such file; a benchmark name is looked up in --data-dir DIR")
            path, named = find_benchmark_file(Path(data_dir), spec), spec
        key = str(path.resolve()) if path.exists() else spec
        if key in seen:
            raise DataError(f"{spec}: the same eval set is given twice (also as {seen[key]!r})")
        seen[key] = spec
        examples = load_qa(path if path.exists() else spec)
        by_source: dict[str, list[Example]] = {}
        for e in examples:
            by_source.setdefault(e.source, []).append(e)
        if named is not None and len(by_source) <= 1:
            by_source = {named: examples}
        if not by_source:
            raise DataError(f"{spec}: no questions")
        loaded += [(name, path if path.exists() else None, part) for name, part in by_source.items()]
    names = [name for name, _, _ in loaded]
    sets = {}
    for name, path, examples in loaded:
        if names.count(name) > 1:  # different files, one name: prefix folders until the names differ
            if path is None:
                raise DataError(f"two eval sets are both named {name!r}: give them as files in different folders")
            others = [p for n, p, _ in loaded if n == name and p != path]
            depth = 1
            while any(_tail(path, depth) == _tail(p, depth) for p in others if p is not None) and depth < 8:
                depth += 1
            name = f"{_tail(path, depth)}/{name}" if _tail(path, depth) else name
        if name in sets:
            raise DataError(f"two eval sets are both named {name!r} (a mixed file and a separate file of one source?)")
        sets[name] = examples
    return sets


def _tail(path: Path, depth: int) -> str:
    """The last `depth` folder names above a dataset's own name (the folder of nq/test.jsonl is the name itself)."""
    parts = path.resolve().parent.parts
    if path.stem.lower() in SPLIT_NAMES:
        parts = parts[:-1]
    return "/".join(parts[-depth:]) if parts else ""


# ---------------------------------------------------------------- the synthetic world

# Names are built from syllables, so they mean nothing to any model. Each kind of name has its own ending set
# and every name word is used by one kind only, so a search for a place never hits a person's surname.
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "th", "sh", "qu", "vr", "zh"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "x"]
_ENDINGS = {
    "given": ["ak", "ek", "ix", "uk", "az", "oz", "yn", "eth"],
    "family": ["oni", "ari", "eli", "ova", "ani", "uri", "essa", "ondo"],
    "place": ["grad", "holm", "thal", "wick", "stad", "vek", "mund", "oth"],
    "org": ["tech", "corp", "vox", "lux", "dyne", "gen", "tronix", "soft"],
    "orgword": ["ex", "ox", "ux"],
}
# Common English words a generated name must never equal (also the words of the templates below).
_ENGLISH = set("""
a about after all also an and any are as at be been born but by can city company country did do does each
employer for founded founder from had has have he her his how in into is it its more most not of on one or
other out over she so some than that the their them then there these they this to up was were what when where
which who whom whose why will with work works would year you home headquartered headquarters
banana potato tomato domino volcano piano radio studio patio casino mango tango cargo hero zero memo
salami safari origami karate sonata tuna sofa soda coma drama lava mama papa saga tiara vista zebra
linux lethal telex forex lemon melon pilot radar robin nomad token saber tiger timber baker maker sober
modern solar lunar polar
sinus virus bonus minus focus tonic panic manic comic sonic topic logic magic music basic toxic
""".split())


def _make_word(rng: random.Random, kind: str) -> str:
    syllables = 1 if rng.random() < 0.75 else 2  # short names: fewer tokens for a tiny model to copy
    stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    ending = rng.choice(_ENDINGS[kind])
    if stem[-1] in "aeiou" and ending[0] in "aeiou":
        stem += rng.choice("lnrv")  # no vowel clashes: "Tel" + "oni", "Tela" + "r" + "oni"
    elif stem[-1] not in "aeiou" and ending[0] not in "aeiou":
        stem += rng.choice(_VOWELS)
    word = stem + ending
    return word[0].upper() + word[1:]


def _words(rng: random.Random, kind: str, n: int, used: set[str]) -> list[str]:
    """n new capitalised words of one kind, unique across every kind (`used`), never an English word."""
    out = []
    while len(out) < n:
        w = _make_word(rng, kind)
        if w.lower() in used or w.lower() in _ENGLISH or len(w) < 4:
            continue
        used.add(w.lower())
        out.append(w)
    return out


def _names(rng: random.Random, first: list[str], second: list[str], n: int) -> list[str]:
    """n distinct two-word names drawn from first x second."""
    if n > len(first) * len(second):
        raise ValueError(f"cannot make {n} names from {len(first)} x {len(second)} words")
    seen, out = set(), []
    while len(out) < n:
        name = f"{rng.choice(first)} {rng.choice(second)}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


# Question templates: (kind, relation path) -> paraphrases. The plan searches each entity on the path in turn.
# What decides the plan is always one cue: "year" in every question whose answer is a year, "founder of" or
# "birthplace of" in every two-hop question and in no one-hop question.
SINGLE_HOP = {
    ("person", "born_in"): ["Where was {} born?", "In which city was {} born?", "Which city was {} born in?"],
    ("place", "founded"): ["In which year was {} founded?", "Which year was {} founded in?",
                           "In what year was {} founded?"],
    ("org", "founded_by"): ["Who founded {}?", "Which person founded {}?", "By whom was {} founded?"],
}
TWO_HOP = {  # (kind, first relation, second relation)
    ("org", "founded_by", "born_in"): ["Where was the founder of {} born?", "In which city was the founder of {} born?",
                                       "Which city was the founder of {} born in?"],
    ("person", "born_in", "founded"): ["In which year was the birthplace of {} founded?",
                                       "Which year was the birthplace of {} founded in?",
                                       "In what year was the birthplace of {} founded?"],
}


def _draw(rng: random.Random, paths: dict[tuple, tuple[list[str], list[str]]], k: int,
          paraphrases: bool) -> list[tuple]:
    """k distinct (relations, template, entity) picks from {relations: (templates, entities)}, spread evenly over
    the relation paths (a path with fewer picks than its share gives the rest to the others), so that each kind of
    question is about as common as the others, whatever the entity counts. With paraphrases, one fact (relations,
    entity) may be asked in several of its templates; without, each fact at most once, in a template drawn for it."""
    sizes = {rels: len(names) * (len(templates) if paraphrases else 1) for rels, (templates, names) in paths.items()}
    shares = dict.fromkeys(paths, 0)
    while sum(shares.values()) < k and any(shares[r] < sizes[r] for r in paths):  # water-filling, one at a time
        shares[min((r for r in paths if shares[r] < sizes[r]), key=lambda r: shares[r])] += 1
    out = []
    for rels, (templates, names) in paths.items():
        for i in rng.sample(range(sizes[rels]), shares[rels]):  # range: nothing materialised
            template = templates[i // len(names)] if paraphrases else rng.choice(templates)
            out.append((rels, template, names[i % len(names)]))
    return out


def _plan(facts: dict, name: str, relations: tuple[str, ...]) -> list[tuple[str, str]]:
    """Follow relations from an entity: [(entity searched, value read in its passage), ...]."""
    plan = []
    for rel in relations:
        plan.append((name, facts[name][rel]))
        name = facts[name][rel]
    return plan


@dataclass
class World:
    corpus: list[dict]  # Search-R1 corpus rows {"id", "contents": "\"Name\"\nsentences"}
    train: list[Example]
    test: list[Example]
    plans: dict[str, list[tuple[str, str]]]  # example id -> [(ideal query = entity name, its answer), ...]
    facts: dict[str, dict[str, str]] = field(default_factory=dict)  # entity name -> {relation: value, "kind": ...}

    def question_type(self, example: Example) -> str:
        """"year" (the answer is a year, one or two hops), else "one_hop" or "two_hop": the rows of the testbed's
        per-type tables."""
        if example.golden_answers[0].isdigit():
            return "year"
        return "two_hop" if len(self.plans[example.id]) > 1 else "one_hop"


def make_world(seed: int = 0, *, num_people: int = 200, num_places: int = 50, num_orgs: int = 70,
               num_train: int = 800, num_test: int = 200, two_hop_fraction: float = 0.4,
               scale: float = 1.0) -> World:
    """A deterministic fictional encyclopedia: one passage per entity, and single-/two-hop questions on it.

    `scale` multiplies the entity counts (scale=320: 102,400 passages); question counts stay as given.
    Every person was born in a place, every place was founded in a year, every organisation was founded by a
    person: each passage holds one value besides its own name, so reading an answer out of a passage takes no
    choice between two values (a choice that a 1M-parameter model, tiny.py, does not learn in its warm start).
    One-hop questions ask a person's birthplace, a place's founding year or an organisation's founder; two-hop
    questions an organisation's founder's birthplace or a person's birthplace's founding year.
    """
    rng = random.Random(seed)
    num_people, num_places, num_orgs = (max(1, round(n * scale)) for n in (num_people, num_places, num_orgs))
    used: set[str] = set()
    side = max(8, int(2 * num_people ** 0.5))
    people = _names(rng, _words(rng, "given", side, used), _words(rng, "family", side, used), num_people)
    places = _words(rng, "place", num_places, used)
    side = max(8, int(2 * num_orgs ** 0.5))
    orgs = _names(rng, _words(rng, "orgword", side, used), _words(rng, "org", side, used), num_orgs)

    facts: dict[str, dict[str, str]] = {}
    for p in places:
        facts[p] = {"kind": "place", "founded": str(rng.randint(1000, 1800))}
    for p in people:
        facts[p] = {"kind": "person", "born_in": rng.choice(places)}
    for o in orgs:
        facts[o] = {"kind": "org", "founded_by": rng.choice(people)}

    # One passage per entity: short, regular sentences, each restating the name (the title line, as in wiki-18).
    rows = []
    for name, f in facts.items():
        if f["kind"] == "person":
            s = [f"{name} is a person.", f"{name} was born in {f['born_in']}."]
        elif f["kind"] == "place":
            s = [f"{name} is a city.", f"{name} was founded in {f['founded']}."]
        else:
            s = [f"{name} is a company.", f"{name} was founded by {f['founded_by']}."]
        rows.append('"' + name + '"\n' + " ".join(s))
    rng.shuffle(rows)
    corpus = [{"id": str(i), "contents": c} for i, c in enumerate(rows)]

    # Questions: a seeded draw, without replacement, from every (template, entity) pair that applies. The test
    # split comes first, one wording per fact; the training split never asks a test fact, in any wording.
    # (A two-hop path that leads back to the question's own entity would give it away; skipped.)
    single = {(rel,): (templates, [n for n, f in facts.items() if f["kind"] == kind and rel in f])
              for (kind, rel), templates in SINGLE_HOP.items()}
    double = {(r1, r2): (templates, [n for n, f in facts.items() if f["kind"] == kind and r1 in f
                                     and r2 in facts[f[r1]] and facts[f[r1]][r2] != n])
              for (kind, r1, r2), templates in TWO_HOP.items()}
    n_two = round(num_test * two_hop_fraction)
    drawn_test = _draw(rng, single, num_test - n_two, False) + _draw(rng, double, n_two, False)
    if len(drawn_test) < num_test:
        raise ValueError(f"the world has {len(drawn_test)} facts for {num_test} test questions: "
                         "raise the entity counts")
    asked = {(rels, name) for rels, _, name in drawn_test}
    single, double = ({rels: (templates, [n for n in names if (rels, n) not in asked])
                       for rels, (templates, names) in paths.items()} for paths in (single, double))
    n_two = min(sum(len(t) * len(names) for t, names in double.values()), round(num_train * two_hop_fraction))
    num_single = sum(len(t) * len(names) for t, names in single.values())
    if num_train - n_two > num_single:
        raise ValueError(f"the world has {num_single} single-hop training questions, {num_train - n_two} requested: "
                         "raise the entity counts")
    drawn_train = _draw(rng, single, num_train - n_two, True) + _draw(rng, double, n_two, True)
    rng.shuffle(drawn_train)
    rng.shuffle(drawn_test)
    drawn = [(template.format(name), _plan(facts, name, rels)) for rels, template, name in drawn_train + drawn_test]
    train, test, plans = [], [], {}
    for i, (question, plan) in enumerate(drawn):
        split, j = ("train", i) if i < num_train else ("test", i - num_train)
        ex = Example(id=f"{split}_{j}", question=question, golden_answers=[plan[-1][1]], source="synthetic")
        (train if split == "train" else test).append(ex)
        plans[ex.id] = plan
    return World(corpus=corpus, train=train, test=test, plans=plans, facts=facts)


def write_world(world: World, out_dir: str | os.PathLike) -> dict[str, Path]:
    """corpus.jsonl (Search-R1 corpus) and train/test.jsonl (FlashRAG rows plus "data_source" and "plan")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"corpus": out / "corpus.jsonl", "train": out / "train.jsonl", "test": out / "test.jsonl"}
    with open(paths["corpus"], "w", encoding="utf-8", newline="\n") as f:
        for row in world.corpus:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for split in ("train", "test"):
        with open(paths[split], "w", encoding="utf-8", newline="\n") as f:
            for ex in getattr(world, split):
                row = {"id": ex.id, "question": ex.question, "golden_answers": ex.golden_answers,
                       "data_source": ex.source, "plan": [list(step) for step in world.plans[ex.id]]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return paths
