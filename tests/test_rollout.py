"""rollout.py: the turn loop against a scripted model, a real tiny Qwen2, and real Search-R1 trajectories."""
import gc
import glob
import json
import re
import weakref
from types import SimpleNamespace

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rollout
from conftest import SHARED_DATA
from data import Example
from evaluate import extract_answer
from rollout import INVALID_ACTION_NOTE, Episode, RolloutConfig, build_prompt, parse_search, parse_turn
from search import Passage, format_passages

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MULTI = ["</", "sea", "rch", ">!!"]  # never produced by encoding (no merges); only a scripted model emits them


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (so `</search>` spans 9 tokens), plus a few multi-character tokens, ChatML."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars + MULTI)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


TOK = char_tokenizer()
EOS = TOK.eos_token_id


def T(text: str) -> list[int]:
    """Character ids of `text`."""
    return TOK.convert_tokens_to_ids(list(text))


def M(*tokens: str) -> list[int]:
    return TOK.convert_tokens_to_ids(list(tokens))


def encode(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is as fast, and does not stall when other processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class FakeRetriever:
    """Two passages per query (long ones for queries starting with "long"); records every call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def passages(q: str, topk: int) -> list[Passage]:
        text = "word " * 60 if q.startswith("long") else f"{q} is a fact."
        return [Passage(f"{q}-{i}", q if i == 0 else f"{q} {i + 1}", text) for i in range(topk)]

    def search(self, queries, topk):
        self.calls.append((list(queries), topk))
        return [self.passages(q, topk) for q in queries]


class ScriptedModel(torch.nn.Module):
    """Emits fixed turns: scripts[question][k] is turn k's token ids; once a turn's ids run out, `filler` forever.

    It keeps the ids it was fed in cache layer 0 (so row selection prunes them along with a real model's K/V),
    recovers each row's context from the cache and the attention mask, recognises the episode by its prompt and
    the turn by the number of injected blocks (observations, invalid-action notes) in it.
    """

    def __init__(self, scripts: dict[str, list[list[int]]], filler: int):
        super().__init__()
        self.device = torch.device("cpu")
        self.prompts = [tuple(encode(build_prompt(TOK, q))) for q in scripts]
        self.turns = list(scripts.values())
        self.filler = filler
        self.generation_config = SimpleNamespace(eos_token_id=[EOS, TOK.pad_token_id])
        self.extend_batch_sizes = []  # rows fed at the start of each turn

    def forward(self, input_ids, attention_mask, position_ids, cache, use_cache, logits_to_keep):
        assert use_cache and logits_to_keep == 1
        B, n = input_ids.shape
        assert attention_mask.shape == (B, cache.get_seq_length() + n)
        ids = cache.update(input_ids[:, None, :, None].float(), input_ids[:, None, :, None].float(), 0)[0]
        ids = ids[:, 0, :, 0].long()  # (B, S)
        real = attention_mask.bool()
        # Position ids count the real tokens before each real token, whatever the padding and holes.
        for b in range(B):
            if real[b, -1]:
                assert position_ids[b, -1] == real[b].sum() - 1
        if n > 1:  # a turn starts: which episode, which turn, where its sampled tokens begin
            self.extend_batch_sizes.append(B)
            state = []
            for b in range(B):
                ctx = ids[b][real[b]].tolist()
                fed = int(real[b, -n:].sum())
                assert position_ids[b][real[b, -n:]].tolist() == list(range(len(ctx) - fed, len(ctx)))
                which = next(i for i, p in enumerate(self.prompts) if tuple(ctx[:len(p)]) == p)
                response = TOK.decode(ctx[len(self.prompts[which]):])
                turn = response.count("<information>") + response.count("My previous action is invalid")
                state.append([which, turn, len(ctx)])
            new = torch.tensor(state, dtype=torch.float)[:, None, None, :]  # (B, 1, 1, 3)
        else:
            new = torch.zeros(B, 1, 0, 3)
        state = cache.update(new, new, 1)[0][:, 0, -1].long()  # (B, 3) this turn's state of each row
        logits = torch.full((B, 1, len(TOK)), -1e4)
        for b in range(B):
            which, turn, start = state[b].tolist()
            script = self.turns[which][turn] if turn < len(self.turns[which]) else []
            offset = int(real[b].sum()) - start
            logits[b, 0, script[offset] if offset < len(script) else self.filler] = 0.0
        return SimpleNamespace(logits=logits)


def observation(query: str, topk: int, max_obs_tokens: int) -> str:
    docs = format_passages(FakeRetriever.passages(query, topk)).strip()
    obs = f"\n\n<information>{docs}</information>\n\n"
    if len(obs) > max_obs_tokens:  # one token per character
        obs = f"\n\n<information>{docs}"[:max_obs_tokens - len("</information>\n\n")] + "</information>\n\n"
    return obs


def test_observation_format_is_search_r1s():
    got = rollout.format_observation(FakeRetriever.passages("alpha", 2))
    assert got == ("\n\n<information>Doc 1(Title: alpha) alpha is a fact.\n"
                   "Doc 2(Title: alpha 2) alpha is a fact.</information>\n\n")


def test_scripted_episodes():
    """Every path of the turn loop, with a model that emits fixed token sequences; G = 2 copies of each."""
    cfg = RolloutConfig(num_generations=2, max_turns=2, max_new_tokens=40, max_obs_tokens=150,
                        max_context_tokens=1200, topk=2, temperature=1.0, top_p=0.9, seed=3)
    base = len(encode(build_prompt(TOK, "q?")))

    def question(name: str, prompt_len: int | None = None) -> str:
        q = f"{name}?"
        return q if prompt_len is None else name + "x" * (prompt_len - base - len(name) + 1) + "?"

    search_split = T("<think> go </think>\n<search> alpha ") + M("</", "sea", "rch", ">")
    answer_paris = T("<answer> Paris </answer>")
    # name: (question, golds, scripted turns, [(tokens kept of each turn, what is injected after it)], expected)
    S = {
        "split_tag": (question("A"), ["Paris"], [search_split, answer_paris + T("junk")],
                      [(len(search_split), "obs:alpha"), (len(answer_paris), None)],
                      dict(finish_reason="answer", answer="Paris", reward=1.0, queries=["alpha"])),
        "two_searches": (question("B"), ["Lyon"],
                         [T("<search> beta </search") + M(">!!"), T("<search> gamma </search>"),
                          T("<answer> Nice </answer>")],
                         [(None, "obs:beta"), (None, "obs:gamma"), (None, None)],
                         dict(finish_reason="answer", answer="Nice", reward=0.0, queries=["beta", "gamma"])),
        "max_turns": (question("C"), ["x"],
                      [T("<search> c1 </search>"), T("<search> c2 </search>"), T("<search> delta </search>")],
                      [(None, "obs:c1"), (None, "obs:c2"), (None, None)],
                      dict(finish_reason="max_turns", answer=None, reward=0.0, queries=["c1", "c2"])),
        "invalid": (question("D"), ["Rome"],
                    [T("I am sure. </search>"), T("<search>   </search>"), T("<answer> Rome </answer>")],
                    [(None, "note"), (None, "note"), (None, None)],
                    dict(finish_reason="answer", answer="Rome", reward=1.0, queries=[], num_invalid=2)),
        "eos": (question("E"), ["x"], [T("hmm, <search> x") + [EOS]], [(None, None)],
                dict(finish_reason="eos", answer=None, reward=0.0, queries=[])),
        # the generation_config's other EOS id (Qwen: <|endoftext|> next to <|im_end|>)
        "eos_config": (question("G"), ["x"], [T("hmm") + [TOK.pad_token_id]], [(None, None)],
                       dict(finish_reason="eos")),
        "length": (question("F"), ["x"], [T("<search> f1 </search>")],  # then filler: cut at 40 twice
                   [(None, "obs:f1"), (40, "note"), (40, None)],
                   dict(finish_reason="length", answer=None, queries=["f1"], num_invalid=1)),
        "long_obs": (question("H"), ["ok"], [T("<search> long one </search>"), T("<answer> ok </answer>")],
                     [(None, "obs:long one"), (None, None)],
                     dict(finish_reason="answer", answer="ok", reward=1.0, queries=["long one"])),
        # 60 tokens of room: the search fits (21 tokens), its observation does not
        "context_obs": (question("I", 1200 - 60), ["x"], [T("<search> i1 </search>")], [(None, None)],
                        dict(finish_reason="context", is_truncated=True, queries=["i1"])),
        # 20 tokens of room: cut mid-turn
        "context_turn": (question("J", 1200 - 20), ["x"], [T("<think> a long thought that goes on </think>")],
                         [(20, None)], dict(finish_reason="context", is_truncated=True)),
        "prompt_too_long": (question("K", 1300), ["x"], [T("<answer> x </answer>")], [],
                            dict(finish_reason="context", is_truncated=True)),
    }
    model = ScriptedModel({q: turns for q, _, turns, _, _ in S.values()}, filler=T(".")[0])
    retriever = FakeRetriever()
    examples = [Example(name, q, golds, "test") for name, (q, golds, *_) in S.items()]
    episodes = rollout.rollout(model, TOK, examples, retriever, cfg)

    assert len(episodes) == 2 * len(S)
    scenarios = [x for x in S.items() for _ in range(cfg.num_generations)]
    for k, (e, (name, (q, golds, turns, expect, fields))) in enumerate(zip(episodes, scenarios)):
        assert e.example.id == name and e.group_id == k // 2
        assert e.prompt_ids == encode(build_prompt(TOK, q))
        ids, mask = [], []
        for (kept, injected), turn in zip(expect, turns + [[]] * len(expect)):
            sampled = (turn + [model.filler] * 100)[:kept if kept is not None else len(turn)]
            ids += sampled
            mask += [1] * len(sampled)
            if injected is not None:
                inj = encode(INVALID_ACTION_NOTE) if injected == "note" else \
                    encode(observation(injected[4:], cfg.topk, cfg.max_obs_tokens))
                ids += inj
                mask += [0] * len(inj)
        assert e.response_ids == ids, name
        assert e.loss_mask == mask, name
        assert e.text == TOK.decode(e.response_ids)
        assert len(e.prompt_ids) + len(e.response_ids) <= cfg.max_context_tokens or name == "prompt_too_long"
        assert e.num_searches == len([1 for _, inj in expect if inj and inj.startswith("obs")]) or name == "context_obs"
        defaults = dict(is_truncated=False, num_invalid=0, queries=[], answer=None, reward=0.0)
        for key, value in {**defaults, **fields}.items():
            assert getattr(e, key) == value, (name, key)

    by_name = {e.example.id: e for e in episodes}
    assert by_name["split_tag"].text.count("</search>\n\n<information>") == 1  # split tag seen, obs right after
    assert by_name["two_searches"].text.startswith("<search> beta </search>!!\n\n<information>")  # kept as sampled
    assert by_name["eos"].response_ids[-1] == EOS and by_name["eos"].loss_mask[-1] == 1
    long_obs = encode(observation("long one", 2, 150))
    assert len(long_obs) == 150 and TOK.decode(long_obs).endswith(" w</information>\n\n")
    assert by_name["context_obs"].num_searches == 1 and "<information>" not in by_name["context_obs"].text
    assert by_name["prompt_too_long"].response_ids == []
    # One retrieval call per turn, holding the queries of every episode waiting on a search, in episode order.
    twice = lambda qs: [q for q in qs for _ in "12"]  # noqa: E731
    assert retriever.calls == [(twice(["alpha", "beta", "c1", "f1", "long one", "i1"]), 2),
                               (twice(["gamma", "c2"]), 2)]
    # One batch per turn, and episodes that ended left it (turn 1: E, G ended with EOS, I, J hit the context).
    assert model.extend_batch_sizes == [20, 12, 8]


def test_retriever_that_drops_queries_is_an_error_and_training_mode_is_restored():
    class Lossy(FakeRetriever):
        def search(self, queries, topk):
            return super().search(queries, topk)[:-1]

    model = ScriptedModel({"Q?": [T("<search> a </search>")]}, T(".")[0]).train()
    with pytest.raises(RuntimeError, match="answered 0 of 1 queries"):
        rollout.rollout(model, TOK, [Example("0", "Q?", ["b"])], Lossy(), RolloutConfig(num_generations=1))
    assert model.training


def test_eos_ids_from_tokenizer_and_generation_config():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, EOS]))
    assert rollout.eos_token_ids(model, TOK) == {5, EOS}
    assert rollout.eos_token_ids(SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=9)), TOK) == {9, EOS}
    assert rollout.eos_token_ids(SimpleNamespace(), TOK) == {EOS}


def test_scripted_greedy_is_deterministic_and_seed_independent():
    cfg = RolloutConfig(num_generations=1, max_turns=1, max_new_tokens=30, topk=1, greedy=True)
    scripts = {"Q?": [T("<search> a </search>"), T("<answer> b </answer>")]}
    ex = [Example("0", "Q?", ["b"])]
    runs = [rollout.rollout(ScriptedModel(scripts, T(".")[0]), TOK, ex, FakeRetriever(), cfg) for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0].reward == 1.0


def test_sample_tokens_top_p_and_temperature():
    """Frequencies of 40k draws against the distribution computed by hand: nucleus, renormalised, tempered."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(40_000, 1)  # (N, 4)
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: torch.bincount(rollout.sample_tokens(logits, generator=g, **kw), minlength=4) / 40_000  # noqa
    # top_p = 0.75: 0.5 < 0.75 keeps token 1 too (0.8 >= 0.75); tokens 2 and 3 are out
    torch.testing.assert_close(draw(greedy=False, temperature=1.0, top_p=0.75),
                               torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)
    tempered = probs ** 2 / (probs ** 2).sum()  # temperature 0.5 squares the probabilities
    torch.testing.assert_close(draw(greedy=False, temperature=0.5, top_p=1.0), tempered, atol=0.01, rtol=0)
    assert rollout.sample_tokens(logits[:3], greedy=True, temperature=1.0, top_p=1.0, generator=None).tolist() == [0] * 3


# ---------------------------------------------------------------- parsing, and real Search-R1 trajectories


@pytest.mark.parametrize("text, expected", [
    ("<think> x </think>\n<search> capital of France </search>", ("search", "capital of France")),
    ("<search> a </search", ("invalid", None)),  # incomplete
    ("I will search. </search>", ("invalid", None)),  # no opening tag
    ("<search>\n\n</search>", ("invalid", None)),  # empty query
    ("<search> a <search> b </search>", ("search", "b")),  # the last opening tag before the close
    ("<answer> Paris </answer>", ("answer", "Paris")),
    ("<answer></answer>", ("answer", "")),  # an empty answer is still an answer (it scores 0)
    ("<answer> Paris </", ("invalid", None)),
    ("plain text", ("invalid", None)),
])
def test_parse_turn(text, expected):
    assert parse_turn(text) == expected


def test_parse_search_without_tags():
    assert parse_search("") is None and parse_search("</search>") is None


SEARCHR1 = sorted(glob.glob(str(SHARED_DATA / "searchr1_eval" / "*.jsonl")))
# Text the loop injects: an observation right after a turn that ended with </search>, or the invalid-action note.
INJECTED = re.compile(r"(?<=</search>)\n\n<information>.*?</information>\n\n|" + re.escape(INVALID_ACTION_NOTE),
                      re.DOTALL)


@pytest.mark.skipif(not SEARCHR1, reason=f"no Search-R1 evaluation outputs under {SHARED_DATA}/searchr1_eval")
def test_searchr1_trajectories_parse():
    """Split each `final_response` at the injected blocks: a turn followed by an observation parses as a search,
    one followed by the invalid note parses as no action, and the last turn's answer is the file's `pred`."""
    counts = {"rows": 0, "searches": 0, "invalid": 0, "answers": 0}
    for path in SEARCHR1:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            response = row["final_response"]
            turns = INJECTED.split(response)
            blocks = INJECTED.findall(response)
            for turn, block in zip(turns, blocks):
                action, content = parse_turn(turn)
                if block == INVALID_ACTION_NOTE:
                    assert action == "invalid", (path, row["id"], turn[-200:])
                    counts["invalid"] += 1
                else:
                    assert action == "search" and content == turn[turn.rfind("<search>") + 8:-9].strip()
                    counts["searches"] += 1
            action, content = parse_turn(turns[-1])
            assert (content if action == "answer" else "") == row["pred"], (path, row["id"])
            assert extract_answer(turns[-1]) == extract_answer(response)
            counts["answers"] += action == "answer"
            counts["rows"] += 1
    assert counts["rows"] >= 1000 and counts["searches"] > 0.5 * counts["rows"] and counts["invalid"] >= 50, counts
    assert counts["answers"] > 0.8 * counts["rows"], counts


# ---------------------------------------------------------------- a real tiny Qwen2


def tiny_qwen(seed=0, layers=2) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         eos_token_id=EOS, pad_token_id=TOK.pad_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config).eval()


def test_generate_turn_matches_model_generate():
    """Greedy tokens of our loop = `model.generate(do_sample=False)` for left-padded prompts of different lengths,
    also when rows stop at different steps, and when a second turn continues the kept cache."""
    model = tiny_qwen(layers=2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(TOK), (n,), generator=g).tolist() for n in (5, 17, 40, 9)]
    budgets = [12, 12, 3, 7]
    outs, state = rollout.generate_turn(model, TOK, None, prompts, budgets, eos_ids=set(), greedy=True,
                                        stop_strings=("\x00",))
    model.generation_config.eos_token_id = None
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for (new, reason), want, n in zip(outs, ref[:, L:].tolist(), budgets):
        assert new == want[:n] and reason == "length"
    # Turn 2: each row continues with its last token plus some injected ids; holes left in the cache by the rows
    # that stopped early and by the padding must not change anything.
    injected = [T("ab"), T("c" * 9), T("d"), T("efg")]
    pending = [[new[-1]] + inj for (new, _), inj in zip(outs, injected)]
    outs2, _ = rollout.generate_turn(model, TOK, state, pending, [6] * 4, eos_ids=set(), greedy=True,
                                     stop_strings=("\x00",))
    for p, (new, _), inj, (new2, _) in zip(prompts, outs, injected, outs2):
        ref = model.generate(input_ids=torch.tensor([p + new + inj]), max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert new2 == ref[0, len(p) + len(new) + len(inj):].tolist()


class ForcedSearch(Qwen2ForCausalLM):
    """A random Qwen2 whose every turn ends with a forced `<search> query </search>` after `free` sampled tokens
    (a random model never writes tags); EOS is never sampled."""

    free, forced = 6, T("<search> x </search>")

    def forward(self, input_ids=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        self.step = 0 if input_ids.shape[1] > 1 else self.step + 1
        out.logits[:, -1, EOS] = float("-inf")
        if self.step >= self.free:
            out.logits[:, -1, :] = float("-inf")
            out.logits[:, -1, self.forced[min(self.step - self.free, len(self.forced) - 1)]] = 0.0
        return out


def test_tiny_qwen_rollout_with_bm25():
    """A real Qwen2 and BM25 over the synthetic world: searches, observations, masks; seeded; greedy."""
    data = pytest.importorskip("data")
    search = pytest.importorskip("search")
    if not hasattr(data, "make_world") or not hasattr(search, "BM25Retriever"):
        pytest.skip("data.make_world / search.BM25Retriever not available yet")
    world = data.make_world(seed=0)
    name = world.corpus[0]["contents"].split("\n")[0].strip('"')
    retriever = search.BM25Retriever(passages=[search.parse_corpus_row(r) for r in world.corpus])
    torch.manual_seed(0)
    model = ForcedSearch(tiny_qwen().config).eval()
    model.forced = T(f"<search> {name} </search>")
    cfg = RolloutConfig(num_generations=3, max_turns=2, max_new_tokens=64, max_obs_tokens=300,
                        max_context_tokens=1600, topk=2, temperature=1.0, top_p=0.95, seed=1)
    examples = world.test[:2]
    runs = [rollout.rollout(model, TOK, examples, retriever, cfg) for _ in range(2)]
    other = rollout.rollout(model, TOK, examples, retriever, RolloutConfig(**{**vars(cfg), "seed": 2}))
    assert runs[0] == runs[1]  # same seed, identical episodes
    assert [e.response_ids for e in other] != [e.response_ids for e in runs[0]]
    for e in runs[0]:
        assert len(e.response_ids) == len(e.loss_mask) and e.text == TOK.decode(e.response_ids)
        assert e.finish_reason == "max_turns" and e.num_searches == 2 and e.queries == [name, name]
        assert e.text.count(f"<information>Doc 1(Title: \"{name}\")") == 2  # BM25 finds the entity's passage
        # sampled = 3 turns of free + forced tokens, the rest are the two observations
        assert sum(e.loss_mask) == 3 * (model.free + len(model.forced))
        assert TOK.decode([t for t, m in zip(e.response_ids, e.loss_mask) if m == 0]).count("</information>") == 2
        assert len(e.prompt_ids) + len(e.response_ids) <= cfg.max_context_tokens

    greedy = RolloutConfig(**{**vars(cfg), "greedy": True, "num_generations": 1})
    a, b = (rollout.rollout(model, TOK, examples, retriever, greedy) for _ in range(2))
    assert a == b
    # The kept KV cache (with its holes) gives what a plain forward over prompt + response gives: each greedy
    # token is the argmax of the full-sequence logits at its position.
    for e in a:
        ids = torch.tensor([e.prompt_ids + e.response_ids])
        with torch.no_grad():
            logits = Qwen2ForCausalLM.forward(model, input_ids=ids).logits[0]  # (T, V), unforced
        P, j = len(e.prompt_ids), 0
        while j < len(e.response_ids):
            if e.loss_mask[j] == 0:
                j += 1
                continue
            for t in range(j, j + model.free):  # a turn: `free` sampled tokens, then the forced ones
                row = logits[P + t - 1].clone()
                row[EOS] = float("-inf")
                assert row[e.response_ids[t]] >= row.max() - 1e-4
            j += model.free + len(model.forced)


def test_episode_fields_are_the_shared_contract():
    fields = set(Episode.__dataclass_fields__)
    assert {"example", "group_id", "prompt_ids", "response_ids", "loss_mask", "text", "answer", "reward",
            "num_searches", "queries", "num_invalid", "is_truncated", "finish_reason"} <= fields


class Recording(ForcedSearch):
    """ForcedSearch that records every forward's batch size and KV cache (weakly, so it can be freed)."""

    def forward(self, input_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.calls.append((input_ids.shape[0], weakref.ref(cache)))
        return super().forward(input_ids=input_ids, **kwargs)


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("bound", [1, 3, 4, 7])
def test_rollout_batch_size_bounds_the_batch_frees_each_cache_and_changes_no_greedy_episode(bound):
    world = pytest.importorskip("data").make_world(seed=0)
    search = pytest.importorskip("search")
    retriever = search.BM25Retriever(passages=[search.parse_corpus_row(r) for r in world.corpus])
    torch.manual_seed(0)
    model = Recording(tiny_qwen().config).eval()
    examples = world.test[:5]
    cfg = RolloutConfig(num_generations=2, max_turns=2, max_new_tokens=20, max_obs_tokens=120,
                        max_context_tokens=1600, topk=1, greedy=True)  # (character tokens: a long prompt)
    model.calls = []
    whole = rollout.rollout(model, TOK, examples, retriever, cfg)
    assert max(b for b, _ in model.calls) == 10  # one batch of 5 questions x 2
    model.calls = []
    bounded = rollout.rollout(model, TOK, examples, retriever, RolloutConfig(**{**vars(cfg),
                                                                               "rollout_batch_size": bound}))
    assert bounded == whole  # the same greedy episodes, group ids included (a chunk of 3 splits a group)
    assert [e.group_id for e in bounded] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert max(b for b, _ in model.calls) <= bound
    # one cache per chunk (a live object's plain weakref is one object, so consecutive calls share it)
    caches = [ref for i, (_, ref) in enumerate(model.calls) if i == 0 or ref is not model.calls[i - 1][1]]
    assert len(caches) == -(-10 // bound)
    gc.collect()
    assert all(ref() is None for ref in caches)  # every chunk's cache was released
    # and while the last chunk decodes, the cache it grows is only that chunk's: measured, not assumed
    model.calls, sizes = [], []
    original = rollout._forward

    def measuring(m, kw, state, *args):
        logits = original(m, kw, state, *args)
        sizes.append((state.mask.shape[0], kv_bytes(state.cache), state.mask.shape[1]))
        return logits

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollout, "_forward", measuring)
        rollout.rollout(model, TOK, examples, retriever, RolloutConfig(**{**vars(cfg), "rollout_batch_size": bound}))
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (model.config.hidden_size // model.config.num_attention_heads) * 4  # K and V, fp32
    for rows, nbytes, length in sizes:
        assert rows <= bound and nbytes == rows * length * per_token
    # sampled: one generator across the chunks, so a given bound gives the same episodes every time
    sampled = RolloutConfig(**{**vars(cfg), "greedy": False, "seed": 3, "rollout_batch_size": bound})
    assert rollout.rollout(model, TOK, examples, retriever, sampled) == \
        rollout.rollout(model, TOK, examples, retriever, sampled)
