"""Retrieval for the search agent: passages, BM25 over a local corpus, and Search-R1's HTTP API (client and server).

    python search.py serve --corpus ../shared/data/corpus/wiki18_sample.jsonl --port 8000 [--index runs/bm25]
    python search.py query --corpus ../shared/data/corpus/wiki18_sample.jsonl --topk 3 "who wrote the iliad"

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

HTTP: `POST /retrieve` with {"queries": [str], "topk": int, "return_scores": bool} answers
{"result": [[{"document": {"id", "contents"}, "score": float}, ...] per query]}, or [[document, ...]] without
scores; `GET /health` answers {"status": "ok", "passages": N}. The server validates every request and answers 4xx
with {"error": message}; idle or stalled connections are dropped after `timeout` seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.server
import json
import re
import sys
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
    """`python search.py serve|query`: flags are these fields (--max-queries ...)."""
    corpus: str = ""  # Search-R1 corpus jsonl, rows {"id", "contents"}
    index: str | None = None  # directory of a saved BM25 index: loaded if it matches the corpus, else built there
    host: str = "127.0.0.1"  # interface to listen on (0.0.0.0 to serve other machines)
    port: int = 8000  # Search-R1's default
    topk: int = 3  # passages per query when a request gives no topk
    k1: float = 0.9  # BM25 term-frequency saturation
    b: float = 0.4  # BM25 length normalisation
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
    parser.add_argument("command", choices=["serve", "query"])
    parser.add_argument("text", nargs="*", help="query text (query command)")
    for f in dataclasses.fields(ServeConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            required=f.name == "corpus")
    args = vars(parser.parse_intermixed_args(argv))
    command, text = args.pop("command"), args.pop("text")
    if command == "query" and not text:
        parser.error("query needs the query text")
    return command, ServeConfig(**args), text


def main(argv=None) -> None:
    command, cfg, text = parse_config(argv)
    t0 = time.time()
    try:
        retriever = BM25Retriever(cfg.corpus, k1=cfg.k1, b=cfg.b, index_path=cfg.index)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if command == "query":
        print(format_passages(retriever.search([" ".join(text)], cfg.topk)[0]), end="")
        return
    server = make_server(retriever, cfg)
    host, port = server.server_address[:2]
    how = "loaded" if retriever.from_index else "indexed"
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
