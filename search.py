"""Retrieval for the search agent: passages, BM25 and dense (e5) retrieval, Search-R1's HTTP API (client, server).

    python search.py serve --corpus ../shared/data/corpus/wiki18_sample.jsonl --port 8000 [--index runs/bm25]
    python search.py query --corpus ../shared/data/corpus/wiki18_sample.jsonl --topk 3 "who wrote the iliad"
    python search.py index --dense intfloat/e5-base-v2 --corpus wiki-18.jsonl [--embeddings wiki-18.e5.npy]
    python search.py serve --dense intfloat/e5-base-v2 --corpus wiki-18.jsonl [--embeddings FILE] [--faiss-index FILE]

Passages come from a Search-R1 corpus jsonl, rows {"id", "contents"} with contents = '"Title"\\ntext' (the title
is the first line, quotes kept). The agent sees them as Search-R1's `Doc i(Title: t) text` lines.

BM25, Lucene's form (as in Pyserini, which Search-R1 uses for BM25, and bm25s' default "lucene" method):
    score(q, d) = sum over query tokens t of  idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
A token repeated in the query counts once per occurrence (as Lucene and bm25s do). Lucene dropped the constant
(k1 + 1) factor of Robertson's form; the ranking is the same and the scores equal bm25s' for the same tokens.
  k1 = 0.9, b = 0.4   Pyserini's defaults (Search-R1 serves BM25 through Pyserini); bm25s defaults to 1.5/0.75.
                      Recall@3 on the wiki-18 sample: NQ 58.7 vs 58.2, Bamboogle 13.6 vs 14.4 (one question
                      of 125). Given our tokens, bm25s' scores equal ours (tests); with its own tokenizer, its
                      recall is ours at 0.9/0.4 and one Bamboogle question more at 1.5/0.75 (bench_search.py).
  tokens              lowercase, split on anything that is not a Unicode letter or digit (`[^\\W_]+`), drop the
                      33 English stopwords of Lucene's StandardAnalyzer (the list bm25s uses). No stemming (a
                      dependency, and recall is already at bm25s'). Single letters are kept, as Lucene keeps them
                      (bm25s' default tokenizer drops them).
The document is title + text. Ties are broken by corpus order (the lower row wins), so results are
deterministic; a query with fewer than k matching passages is padded with zero-score passages in corpus order,
so a search always returns min(k, N) passages, as Search-R1's dense retriever does.

The index is a CSR inverted index in numpy (term -> ascending doc ids and term frequencies). The build packs
short ASCII words into integers and sorts them (see build_postings): ~25 CPU-seconds for 1M passages; search
scores a block of queries at once by summing precomputed per-posting weights of the query terms with np.bincount
into a dense (queries x docs) array, then takes the top k per row. `save(dir)` writes postings.npz + meta.json;
`index_path=dir` loads it instead of re-tokenising a large corpus (rebuilt if the corpus or tokenizer changed).

Dense retrieval, Search-R1's e5 recipe (search_r1/search/retrieval_server.py `Encoder`, index_builder.py):
    query q -> "query: " + q,  passage -> "passage: " + its corpus row's `contents` ('"Title"\\ntext', exactly)
    e(x)    = normalize(sum_t m_t h_t(x) / sum_t m_t)   h: the encoder's last hidden states, m: attention mask,
                                                        at most max_length = 256 tokens, padded to the batch's longest
    score   = <e(q), e(p)>  (cosine), top-k by exact inner product
  The prefixes, pooling (mean | cls | pooler), normalisation and max length are settings, e5's by default; the model
  runs in fp16 on a GPU (Search-R1 serves e5 in fp16) and fp32 on a CPU. Deviation: we pool in fp32 (Search-R1
  pools the fp16 states in fp16), a change far below the fp16 rounding of the stored embeddings. So our vectors are
  interchangeable with Search-R1's and FlashRAG's `e5_Flat.index`, which a server can load (--faiss-index).
  Passage embeddings are stored once, fp16 (N x d x 2 bytes: 32 GB for wiki-18 with e5-base), as a .npy that is
  memory-mapped, with a .json beside it: the recipe, a sha1 of every id and text, and the encode's progress (it
  resumes). A file of another corpus or recipe is refused, and so is one made by another model (a few passages
  are re-encoded on load and must agree, cosine >= 0.99). Exact search (exact_topk) multiplies the queries by the
  embeddings in chunks of 65,536 rows (fp16 -> fp32 per chunk, fp32 products: FAISS IndexFlatIP's numbers),
  split over every GPU, else on the CPU straight from the memory map; ties go to the lower corpus row. A query's
  embedding depends on its batch's padding only by float rounding (~1e-7). FAISS (optional, faiss-cpu) searches
  an index file instead (--faiss-index), or builds an approximate one (`index --faiss-build HNSW32`) and reports
  its recall against exact search.

HTTP: `POST /retrieve` with {"queries": [str], "topk": int, "return_scores": bool} answers
{"result": [[{"document": {"id", "contents"}, "score": float}, ...] per query]}, or [[document, ...]] without
scores; `GET /health` answers {"status": "ok", "passages": N}. The server validates every request and answers 4xx
with {"error": message}; idle or stalled connections are dropped after `timeout` seconds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import requests
import urllib3


@dataclass
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0


def parse_corpus_row(row: dict) -> Passage:
    """Search-R1 corpus row {"id", "contents"}: the title is the first line, quotes kept as in the corpus."""
    title, _, text = row["contents"].partition("\n")
    return Passage(id=str(row["id"]), title=title, text=text)


def passage_row(p: Passage) -> dict:
    """The Search-R1 corpus row of a passage (inverse of parse_corpus_row)."""
    return {"id": p.id, "contents": f"{p.title}\n{p.text}"}


def format_passages(passages: list[Passage]) -> str:
    """Search-R1's `_passages2string`: one `Doc i(Title: t) text` line per passage."""
    return "".join(f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, start=1))


def load_corpus(path) -> list[Passage]:
    """Passages of a Search-R1 corpus jsonl; a malformed row raises ValueError naming the file and line."""
    passages = []
    with open(path, "rb") as f:  # bytes, so a bad UTF-8 line can be named too
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("contents"), str) or "id" not in row:
                raise ValueError(f'{path}:{lineno}: expected a row {{"id", "contents": str}}, got {str(row)[:80]!r}')
            passages.append(parse_corpus_row(row))
    if not passages:
        raise ValueError(f"{path}: no passages")
    return passages


# ---------------------------------------------------------------- BM25

# Lucene's English stopwords (StandardAnalyzer/EnglishAnalyzer; bm25s' "en" list).
STOPWORDS = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with".split()
)
_TOKEN_RE = re.compile(r"[^\W_]+")  # runs of Unicode letters/digits: \w minus the underscore
# The same split for ASCII text, ~1.5x faster: lowercase letters and digits kept, everything else a space.
_ASCII_TABLE = str.maketrans({i: chr(i).lower() if chr(i).isalnum() else " " for i in range(128)})


def _words(text: str) -> list[str]:
    """Lowercase letter/digit runs of a text, stopwords included."""
    if text.isascii():
        return text.translate(_ASCII_TABLE).split()
    return _TOKEN_RE.findall(text.lower())


def tokenize(text: str) -> list[str]:
    """BM25 tokens of a text: lowercase letter/digit runs, stopwords dropped. The index build does the same."""
    return [t for t in _words(text) if t not in STOPWORDS]


_TOKENIZER = {"tokenizer": _TOKEN_RE.pattern, "stopwords": sorted(STOPWORDS)}  # saved with an index, checked on load


