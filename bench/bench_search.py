"""Retrieval benchmark: our BM25 against bm25s and rank-bm25 on real questions, and the 1M-passage index build.

    python bench/bench_search.py [--data ../shared/data] [--rank-bm25-queries 200] [--synthetic 1000000]

Corpus: ../shared/data/corpus/wiki18_sample.jsonl (10,653 real wiki-18 passages). Queries: Bamboogle (125) and the
NQ subset (1,000). Recall@3 = share of questions with a golden answer, SQuAD-normalised, occurring as a whole-word
sequence in the normalised title + text of one of the top 3 passages. Queries/second counts query tokenisation and
top-3 selection, single thread, best of --repeats runs. rank-bm25 (BM25Okapi, our tokens) scores every document in
Python per query, so it runs on the first --rank-bm25-queries questions of each set only. The last line builds our
index for a synthetic corpus of Zipf-distributed random words (~60 a passage), wall and CPU seconds, then the
time to load it back from disk, and search speed there (queries of 8 passage words, which include the corpus'
most frequent words: postings of millions of entries per query, unlike real questions with stopwords removed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from evaluate import normalize_answer  # noqa: E402
from search import BM25Retriever, Passage, load_corpus, tokenize  # noqa: E402


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

    if args.synthetic:
        synth = synthetic_passages(args.synthetic)
        wall, cpu = time.perf_counter(), time.process_time()
        big = BM25Retriever(passages=synth, k1=args.k1, b=args.b)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
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
        print(f"  load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