def _corpus_fingerprint(passages: list[Passage]) -> str:
    # ids and text lengths: cheap for millions of passages, and catches a corpus swapped or edited in length.
    h = hashlib.sha1("\n".join(p.id for p in passages).encode("utf-8", "surrogatepass"))
    lengths = np.fromiter((len(p.title) + len(p.text) for p in passages), dtype=np.int64, count=len(passages))
    h.update(lengths.tobytes())
    return h.hexdigest()


# Index build. Python's per-token work (a str per token, a dict lookup) costs ~1 us a token on a busy machine, a
# minute per million passages, so the build works on bytes with numpy instead. An ASCII letter/digit run of at most
# 9 characters is packed *exactly* into an int key (base 37: a-z = 1..26, 0-9 = 27..36, 0 past the end; 37**9 <
# 2**47), and key << 16 | row sorts a chunk of 65,536 texts into (word, row) postings with one np.sort. Longer
# words and the words of non-ASCII texts go through a dict (_WordKeys), which gives the same key to the same word.
# tests/test_search.py checks the postings against tokenize() token by token.
_PACK_LEN = 9
_ROW_BITS = 16  # rows per chunk: 2**16; 47 + 16 bits fit an int64
_OTHER = 37 ** _PACK_LEN  # keys >= _OTHER number the words that do not pack
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_CODE = {c: i for i, c in enumerate(_ALPHABET, start=1)}
_BYTE_CODES = bytes(_CODE.get(chr(i).lower(), 0) if i < 128 else 0 for i in range(256))  # separators -> 0


def _packed_key(word: str) -> int:
    """The key of a lowercase ASCII letter/digit word of at most 9 characters (see above)."""
    key = 0
    for j in range(_PACK_LEN):
        key = key * 37 + (_CODE[word[j]] if j < len(word) else 0)
    return key


def _unpack_keys(keys: np.ndarray) -> list[str]:
    """Words of packed keys (inverse of _packed_key), vectorised."""
    codes = np.zeros((len(keys), _PACK_LEN), dtype=np.uint8)  # (V, 9)
    rest = keys.copy()
    for j in range(_PACK_LEN - 1, -1, -1):
        rest, codes[:, j] = np.divmod(rest, 37)
    chars = np.frombuffer(b"\0" + _ALPHABET.encode(), dtype=np.uint8)[codes]  # (V, 9) ASCII, NUL-padded
    return chars.view(f"S{_PACK_LEN}").ravel().astype(str).tolist()  # bytes -> str drops the trailing NULs


class _WordKeys(dict):
    """word -> key: the packed key when the word packs, else the next number from _OTHER (computed once a word)."""

    n_other = 0

    def __missing__(self, word: str) -> int:
        if word.isascii() and len(word) <= _PACK_LEN:
            key = _packed_key(word)
        else:
            key, self.n_other = _OTHER + self.n_other, self.n_other + 1
        self[word] = key
        return key


def _ascii_keys(texts: list[str], word_keys: _WordKeys) -> tuple[np.ndarray, np.ndarray]:
    """(key, index into texts) of every token of ASCII texts, in order: the tokens _words() gives."""
    joined = "\n".join(texts)  # the newline is a separator, so no token spans two texts
    code = np.frombuffer(joined.encode("ascii").translate(_BYTE_CODES), dtype=np.uint8)  # (C,)
    inside = code > 0
    start = np.flatnonzero(inside & ~np.r_[False, inside[:-1]])  # (T,) first byte of each token
    end = np.flatnonzero(inside & ~np.r_[inside[1:], False]) + 1  # (T,) one past its last byte
    length = end - start
    padded = np.append(code, np.zeros(_PACK_LEN, dtype=np.uint8))  # reading past the last token is safe
    key, pos = np.zeros(len(start), dtype=np.int64), start.copy()  # (T,)
    for j in range(_PACK_LEN):  # Horner, one character position at a time
        c = padded[pos]  # (T,)
        c[length <= j] = 0  # past this token's end
        key *= 37
        key += c
        pos += 1
    long = np.flatnonzero(length > _PACK_LEN)
    words = [joined[s:e].lower() for s, e in zip(start[long].tolist(), end[long].tolist())]
    key[long] = np.fromiter(map(word_keys.__getitem__, words), dtype=np.int64, count=len(words))
    text_start = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])  # (n,) where each text begins in `joined`
    return key, np.searchsorted(text_start, start, side="right") - 1


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new value begins in a sorted array."""
    first = np.empty(len(sorted_values), dtype=bool)
    first[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=first[1:])
    return np.flatnonzero(first)


def build_postings(texts: list[str], chunk: int = 1 << _ROW_BITS):
    """Tokenise texts (exactly as tokenize()) into a CSR inverted index: (vocab, indptr, doc_ids, tfs, doc_len).

    Postings of term t are doc_ids[indptr[t]:indptr[t+1]] (ascending) with term frequencies tfs[...].
    """
    n_docs, mask = len(texts), (1 << _ROW_BITS) - 1
    assert 1 <= chunk <= mask + 1, "a row within a chunk must fit in _ROW_BITS"
    word_keys = _WordKeys()
    chunks = []  # per chunk of texts: (key, doc, tf) of each (word, doc) pair, sorted by key then doc
    for first in range(0, n_docs, chunk):
        part = texts[first:first + chunk]
        ascii_rows = [i for i, t in enumerate(part) if t.isascii()]
        key, row = _ascii_keys([part[i] for i in ascii_rows], word_keys) if ascii_rows else (
            np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        row = np.asarray(ascii_rows, dtype=np.int64)[row]  # (T,) row within the chunk
        other = [(i, _words(t)) for i, t in enumerate(part) if not t.isascii()]  # the regex, a dict lookup a token
        if other:
            words = list(chain.from_iterable(w for _, w in other))
            key = np.concatenate([key, np.fromiter(map(word_keys.__getitem__, words), np.int64, len(words))])
            row = np.concatenate([row, np.repeat([i for i, _ in other], [len(w) for _, w in other])])
        pair = np.sort((key << _ROW_BITS) | row)  # (T,) word-major, row-minor
        starts = _run_starts(pair)
        tf = np.diff(np.append(starts, len(pair)))
        pair = pair[starts]
        chunks.append((pair >> _ROW_BITS, first + (pair & mask), tf))
    # Term ids: every distinct key, stopwords dropped.
    chunk_keys = [k[_run_starts(k)] for k, _, _ in chunks]  # keys are sorted within a chunk
    keys = np.concatenate(chunk_keys)
    keys = np.sort(keys)[_run_starts(np.sort(keys))] if len(keys) else keys  # (V0,)
    stop = np.isin(keys, [_packed_key(w) for w in STOPWORDS])
    term_of_key = np.where(stop, -1, np.cumsum(~stop) - 1)  # (V0,)
    terms = [term_of_key[np.searchsorted(keys, k)] for k in (c[0] for c in chunks)]
    n_terms = int((~stop).sum())
    df = sum(np.bincount(t[t >= 0], minlength=n_terms) for t in terms) if terms else np.zeros(0, np.int64)
    indptr = np.zeros(n_terms + 1, dtype=np.int64)
    np.cumsum(df, out=indptr[1:])
    # Scatter each chunk's postings after those of earlier chunks: rows ascend within every term.
    doc_ids = np.empty(indptr[-1], dtype=np.int32)
    tfs = np.empty(indptr[-1], dtype=np.int32)
    doc_len = np.zeros(n_docs, dtype=np.int64)
    filled = indptr[:-1].copy()  # (V,) next free slot of each term
    for term, (_, doc, tf) in zip(terms, chunks):
        kept = term >= 0
        term, doc, tf = term[kept], doc[kept], tf[kept]
        run = _run_starts(term)
        count = np.diff(np.append(run, len(term)))
        slot = np.repeat(filled[term[run]] - run, count) + np.arange(len(term))
        doc_ids[slot], tfs[slot] = doc, tf
        filled[term[run]] += count
        doc_len += np.bincount(doc, weights=tf, minlength=n_docs).astype(np.int64)
    kept_keys = keys[~stop]
    names = {k: w for w, k in word_keys.items() if k >= _OTHER}
    packed = kept_keys < _OTHER
    vocab = _unpack_keys(kept_keys[packed]) + [names[k] for k in kept_keys[~packed].tolist()]
    return vocab, indptr, doc_ids, tfs, doc_len.astype(np.int32)


_BLOCK_CELLS = 1 << 22  # queries scored at once x passages: a (B, N) float64 block of at most 32 MB


class BM25Retriever:
    """BM25 over a Search-R1 corpus (see the module docstring for the formula and choices).

    BM25Retriever("corpus.jsonl") or BM25Retriever(passages=[...]); index_path=DIR loads a saved index of the same
    corpus from DIR, or builds one and saves it there.
    """

    def __init__(self, corpus_path=None, *, passages: list[Passage] | None = None, k1: float = 0.9,
                 b: float = 0.4, index_path=None):
        if (corpus_path is None) == (passages is None):
            raise ValueError("BM25Retriever needs exactly one of corpus_path or passages")
        self.passages = load_corpus(corpus_path) if passages is None else list(passages)
        if not self.passages:
            raise ValueError("BM25Retriever: no passages")
        self.k1, self.b = float(k1), float(b)
        self.from_index = False  # True when the postings were read from index_path rather than built
        fingerprint = _corpus_fingerprint(self.passages) if index_path is not None else None
        if index_path is not None and (Path(index_path) / "meta.json").exists():
            meta = json.loads((Path(index_path) / "meta.json").read_text())
            same = {"n_docs": len(self.passages), "fingerprint": fingerprint, **_TOKENIZER}
            if all(meta.get(k) == v for k, v in same.items()):
                arrays = np.load(Path(index_path) / "postings.npz")
                self.vocab_list = meta["vocab"]
                self.indptr, self.doc_ids = arrays["indptr"], arrays["doc_ids"]
                self.tfs, self.doc_len = arrays["tfs"], arrays["doc_len"]
                self.from_index = True
            else:
                print(f"search.py: index {index_path} does not match this corpus or tokenizer; rebuilding it",
                      file=sys.stderr)
        if not self.from_index:
            texts = [f"{p.title}\n{p.text}" for p in self.passages]
            self.vocab_list, self.indptr, self.doc_ids, self.tfs, self.doc_len = build_postings(texts)
            if index_path is not None:
                self.save(index_path, _fingerprint=fingerprint)
        self.vocab = {t: i for i, t in enumerate(self.vocab_list)}
        self.weights = self._weights()

    def _weights(self) -> np.ndarray:
        """Per-posting BM25 term weight idf(t) * tf / (tf + k1 * (1 - b + b * |d| / avgdl)), float32."""
        n_docs = len(self.passages)
        df = np.diff(self.indptr).astype(np.float64)  # (V,)
        idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))  # (V,)
        avgdl = max(float(self.doc_len.mean()), 1e-9)
        norm = self.k1 * (1.0 - self.b + self.b * self.doc_len.astype(np.float64) / avgdl)  # (N,)
        tf = self.tfs.astype(np.float64)  # (P,)
        idf_per_posting = np.repeat(idf, np.diff(self.indptr))  # (P,)
        return (idf_per_posting * tf / (tf + norm[self.doc_ids])).astype(np.float32)

    def save(self, path, *, _fingerprint: str | None = None) -> None:
        """Write the index to directory `path` (postings.npz, meta.json); k1/b are not baked in."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "meta.json").unlink(missing_ok=True)  # written last: a half-written index is never loaded
        np.savez(path / "postings.npz", indptr=self.indptr, doc_ids=self.doc_ids, tfs=self.tfs, doc_len=self.doc_len)
        meta = {"n_docs": len(self.passages), "fingerprint": _fingerprint or _corpus_fingerprint(self.passages),
                **_TOKENIZER, "vocab": self.vocab_list}
        (path / "meta.json").write_text(json.dumps(meta, ensure_ascii=False))

    def scores(self, queries: list[str]) -> np.ndarray:
        """Dense BM25 scores, (len(queries), N) float64. For tests and small corpora; search() is chunked."""
        return np.concatenate([self._score_block(queries[i:i + 1]) for i in range(len(queries))])

    def _score_block(self, queries: list[str]) -> np.ndarray:
        n_docs = len(self.passages)
        term_lists = [[self.vocab[t] for t in tokenize(q) if t in self.vocab] for q in queries]
        terms = np.fromiter(chain.from_iterable(term_lists), dtype=np.int64)  # (T,) all query terms of the block
        row = np.repeat(np.arange(len(queries)), [len(t) for t in term_lists])  # (T,) query of each term
        starts, n_post = self.indptr[terms], self.indptr[terms + 1] - self.indptr[terms]  # (T,)
        # Positions of every posting of every query term, without a Python loop: concatenated ranges.
        offsets = np.repeat(starts - (np.cumsum(n_post) - n_post), n_post) + np.arange(n_post.sum())  # (P,)
        flat = np.repeat(row, n_post) * n_docs + self.doc_ids[offsets]  # (P,) cell in the (B, N) block
        block = np.bincount(flat, weights=self.weights[offsets], minlength=len(queries) * n_docs)
        return block.reshape(len(queries), n_docs)  # (B, N)

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Top-k passages (with scores) per query, best first, ties to the lower corpus row."""
        if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
            raise TypeError("search() takes a list of query strings")
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        n_docs = len(self.passages)
        k = min(topk, n_docs)
        rows_per_block = max(1, _BLOCK_CELLS // n_docs)
        results = []
        for i in range(0, len(queries), rows_per_block):
            block = self._score_block(queries[i:i + rows_per_block])  # (B, N)
            if k < n_docs:
                kth_col = np.argpartition(-block, k - 1, axis=1)[:, k - 1]  # (B,) a doc holding the k-th score
                kth = block[np.arange(len(block)), kth_col]  # (B,)
            else:
                kth = block.min(axis=1)
            for row, cut in zip(block, kth):
                # argpartition picks among equal scores arbitrarily; take all above the cut and the first ties.
                above = np.flatnonzero(row > cut)
                ties = np.flatnonzero(row == cut)[:k - len(above)]
                cand = np.concatenate([above, ties])
                top = cand[np.lexsort((cand, -row[cand]))]
                results.append([dataclasses.replace(self.passages[j], score=float(row[j])) for j in top])
        return results


# ---------------------------------------------------------------- dense retrieval (Search-R1's e5 recipe)

# torch and transformers are imported where they are used: BM25 users (and `search.py serve` over BM25) start in
# 0.6 s instead of 3 s. FAISS is optional (requirements-dense.txt).
E5_QUERY_PREFIX, E5_PASSAGE_PREFIX = "query: ", "passage: "  # Search-R1 Encoder.encode / index_builder, for "e5"
_EMBEDDINGS_FORMAT = 1  # version of the .npy + .json pair written by DenseRetriever
_PROBE_ROWS = 4  # passages re-encoded on load to check that the saved embeddings came from this model
_PROBE_COSINE = 0.99  # fp16 on a GPU vs fp32 on a CPU agree to ~0.9999; another model does not come close
_SAVE_EVERY_ROWS = 1 << 17  # embeddings flushed and progress recorded this often: an interrupted encode resumes
POOLINGS = ("mean", "cls", "pooler")  # Search-R1's pooling methods (e5 and contriever: mean; bge: cls)


def faiss_module():
    """The faiss package, or ImportError with the pip command (FAISS is optional)."""
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS is not installed: pip install faiss-cpu (or faiss-gpu-cu12), see "
                          "requirements-dense.txt; exact search (no --faiss-index) needs only torch") from None
    return faiss


def pool(last_hidden_state, attention_mask, pooling: str = "mean", pooler_output=None):
    """Sentence embeddings (B, d) float32 from token states (B, T, d): Search-R1's `pooling` (mean | cls | pooler)."""
    if pooling == "mean":  # masked mean over the real tokens, padding excluded
        hidden = last_hidden_state.float().masked_fill(~attention_mask[..., None].bool(), 0.0)  # (B, T, d)
        return hidden.sum(dim=1) / attention_mask.sum(dim=1, keepdim=True)  # (B, d)
    if pooling == "cls":
        return last_hidden_state[:, 0].float()  # (B, d)
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("--pooling pooler: this model has no pooler output")
        return pooler_output.float()  # (B, d)
    raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


def tokenize_batch(tokenizer, texts: list[str], prefix: str, max_length: int) -> dict:
    """Search-R1's tokenizer call: prefix + text, padded to the longest, truncated to max_length tokens."""
    return tokenizer([prefix + t for t in texts], max_length=max_length, padding=True, truncation=True,
                     return_tensors="pt")


def embed_batch(model, batch: dict, pooling: str = "mean", normalize: bool = True):
    """Embeddings (B, d) float32 of a tokenized batch: forward, pooling, L2 normalisation (Search-R1: all but DPR)."""
    import torch
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.inference_mode():
        out = model(**batch)
        emb = pool(out.last_hidden_state, batch["attention_mask"], pooling, getattr(out, "pooler_output", None))
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb  # (B, d)


def _topk_lowest_ties(scores, k: int):
    """Top-k columns per row of scores (B, C), as (values, columns) with columns ascending: exact ties at the k-th
    score go to the lowest columns (torch.topk picks among ties arbitrarily)."""
    import torch
    if k < scores.shape[1]:
        values, cols = scores.topk(k + 1, dim=1)  # (B, k + 1): one more, to see whether the k-th score is shared
        crowded = values[:, k] == values[:, k - 1]  # (B,) rows where a column topk left out may tie the k-th
        values, cols = values[:, :k], cols[:, :k]  # (B, k)
    else:
        values, cols = scores.topk(k, dim=1)  # (B, k) every column
        crowded = torch.zeros(len(scores), dtype=torch.bool)
    cut = values[:, -1:]  # (B, 1) the k-th score
    if crowded.any():
        rows = crowded.nonzero().squeeze(1)
        s, c = scores[rows], cut[rows]  # (R, C), (R, 1)
        above, tie = s > c, s == c
        need = k - above.sum(dim=1, keepdim=True)  # (R, 1) ties to take, the lowest columns first
        keep = above | (tie & (tie.cumsum(dim=1) <= need))  # (R, C) exactly k per row
        cols[rows] = keep.nonzero()[:, 1].view(len(rows), k)
    cols = cols.sort(dim=1).values  # (B, k)
    return scores.gather(1, cols), cols


def exact_topk(queries, shards, k: int, chunk_size: int = 1 << 16):
    """Exact inner-product top-k of query embeddings (B, d) over a corpus held as contiguous row blocks `shards`
    (fp16 torch tensors on GPUs, or one fp16 numpy array / memmap on the CPU), chunk_size rows at a time.

    Scores are fp32 dot products of the fp16-stored vectors (as FAISS IndexFlatIP over the same vectors in fp32);
    best first, exact ties to the lower corpus row. Returns (scores (B, k) float32, rows (B, k) int64), numpy.
    """
    import torch
    queries = torch.as_tensor(queries, dtype=torch.float32)  # (B, d)
    cand_scores, cand_rows, first = [], [], 0
    for shard in shards:
        on_torch = torch.is_tensor(shard)
        q = queries.to(shard.device) if on_torch else queries  # (B, d)
        for i in range(0, len(shard), chunk_size):
            block = shard[i:i + chunk_size]
            block = block.float() if on_torch else torch.from_numpy(np.asarray(block, dtype=np.float32))  # (C, d)
            values, cols = _topk_lowest_ties(q @ block.T, min(k, len(block)))  # (B, k')
            cand_scores.append(values)
            cand_rows.append(cols + (first + i))
        first += len(shard)
    # Candidates of all chunks, in row order: a stable sort by score keeps the lower row first among equal scores.
    scores = torch.cat([s.cpu() for s in cand_scores], dim=1)  # (B, chunks * k)
    rows = torch.cat([r.cpu() for r in cand_rows], dim=1)  # (B, chunks * k)
    best = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    return scores.gather(1, best).numpy(), rows.gather(1, best).numpy()


def rescore(queries: np.ndarray, candidates: np.ndarray, embeddings: np.ndarray, k: int):
    """Exact top-k among candidate rows (B, R) of an approximate index (-1: none): fp32 products of the queries
    (B, d) with those rows of the fp16 embeddings, best first, ties to the lower row. (scores, rows), each (B, k),
    rows -1 (score -inf) where fewer than k candidates came back."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for b, (q, cand) in enumerate(zip(queries, candidates)):
        cand = np.unique(cand[cand >= 0])  # (R',) ascending: the stable sort below keeps the lower row first
        s = np.asarray(embeddings[cand], dtype=np.float32) @ q  # (R',)
        best = np.argsort(-s, kind="stable")[:k]
        scores[b, :len(best)], rows[b, :len(best)] = s[best], cand[best]
    return scores, rows


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean share of the exact top-k rows that an approximate search also returned (recall@k against exact)."""
    return float(np.mean([len(set(a.tolist()) & set(e.tolist())) / len(e) for a, e in zip(approx_rows, exact_rows)]))


def build_faiss_index(embeddings: np.ndarray, factory: str, *, train_size: int = 1 << 18, chunk_size: int = 1 << 16,
                      seed: int = 0):
    """A FAISS inner-product index of embeddings (N, d), fp16 or fp32, by factory string ("HNSW32", "IVF4096,PQ96",
    "Flat"), trained on `train_size` random rows when it needs training; added chunk by chunk so that RAM holds
    the index and one fp32 chunk, not an fp32 copy of all embeddings."""
    faiss = faiss_module()
    n, d = embeddings.shape
    index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, min(n, train_size), replace=False))
        index.train(np.asarray(embeddings[rows], dtype=np.float32))
    for i in range(0, n, chunk_size):
        index.add(np.asarray(embeddings[i:i + chunk_size], dtype=np.float32))
    return index


def set_faiss_params(index, params: str) -> None:
    """FAISS search parameters in its ParameterSpace syntax, e.g. "efSearch=128" (HNSW) or "nprobe=64" (IVF)."""
    try:
        faiss_module().ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as e:
        raise ValueError(f"--faiss-params {params!r}: {str(e).strip().splitlines()[0]}") from None


def _contents_fingerprint(passages: list[Passage]) -> str:
    # Every id and every encoded text (unlike BM25's cheap id + length fingerprint): one changed word changes an
    # embedding. ~1 GB/s of sha1, ~15 s for wiki-18, small next to encoding it.
    h = hashlib.sha1(str(len(passages)).encode())
    for i in range(0, len(passages), 10_000):
        h.update("".join(f"{p.id}\0{p.title}\n{p.text}\0" for p in passages[i:i + 10_000]).encode(
            "utf-8", "surrogatepass"))
    return h.hexdigest()


def default_embeddings_path(corpus_path, model_name_or_path) -> Path:
    """Where `search.py index|serve --dense` keep embeddings when --embeddings is not given: beside the corpus."""
    model_tag = re.sub(r"[^\w.-]+", "-", "-".join(Path(str(model_name_or_path).rstrip("/")).parts[-2:]))
    corpus = Path(corpus_path)
    return corpus.with_name(f"{corpus.stem}.{model_tag}.emb.npy")


class DenseRetriever:
    """Dense retrieval with a transformers encoder, Search-R1's e5 recipe (module docstring), same contract as
    BM25Retriever: DenseRetriever(model, "corpus.jsonl") or DenseRetriever(model, passages=[...]), then
    .search(queries, topk).

    embeddings_path  FILE.npy: the passage embeddings (fp16, memory-mapped; FILE.npy.json holds the recipe, the
                     corpus fingerprint and the progress of an interrupted encode): loaded if they match, resumed
                     if partial, refused (ValueError) if another corpus, recipe or model made them. None: in RAM.
    faiss_index      search this FAISS index instead (e.g. Search-R1's e5_Flat.index); the corpus is not encoded.
    rerank           with faiss_index: re-score its top `rerank` candidates exactly from embeddings_path (read
                     through the memory map: RAM holds only the approximate index).
    vectors_from     a flat FAISS index whose vectors become new embeddings (copied to fp16) instead of encoding;
                     a few are checked against this model's encoding of the same passages.
    devices          torch devices; default every visible GPU, else the CPU. The model runs on the first (fp16 on
                     a GPU unless fp16=False); the embeddings are split over all of them.
    """

    def __init__(self, model_name_or_path, corpus_path=None, *, passages: list[Passage] | None = None,
                 embeddings_path=None, faiss_index=None, faiss_params: str | None = None,
                 query_prefix: str = E5_QUERY_PREFIX, passage_prefix: str = E5_PASSAGE_PREFIX, pooling: str = "mean",
                 normalize: bool = True, max_length: int = 256, batch_size: int | None = None, devices=None,
                 fp16: bool | None = None, chunk_size: int = 1 << 16, rerank: int = 0, vectors_from=None,
                 progress: bool = True):
        import torch
        from transformers import AutoModel, AutoTokenizer
        if (corpus_path is None) == (passages is None):
            raise ValueError("DenseRetriever needs exactly one of corpus_path or passages")
        self.passages = load_corpus(corpus_path) if passages is None else list(passages)
        if not self.passages:
            raise ValueError("DenseRetriever: no passages")
        if pooling not in POOLINGS:
            raise ValueError(f"--pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.model_name = str(model_name_or_path)
        self.query_prefix, self.passage_prefix, self.pooling = query_prefix, passage_prefix, pooling
        self.normalize, self.max_length, self.chunk_size, self.progress = normalize, max_length, chunk_size, progress
        if devices is None:
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        self.devices = [torch.device(d) for d in devices]
        # Search-R1 encodes 512 at a time on GPUs; on a CPU, 32 is faster than 256 (the attention scores of a large
        # padded batch no longer fit in cache: 23 vs 11 MiniLM passages/s on 2 cores).
        self.batch_size = batch_size or (512 if self.devices[0].type == "cuda" else 32)
        self.fp16 = self.devices[0].type == "cuda" if fp16 is None else fp16  # Search-R1 serves e5 in fp16
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        model = AutoModel.from_pretrained(self.model_name).eval().float()
        self.model = (model.half() if self.fp16 else model).to(self.devices[0])
        self.dim = int(self.model.config.hidden_size)
        self._lock = threading.Lock()  # one search at a time: a fast tokenizer is not thread-safe, the GPU is one
        self.index = self.embeddings = None
        self.shards = []  # contiguous row blocks of the embeddings, one per device (exact search)
        self.from_embeddings = False  # True when the embeddings were read from embeddings_path, not encoded
        self.rerank, self.vectors_from = rerank, vectors_from
        if faiss_index is not None:
            self.index = self._load_faiss(faiss_index, faiss_params)
            if rerank:
                if embeddings_path is None:
                    raise ValueError("--faiss-rerank re-scores FAISS candidates with saved embeddings: give "
                                     "--embeddings FILE")
                self.embeddings = self._embeddings(embeddings_path)  # (N, d) float16, memory-mapped, not in RAM
        else:
            self.embeddings = self._embeddings(embeddings_path)  # (N, d) float16
            self.shards = self._shards()

    # ---- encoding

    def encode(self, texts: list[str], *, query: bool) -> np.ndarray:
        """Embeddings (len(texts), d) float32 of queries (query prefix) or passage contents (passage prefix)."""
        prefix = self.query_prefix if query else self.passage_prefix
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), self.batch_size):
            batch = tokenize_batch(self.tokenizer, texts[i:i + self.batch_size], prefix, self.max_length)
            out[i:i + self.batch_size] = embed_batch(self.model, batch, self.pooling, self.normalize).cpu().numpy()
        return out

    def _recipe(self) -> dict:
        return {"format": _EMBEDDINGS_FORMAT, "n": len(self.passages), "dim": self.dim,
                "passage_prefix": self.passage_prefix, "pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length}

    def _embeddings(self, path) -> np.ndarray:
        """(N, d) float16: loaded from `path` if it holds this corpus' embeddings by this model and recipe, resumed if
        partial, else encoded (and saved there)."""
        n = len(self.passages)
        # Longest first (as sentence-transformers' encode sorts): batches of similar length pad little, and an
        # out-of-memory batch shows up at once.
        lengths = np.fromiter((len(p.title) + len(p.text) for p in self.passages), np.int64, n)  # (N,)
        order = np.argsort(-lengths, kind="stable")  # (N,)
        want = {**self._recipe(), "corpus_fingerprint": _contents_fingerprint(self.passages)}
        rows_done, meta_path = 0, None
        if path is None:
            emb = np.zeros((n, self.dim), dtype=np.float16)
        else:
            path = Path(path)
            meta_path = path.with_name(path.name + ".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() and path.exists() else None
            if meta is None and path.exists():
                raise ValueError(f"{path} exists without {meta_path.name} (what it holds is unknown); delete it, or "
                                 "give another --embeddings")
            if meta is not None:
                stale = [k for k, v in want.items() if meta.get(k) != v]
                if stale:
                    raise ValueError(f"{path}: embeddings of another corpus or recipe ({', '.join(stale)} differ: "
                                     f"saved by {meta.get('model')!r}); delete it, or give another --embeddings")
                emb = np.load(path, mmap_mode="r+" if not meta["complete"] else "r")
                rows_done = int(meta["rows_done"])
                self._check_probe(emb, order[:min(_PROBE_ROWS, rows_done)], path, meta.get("model"))
                if meta["complete"]:
                    self.from_embeddings = True
                    return emb
                print(f"search.py: resuming {path} at {rows_done:,} of {n:,} passages", file=sys.stderr)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, self.dim))

        def record(done: int) -> None:  # meta written after the rows it counts, atomically
            if meta_path is not None:
                emb.flush()
                tmp = meta_path.with_name(meta_path.name + ".tmp")
                tmp.write_text(json.dumps({**want, "model": self.model_name, "query_prefix": self.query_prefix,
                                           "rows_done": done, "complete": done == n}))
                os.replace(tmp, meta_path)

        if self.vectors_from is None:
            self._encode_rows(emb, order, rows_done, record)
        else:  # the vectors of a flat FAISS index, checked against our own encoding of a few passages
            self._copy_flat_index(self.vectors_from, emb)
            record(n)
            try:
                self._check_probe(emb, order[:_PROBE_ROWS], self.vectors_from, "its builder")
            except ValueError:
                for f in (path, meta_path) if path is not None else ():
                    f.unlink()
                raise
        return np.load(path, mmap_mode="r") if path is not None else emb

    def _copy_flat_index(self, index_path, emb) -> None:
        """Fill emb (N, d) fp16 with the vectors of a flat FAISS index (Search-R1's e5_Flat.index: fp32, 65 GB for
        wiki-18), read through a memory map one chunk at a time, so RAM never holds the whole index."""
        faiss = faiss_module()
        index = faiss.read_index(str(index_path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        if not isinstance(index, faiss.IndexFlat) or index.ntotal != len(emb) or index.d != self.dim:
            raise ValueError(f"--faiss-index {index_path}: expected a flat index of {len(emb):,} vectors of dimension "
                             f"{self.dim}, got {type(index).__name__} with {index.ntotal:,} of dimension {index.d}")
        for i in range(0, len(emb), self.chunk_size):
            n = min(self.chunk_size, len(emb) - i)
            emb[i:i + n] = index.reconstruct_n(i, n).astype(np.float16)  # (n, d)

    def _contents(self, rows) -> list[str]:
        """The corpus rows' `contents`, exactly: what a passage embedding encodes (after the passage prefix)."""
        return [f"{self.passages[j].title}\n{self.passages[j].text}" for j in rows]

    def _encode_rows(self, emb, order: np.ndarray, rows_done: int, record) -> None:
        """Encode passages order[rows_done:] into emb, batch_size at a time, one model replica per device."""
        from concurrent.futures import ThreadPoolExecutor
        from tqdm import tqdm
        replicas = [self.model] + [copy.deepcopy(self.model).to(d) for d in self.devices[1:]]
        starts = list(range(rows_done, len(order), self.batch_size))
        bar = tqdm(total=len(order), initial=rows_done, unit="passage", desc="search.py: encoding passages",
                   disable=not self.progress, file=sys.stderr)
        last_saved = rows_done
        with ThreadPoolExecutor(len(replicas)) as workers:
            for g in range(0, len(starts), len(replicas)):  # one batch per replica, run concurrently
                rows = [order[s:s + self.batch_size] for s in starts[g:g + len(replicas)]]
                # Tokenised here, in one thread (a fast tokenizer is not thread-safe); the forwards run in parallel.
                batches = [tokenize_batch(self.tokenizer, self._contents(r), self.passage_prefix, self.max_length)
                           for r in rows]
                jobs = [workers.submit(embed_batch, m, b, self.pooling, self.normalize)
                        for m, b in zip(replicas, batches)]
                for r, job in zip(rows, jobs):
                    emb[r] = job.result().cpu().numpy().astype(np.float16)  # (b, d)
                    bar.update(len(r))
                done = int(starts[g + len(rows) - 1] + len(rows[-1]))
                if done - last_saved >= _SAVE_EVERY_ROWS:
                    record(done)
                    last_saved = done
        bar.close()
        record(len(order))

    def _check_probe(self, emb, rows: np.ndarray, path, saved_by) -> None:
        """Re-encode a few saved passages: a file made by another model (or other weights) is refused."""
        if not len(rows):
            return
        fresh = self.encode(self._contents(rows), query=False)  # (P, d)
        saved = np.asarray(emb[rows], dtype=np.float32)  # (P, d)
        cosine = (fresh * saved).sum(1) / (np.linalg.norm(fresh, axis=1) * np.linalg.norm(saved, axis=1) + 1e-12)
        if cosine.min() < _PROBE_COSINE:
            raise ValueError(f"{path}: embeddings were made by another model ({saved_by!r}; re-encoding {len(rows)} "
                             f"passages with {self.model_name!r} gives cosine {cosine.min():.3f}); delete it, or give "
                             "another --embeddings")

    def _shards(self) -> list:
        """The embeddings as exact search reads them: the (memory-mapped) array on CPU, or one fp16 block per GPU."""
        import torch
        if self.devices[0].type == "cpu":
            return [self.embeddings]
        bounds = np.linspace(0, len(self.embeddings), len(self.devices) + 1).astype(int)
        shards = []
        for device, a, b in zip(self.devices, bounds[:-1], bounds[1:]):
            need, free = (b - a) * self.dim * 2, torch.cuda.mem_get_info(device)[0]
            if need + 4 * self.chunk_size * self.dim * 4 > free:  # the shard, and room for fp32 chunks and scores
                raise ValueError(f"embeddings need {need / 2**30:.1f} GiB on each of {len(self.devices)} GPU(s), "
                                 f"{device} has {free / 2**30:.1f} GiB free: use more GPUs, or --faiss-index")
            shard = torch.empty((b - a, self.dim), dtype=torch.float16, device=device)
            for i in range(a, b, self.chunk_size):  # through host memory one chunk at a time
                j = min(i + self.chunk_size, b)
                shard[i - a:j - a] = torch.from_numpy(np.ascontiguousarray(self.embeddings[i:j]))
            shards.append(shard)
        return shards

    def _load_faiss(self, path, params: str | None):
        faiss = faiss_module()
        if not Path(path).exists():
            raise ValueError(f"--faiss-index {path}: no such file")
        # Memory-mapped where FAISS can (flat storage: e5_Flat.index is 65 GB): loading takes no RAM, pages come in
        # as searches touch them.
        index = faiss.read_index(str(path), getattr(faiss, "IO_FLAG_MMAP_IFC", 0))
        if index.ntotal != len(self.passages) or index.d != self.dim:
            raise ValueError(f"--faiss-index {path}: {index.ntotal:,} vectors of dimension {index.d}, but the corpus "
                             f"has {len(self.passages):,} passages and {self.model_name} makes {self.dim}-d vectors")
        if params:
            set_faiss_params(index, params)
        if self.devices[0].type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
            options = faiss.GpuMultipleClonerOptions()  # Search-R1's --faiss_gpu: fp16, sharded over all GPUs
            options.useFloat16, options.shard = True, True
            index = faiss.index_cpu_to_all_gpus(index, co=options)
        return index

    # ---- search

    def topk_rows(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (B, k), of query embeddings: exact search, or the FAISS index when one is loaded
        (whose rows are -1 where an approximate index found fewer than k)."""
        if self.index is None:
            return exact_topk(query_embeddings, self.shards, k, self.chunk_size)
        queries = np.ascontiguousarray(query_embeddings, dtype=np.float32)  # (B, d)
        if not self.rerank:
            return self.index.search(queries, k)
        return rescore(queries, self.index.search(queries, max(k, self.rerank))[1], self.embeddings, k)

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        """Top-k passages (with inner-product scores) per query, best first, ties to the lower corpus row."""
        if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
            raise TypeError("search() takes a list of query strings")
        if not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        if not queries:
            return []
        with self._lock:
            scores, rows = self.topk_rows(self.encode(list(queries), query=True), min(topk, len(self.passages)))
        return [[dataclasses.replace(self.passages[j], score=float(s)) for s, j in zip(srow, rrow) if j >= 0]
                for srow, rrow in zip(scores.tolist(), rows.tolist())]


# ---------------------------------------------------------------- HTTP client

class RetrievalError(RuntimeError):
    """A retrieval server could not answer: names the URL and what went wrong."""


class HTTPRetriever:
    """Client of a Search-R1 style `POST /retrieve` server (Search-R1's own e5 server, or `search.py serve`).

    Queries are sent in batches of `batch_size`. Each attempt waits at most `timeout` seconds to connect, for each
    read, and for the whole body; a failed attempt (connection error, timeout, 5xx/408/429, malformed JSON) is
    retried `retries` times after backoff * 2**attempt seconds, then RetrievalError. Other 4xx fail at once.
    """

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int = 256):
        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url, timeout, retries, backoff, batch_size
        self.session = requests.Session()  # keep-alive across the many small searches of a rollout

    def search(self, queries: list[str], topk: int) -> list[list[Passage]]:
        if isinstance(queries, str):
            raise TypeError("search() takes a list of query strings")
        results = []
        for i in range(0, len(queries), self.batch_size):
            results += self._post(list(queries[i:i + self.batch_size]), topk)
        return results

    def _post(self, queries: list[str], topk: int) -> list[list[Passage]]:
        payload = {"queries": queries, "topk": topk, "return_scores": True}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                body, status = self._attempt(payload)
            except requests.exceptions.ConnectionError as e:
                problem = f"connection failed ({_root_cause(e)})"
                continue
            except (requests.exceptions.Timeout, TimeoutError):
                problem = f"no answer within the {self.timeout:g} s timeout"
                continue
            except requests.exceptions.RequestException as e:
                problem = f"request failed ({type(e).__name__}: {e})"
                continue
            if status != 200:
                problem = f"HTTP {status}: {body[:200].decode('utf-8', 'replace')!r}"
                if 400 <= status < 500 and status not in (408, 429):
                    raise RetrievalError(f"retrieval server {self.url}: {problem} (not retried: the request was "
                                         "refused)")
                continue
            try:
                return _parse_response(body, len(queries))
            except ValueError as e:
                problem = f"malformed response: {e}"
        raise RetrievalError(f"retrieval server {self.url}: {problem} (after {self.retries + 1} attempts)")

    def _attempt(self, payload: dict) -> tuple[bytes, int]:
        deadline = time.monotonic() + self.timeout
        with self.session.post(self.url, json=payload, timeout=self.timeout, stream=True) as resp:
            # read1 returns what one socket read brings (urllib3 >= 2.3), so a server that trickles bytes still
            # meets the deadline; plain read() would wait to fill the chunk.
            read = getattr(resp.raw, "read1", None) or resp.raw.read
            chunks = []
            try:
                while piece := read(1 << 16, decode_content=True):  # each read waits <= timeout
                    chunks.append(piece)
                    if time.monotonic() > deadline:
                        raise TimeoutError("body still arriving at the deadline")
            except urllib3.exceptions.ReadTimeoutError as e:
                raise requests.exceptions.Timeout(e) from e
            except urllib3.exceptions.HTTPError as e:  # reset or cut mid-body
                raise requests.exceptions.ConnectionError(e) from e
            return b"".join(chunks), resp.status_code


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {e}"[:200]


def _parse_response(body: bytes, n_queries: int) -> list[list[Passage]]:
    """Search-R1's {"result": [[{"document": doc, "score": s}, ...]]}, or [[doc, ...]] without scores."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"not JSON ({e}): {body[:120]!r}") from None
    result = data.get("result") if isinstance(data, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        raise ValueError(f'expected {{"result": [...]}} with {n_queries} lists, got {str(data)[:120]!r}')
    out = []
    for hits in result:
        if not isinstance(hits, list):
            raise ValueError(f"expected a list of hits per query, got {str(hits)[:120]!r}")
        passages = []
        for hit in hits:
            doc, score = (hit["document"], hit.get("score", 0.0)) if isinstance(hit, dict) and "document" in hit \
                else (hit, 0.0)
            if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
                raise ValueError(f'expected a document {{"id", "contents"}}, got {str(doc)[:120]!r}')
            if not isinstance(score, (int, float)):
                raise ValueError(f"expected a numeric score, got {score!r}")
            passage = parse_corpus_row({"id": doc.get("id", ""), "contents": doc["contents"]})
            passage.score = float(score)
            passages.append(passage)
        out.append(passages)
    return out


# ---------------------------------------------------------------- HTTP server

@dataclass
class ServeConfig:
    """`python search.py serve|query|index`: flags are these fields (--max-queries ...)."""
    corpus: str = ""  # Search-R1 corpus jsonl, rows {"id", "contents"}
    index: str | None = None  # directory of a saved BM25 index: loaded if it matches the corpus, else built there
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 to serve other machines)
    port: int = 8000  # Search-R1's default
    topk: int = 3  # passages per query when a request gives no topk
    k1: float = 0.9  # BM25 term-frequency saturation
    b: float = 0.4  # BM25 length normalisation
    # dense retrieval (--dense MODEL instead of BM25)
    dense: str | None = None  # encoder, hub id or local directory (intfloat/e5-base-v2: the paper's); None = BM25
    embeddings: str | None = None  # passage embeddings .npy (fp16): loaded, resumed or written; None = beside corpus
    faiss_index: str | None = None  # FAISS index to search (e.g. Search-R1's e5_Flat.index); `index`: write it
    #                                 (with --faiss-build), or copy the embeddings from this flat index
    faiss_build: str | None = None  # `index`: FAISS factory of the index to build, e.g. HNSW32 or IVF4096,PQ96
    faiss_params: str | None = None  # FAISS search parameters, e.g. efSearch=128 or nprobe=64
    faiss_rerank: int = 0  # re-score this many FAISS candidates a query exactly from --embeddings (0: off)
    query_prefix: str = E5_QUERY_PREFIX  # e5's "query: "; "" for encoders trained without one (MiniLM)
    passage_prefix: str = E5_PASSAGE_PREFIX  # e5's "passage: "
    pooling: str = "mean"  # mean | cls | pooler (Search-R1: mean for e5)
    normalize: bool = True  # L2-normalise embeddings (Search-R1: all models but DPR)
    max_length: int = 256  # tokens per query or passage (Search-R1: 256)
    batch_size: int | None = None  # texts per encoder forward; None = 512 on a GPU (Search-R1), 32 on the CPU
    max_topk: int = 100  # largest topk a request may ask for
    max_queries: int = 512  # most queries in one request
    max_query_chars: int = 4096  # longest query
    max_body_bytes: int = 1 << 20  # largest request body (Content-Length)
    timeout: float = 10.0  # seconds a connection may stall mid-request before it is dropped


def validate_request(data, cfg: ServeConfig) -> tuple[list[str], int, bool]:
    """(queries, topk, return_scores) of a /retrieve body, or ValueError with the message for the client."""
    if not isinstance(data, dict):
        raise ValueError('body must be a JSON object {"queries": [...], "topk": int, "return_scores": bool}')
    queries = data.get("queries")
    if not isinstance(queries, list) or not queries:
        raise ValueError('"queries" must be a non-empty list of strings')
    if len(queries) > cfg.max_queries:
        raise ValueError(f'"queries" has {len(queries)} items; at most {cfg.max_queries} per request')
    for q in queries:
        if not isinstance(q, str):
            raise ValueError(f'"queries" must hold strings, got {type(q).__name__}')
        if len(q) > cfg.max_query_chars:
            raise ValueError(f"a query has {len(q)} characters; at most {cfg.max_query_chars}")
    topk = data.get("topk", cfg.topk)
    if topk is None:  # Search-R1's server treats null as "the configured default"
        topk = cfg.topk
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= cfg.max_topk:
        raise ValueError(f'"topk" must be an integer in [1, {cfg.max_topk}], got {str(topk)[:40]}')
    return_scores = data.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise ValueError(f'"return_scores" must be true or false, got {str(return_scores)[:40]}')
    return queries, topk, return_scores


class RetrievalHandler(http.server.BaseHTTPRequestHandler):
    """One connection of `search.py serve`; the server carries .retriever and .cfg."""
    protocol_version = "HTTP/1.1"  # keep-alive: a rollout sends many small requests
    server_version = "search-e1"

    def setup(self):
        self.timeout = self.server.cfg.timeout  # socket timeout: a stalled client cannot hold a thread forever
        super().setup()

    def log_request(self, code="-", size="-"):
        if str(code) != "200":  # errors only; a training run sends thousands of good requests
            super().log_request(code, size)

    def _send(self, status: int, obj, close: bool = False) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client went away; nothing to answer
            self.close_connection = True

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, close=True)  # the body may be unread: never reuse the connection

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            self._send(200, {"status": "ok", "passages": len(self.server.retriever.passages)})
        elif self.path.split("?")[0] == "/retrieve":
            self._error(405, "use POST /retrieve")
        else:
            self._error(404, f"no such path {self.path[:100]!r}; use POST /retrieve or GET /health")

    def do_POST(self):
        cfg = self.server.cfg
        if self.path.split("?")[0] != "/retrieve":
            return self._error(404, f"no such path {self.path[:100]!r}; use POST /retrieve or GET /health")
        length = self.headers.get("Content-Length")
        if length is None:
            return self._error(411, "Content-Length required")
        if not length.strip().isdigit():
            return self._error(400, "bad Content-Length")
        length = int(length)
        if length > cfg.max_body_bytes:
            return self._error(413, f"body of {length} bytes; at most {cfg.max_body_bytes}")
        body = self.rfile.read(length)  # a stalled client raises a socket timeout, handled by http.server
        if len(body) < length:
            return self._error(400, "body shorter than Content-Length")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            return self._error(400, "body is not valid JSON")
        try:
            queries, topk, return_scores = validate_request(data, cfg)
        except ValueError as e:
            return self._error(400, str(e))
        try:
            results = self.server.retriever.search(queries, topk)
        except Exception as e:  # noqa: BLE001 - one bad search must not take the server down
            return self._error(500, f"retriever failed: {type(e).__name__}: {e}")
        if return_scores:
            result = [[{"document": passage_row(p), "score": p.score} for p in hits] for hits in results]
        else:
            result = [[passage_row(p) for p in hits] for hits in results]
        self._send(200, {"result": result})

    def do_PUT(self):
        self._error(405, "use POST /retrieve or GET /health")

    do_DELETE = do_PATCH = do_PUT


def make_server(retriever, cfg: ServeConfig) -> http.server.ThreadingHTTPServer:
    """A threaded HTTP server for `retriever` on cfg.host:cfg.port (port 0 picks a free one)."""
    server = http.server.ThreadingHTTPServer((cfg.host, cfg.port), RetrievalHandler)
    server.daemon_threads = True  # stalled connections never block shutdown
    server.retriever, server.cfg = retriever, cfg
    return server


def parse_config(argv=None) -> tuple[str, ServeConfig, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["serve", "query", "index"])
    parser.add_argument("text", nargs="*", help="query text (query command)")
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if str(f.type) == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
        parser.add_argument(flag, type=kind, default=f.default, required=f.name == "corpus")
    args = vars(parser.parse_intermixed_args(argv))
    command, text = args.pop("command"), args.pop("text")
    if command == "query" and not text:
        parser.error("query needs the query text")
    return command, ServeConfig(**args), text


def load_retriever(cfg: ServeConfig, *, progress: bool = True, vectors_from=None):
    """The retriever that `search.py serve|query` builds from its flags: BM25 over cfg.corpus, or DenseRetriever
    with cfg.dense (embeddings at cfg.embeddings, default beside the corpus; or the FAISS index cfg.faiss_index)."""
    if cfg.dense is None:
        dense_only = [f for f in ("embeddings", "faiss_index", "faiss_build", "faiss_params", "faiss_rerank")
                      if getattr(cfg, f)]
        if dense_only:
            raise ValueError(f"--{dense_only[0].replace('_', '-')} is for dense retrieval: give --dense MODEL")
        return BM25Retriever(cfg.corpus, k1=cfg.k1, b=cfg.b, index_path=cfg.index)
    embeddings = None if cfg.faiss_index and not cfg.faiss_rerank else \
        cfg.embeddings or default_embeddings_path(cfg.corpus, cfg.dense)
    return DenseRetriever(cfg.dense, cfg.corpus, embeddings_path=embeddings, faiss_index=cfg.faiss_index,
                          faiss_params=cfg.faiss_params, rerank=cfg.faiss_rerank, query_prefix=cfg.query_prefix,
                          passage_prefix=cfg.passage_prefix, pooling=cfg.pooling, normalize=cfg.normalize,
                          max_length=cfg.max_length, batch_size=cfg.batch_size, vectors_from=vectors_from,
                          progress=progress)


def index_command(cfg: ServeConfig) -> None:
    """`search.py index`: encode (or resume) the corpus embeddings, or with --faiss-index FLAT alone copy them from
    that flat FAISS index (Search-R1's e5_Flat.index); with --faiss-build, build a FAISS index from them into
    --faiss-index and report its recall@topk against exact search."""
    if cfg.dense is None:
        raise ValueError("index precomputes dense embeddings: give --dense MODEL (BM25: serve --index DIR builds "
                         "and saves its index)")
    if cfg.faiss_build and not cfg.faiss_index:
        raise ValueError("index: --faiss-build FACTORY needs --faiss-index FILE, where to write it")
    t0 = time.time()
    vectors_from = cfg.faiss_index if not cfg.faiss_build else None
    retriever = load_retriever(dataclasses.replace(cfg, faiss_index=None), vectors_from=vectors_from)
    emb = retriever.embeddings
    how = "loaded" if retriever.from_embeddings else f"copied from {vectors_from}" if vectors_from else "encoded"
    print(f"search.py: {emb.shape[0]:,} x {emb.shape[1]} fp16 embeddings {how} in {time.time() - t0:.1f} s: "
          f"{emb.filename} ({emb.nbytes / len(emb):.0f} bytes a passage)", file=sys.stderr, flush=True)
    if not cfg.faiss_build:
        return
    faiss = faiss_module()
    t0 = time.time()
    try:
        index = build_faiss_index(emb, cfg.faiss_build)
    except RuntimeError as e:  # FAISS' message for a bad factory string is a C++ trace: keep its first line
        raise ValueError(f"--faiss-build {cfg.faiss_build!r}: {str(e).strip().splitlines()[0]}") from None
    faiss.write_index(index, cfg.faiss_index)
    build_s = time.time() - t0
    if cfg.faiss_params:
        set_faiss_params(index, cfg.faiss_params)
    # Recall against exact search, with passage titles as queries (a real question set: bench/bench_search.py).
    sample = np.random.default_rng(0).choice(len(emb), min(1000, len(emb)), replace=False)
    queries = retriever.encode([retriever.passages[i].title.strip('"') for i in sample], query=True)  # (Q, d)
    k = min(cfg.topk, len(emb))
    recall = recall_at_k(index.search(queries, k)[1], exact_topk(queries, retriever.shards, k)[1])
    size = Path(cfg.faiss_index).stat().st_size
    print(f"search.py: FAISS {cfg.faiss_build} built in {build_s:.1f} s: {cfg.faiss_index} ({size / len(emb):.0f} "
          f"bytes a passage); recall@{k} against exact search {recall:.3f} ({len(sample)} passage titles as queries"
          f"{', ' + cfg.faiss_params if cfg.faiss_params else ''})", file=sys.stderr, flush=True)


def main(argv=None) -> None:
    command, cfg, text = parse_config(argv)
    t0 = time.time()
    try:
        if command == "index":
            return index_command(cfg)
        retriever = load_retriever(cfg)
    except (OSError, ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}")
    if command == "query":
        print(format_passages(retriever.search([" ".join(text)], cfg.topk)[0]), end="")
        return
    server = make_server(retriever, cfg)
    host, port = server.server_address[:2]
    if cfg.dense is None:
        how = "loaded" if retriever.from_index else "indexed"
    else:
        how = f"{cfg.dense}: " + (f"FAISS index {cfg.faiss_index}" if cfg.faiss_index else
                                  "loaded" if retriever.from_embeddings else "encoded")
    print(f"search.py: {how} {len(retriever.passages)} passages in {time.time() - t0:.1f} s; serving "
          f"http://{host}:{port}/retrieve", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
