"""Multi-turn search rollouts: the agent thinks, searches, reads what the retriever returns, and answers.

    python bench/bench_rollout.py          # tokens/s against plain `model.generate` and a re-tokenising loop

One call rolls out `num_generations` episodes per example, all in one batch. Per turn:
  1. generate: every active episode continues until `</search>`, `</answer>`, an EOS id, or the turn's budget
     (`max_new_tokens`, or what is left of `max_context_tokens`). Token by token with a KV cache that is kept
     across turns: a turn feeds only what the cache lacks (the prompt at the first turn; then the last sampled
     token and the injected text), so a turn costs its new tokens, not a re-read of the whole context.
     Sampled ids are kept exactly as sampled (loss_mask 1), the EOS or the token that completed the tag
     included, even if that token carries characters after the tag. The price of the kept cache: a row that
     stops early stays in the batch (masked) until the turn's last row stops, and leaves a hole in the cache;
     episodes that ended leave the batch between turns. (Re-reading the whole context every turn instead, as a
     loop that re-tokenises text must, is several times slower on a CPU: bench/bench_rollout.py.)
  2. act, on the turn's text only:
       complete <answer> a </answer>  -> done: answer = a, reward = exact_match(a, golden_answers)
       complete <search> q </search>  -> q joins this turn's search batch
       anything else                  -> Search-R1's invalid-action note is appended (loss_mask 0), go on
  3. search: the queries of all episodes waiting on a search go to `retriever.search(queries, topk)` in one call;
     each observation `\\n\\n<information>{docs}</information>\\n\\n` is tokenised once and appended as ids with
     loss_mask 0, its docs cut so that it fits in `max_obs_tokens` (the wrapper tags are kept).
Turns 1..max_turns may search; turn max_turns + 1 is Search-R1's last `do_search=False` generation, in which
only an answer counts. Text is never decoded and re-encoded to build training inputs: `response_ids` is what the
model sampled plus what we injected, and `text == tokenizer.decode(response_ids)`.

Finish reasons (Episode.finish_reason):
  "answer"     a turn ended with a complete <answer>…</answer>.
  "eos"        the model emitted an EOS id (tokenizer's or generation_config's) without a complete search or answer
               in that turn: the episode ends there, answer None, reward 0.
  "max_turns"  all max_turns turns were used (each search or invalid action uses one) and the final turn gave no
               answer (it searched, or wrote no action).
  "length"     the final turn hit max_new_tokens without an answer. (An earlier turn that hits max_new_tokens
               is an invalid action, as in Search-R1, and the episode goes on.)
  "context"    prompt + response reached max_context_tokens mid-turn, or the next observation/note would leave
               no room to generate; nothing partial is appended. Only these episodes have is_truncated = True.

Deviations from Search-R1 (search_r1/llm_agent/generation.py), all deliberate:
  1. Turns stop at `</search>` / `</answer>` during decoding; Search-R1 generates on, cuts the decoded text at the
     tag and re-tokenises it (so it trains on tokens it never sampled). Here the ids stay as sampled.
  2. EOS without an action ends the episode ("eos"). Search-R1 decodes with skip_special_tokens, so the EOS
     vanishes, the turn counts as invalid and the episode continues after the model said it was done; we keep the
     EOS (it was sampled) and do not append text behind an end-of-turn token.
  3. The query is the text between the last `<search>` and the `</search>` that ended the turn; Search-R1 takes
     the first `<search>`. An empty query is an invalid action (Search-R1 would send "" to the retriever).
  4. An observation longer than max_obs_tokens loses docs, not its closing `</information>` tag (Search-R1 cuts
     the token sequence, tag included).
  5. A search written in the final turn is not counted in num_searches (nothing was retrieved).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from data import Example
from evaluate import exact_match, extract_answer
from search import format_passages

# Search-R1's instruction (DESIGN.md, compatibility facts), verbatim.
INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine by "
    "<search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed illustrations. "
    "For example, <answer> Beijing </answer>. Question: {question}\n"
)
# Search-R1's note after a turn with neither a complete search nor an answer (generation.py), verbatim.
INVALID_ACTION_NOTE = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and </search>. "
    "If I want to give the final answer, I should put the answer between <answer> and </answer>. Let me try again.\n"
)
OBSERVATION_OPEN, OBSERVATION_CLOSE = "\n\n<information>", "</information>\n\n"
STOP_STRINGS = ("</search>", "</answer>")


@dataclass
class RolloutConfig:
    num_generations: int = 5  # G: samples per question
    max_turns: int = 4  # turns that may search (a search or an invalid action uses one), then one answer-only turn
    max_new_tokens: int = 500  # per turn
    max_obs_tokens: int = 500  # an observation, wrapper tags included, is cut to this many tokens
    max_context_tokens: int = 4096  # prompt + response; longer episodes end with is_truncated
    topk: int = 3  # passages per search
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False  # evaluation decodes greedily
    seed: int = 0
    rollout_batch_size: int | None = None  # most episodes decoding at once (their KV cache); None = all


@dataclass
class Episode:
    example: Example
    group_id: int  # unique per example within a rollout batch
    prompt_ids: list[int]
    response_ids: list[int]  # sampled ids exactly as sampled, plus injected observation ids
    loss_mask: list[int]  # 1 on sampled tokens, 0 on injected ones; same length as response_ids
    text: str = ""  # decode(response_ids)
    answer: str | None = None
    reward: float = 0.0
    num_searches: int = 0
    queries: list[str] = field(default_factory=list)
    num_invalid: int = 0  # turns with neither a complete search nor an answer (before the final turn)
    is_truncated: bool = False
    finish_reason: str = ""  # "answer" | "eos" | "max_turns" | "length" | "context"  (module docstring)


def build_prompt(tokenizer, question: str, privileged: str = "") -> str:
    """The Search-R1 user turn in the tokenizer's chat template, with the generation prompt.

    `privileged` is appended to the user turn (OPSD's teacher context); empty for the policy.
    """
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    content = INSTRUCTION.format(question=question) + privileged
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return content


# ---------------------------------------------------------------- parsing a turn (pure)


def parse_search(text: str) -> str | None:
    """The query of the last complete `<search> q </search>` in `text`, stripped; None if none or empty."""
    end = text.rfind("</search>")
    start = text.rfind("<search>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return text[start + len("<search>"):end].strip() or None


def parse_turn(text: str) -> tuple[str, str | None]:
    """One turn's action: ("answer", a), ("search", q) or ("invalid", None)."""
    answer = extract_answer(text)
    if answer is not None:
        return "answer", answer
    query = parse_search(text)
    if query is not None:
        return "search", query
    return "invalid", None


def format_observation(passages) -> str:
    """Search-R1's observation: `\\n\\n<information>{docs.strip()}</information>\\n\\n` (generation.py)."""
    return OBSERVATION_OPEN + format_passages(passages).strip() + OBSERVATION_CLOSE


def observation_ids(tokenizer, observations: list[str], max_obs_tokens: int) -> list[list[int]]:
    """Token ids of each observation, tokenised once; one longer than max_obs_tokens keeps its wrapper tags and
    loses the end of its docs (never fewer tokens than the tags themselves)."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False).input_ids  # noqa: E731
    out = encode(observations)
    too_long = [i for i, ids in enumerate(out) if len(ids) > max_obs_tokens]
    if too_long:
        open_len, close_ids = len(encode([OBSERVATION_OPEN])[0]), encode([OBSERVATION_CLOSE])[0]
        heads = encode([observations[i][:-len(OBSERVATION_CLOSE)] for i in too_long])
        for i, head in zip(too_long, heads):
            out[i] = head[:max(max_obs_tokens - len(close_ids), open_len)] + close_ids
    return out


# ---------------------------------------------------------------- batched generation of one turn


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids (Qwen: <|im_end|> and <|endoftext|>)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, (list, tuple)) else [gen])
    return {i for i in ids if i is not None}


def sample_tokens(logits: torch.Tensor, *, greedy: bool, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a draw from softmax(logits / temperature) restricted to the top-p nucleus."""
    if greedy:
        return logits.argmax(-1)  # (B,)
    logits = logits.float() / temperature  # (B, V)
    if top_p < 1.0:
        # Nucleus (Holtzman et al. 2020): keep the smallest prefix of the sorted distribution with mass >= top_p.
        sorted_logits, order = logits.sort(-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)  # (B, V)
        drop = probs.cumsum(-1) - probs > top_p  # (B, V), never drops the most likely token
        kept = sorted_logits.masked_fill(drop, float("-inf"))  # (B, V)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)  # (B, V), vocabulary order
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=getattr(model, "config", None))
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _cache_kwarg(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated); 4.x knows only the old one.
    A wrapper whose forward takes **kwargs (PEFT, a subclass) gets the name the installed transformers uses."""
    from transformers import LlamaForCausalLM

    for forward in (model.forward, LlamaForCausalLM.forward):
        params = inspect.signature(forward).parameters
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
    return "past_key_values"


@dataclass
class KVState:
    """The KV cache of a batch of sequences, kept across turns, and what describes it (one row per sequence)."""
    cache: object  # transformers DynamicCache
    mask: torch.Tensor  # (B, S) 1 where the cache holds a real token of the row, 0 at padding and holes
    next_pos: torch.Tensor  # (B,) position id of the row's next token = its real tokens so far


def select_rows(state: KVState, rows: list[int]) -> KVState:
    """Keep only these rows of the batch (episodes that finished leave it)."""
    idx = torch.tensor(rows, device=state.mask.device)
    state.cache.batch_select_indices(idx)
    return KVState(state.cache, state.mask[idx], state.next_pos[idx])


def _forward(model, cache_kw: str, state: KVState, input_ids, new_mask, position_ids) -> torch.Tensor:
    """Append (B, n) tokens to the cache; the next-token logits of the last column (B, V)."""
    state.mask = torch.cat([state.mask, new_mask], dim=1)  # (B, S + n)
    # logits_to_keep=1: only the last position's logits, never (B, n, V) at a prefill.
    out = model(input_ids=input_ids, attention_mask=state.mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **{cache_kw: state.cache})
    return out.logits[:, -1]


@torch.inference_mode()
def generate_turn(model, tokenizer, state: KVState | None, pending: list[list[int]], budgets: list[int], *,
                  eos_ids: set[int], greedy: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                  generator: torch.Generator | None = None, stop_strings: tuple[str, ...] = STOP_STRINGS,
                  ) -> tuple[list[tuple[list[int], str]], KVState]:
    """Feed each row's pending ids, then sample at most budgets[b] >= 1 new tokens per row, all rows in one batch.

    pending[b]: the ids of row b not yet in the cache: the whole prompt at the first turn (state None), later
    the last sampled token plus the injected observation/note. They are left-padded to a common width, so every
    row's last real token is in the last column; the cache thus has holes (mask 0) wherever a row had padding or
    had finished while others were still decoding. Masks and position ids come from lengths, never token values.
    Returns (new ids as sampled, reason) per row, reason "eos" (an EOS id, kept), "stop" (the last token completed
    a stop string; found in the decoded tail, so a tag split over several tokens is seen) or "length", and the
    state, whose cache holds everything but each row's last sampled token (it leads the row's next pending ids).
    """
    device, cache_kw = _device(model), _cache_kwarg(model)
    B = len(pending)
    if state is None:
        state = KVState(_new_cache(model), torch.zeros(B, 0, dtype=torch.long, device=device),
                        torch.zeros(B, dtype=torch.long, device=device))
    n = torch.tensor([len(p) for p in pending])  # (B,)
    W = int(n.max())
    ids = torch.zeros(B, W, dtype=torch.long)  # (B, W); padding holds id 0, masked out
    for b, p in enumerate(pending):
        ids[b, W - len(p):] = torch.tensor(p, dtype=torch.long)
    offset = (torch.arange(W)[None, :] - (W - n)[:, None]).to(device)  # (B, W) index within the row's new ids
    position_ids = (state.next_pos[:, None] + offset).clamp(min=0)  # (B, W)
    logits = _forward(model, cache_kw, state, ids.to(device), (offset >= 0).long(), position_ids)  # (B, V)
    state.next_pos = state.next_pos + n.to(device)

    new: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    window = max(len(s) for s in stop_strings) + 2  # tokens: each token of an ASCII tag carries >= 1 of its chars
    for _ in range(max(budgets)):
        tokens = sample_tokens(logits, greedy=greedy, temperature=temperature, top_p=top_p, generator=generator)
        running = []  # rows whose token is not an EOS: check them for a stop string and their budget
        for b, tok in enumerate(tokens.tolist()):
            if reasons[b] is None:
                new[b].append(tok)
                if tok in eos_ids:
                    reasons[b] = "eos"
                else:
                    running.append(b)
        tails = tokenizer.batch_decode([new[b][-window:] for b in running]) if running else []
        for b, tail in zip(running, tails):
            if any(s in tail for s in stop_strings):
                reasons[b] = "stop"
            elif len(new[b]) >= budgets[b]:
                reasons[b] = "length"
        if all(r is not None for r in reasons):
            break
        live = torch.tensor([r is None for r in reasons], device=device).long()  # (B,)
        # Finished rows stay in the batch until the turn ends (their cache continues next turn); what they are
        # fed from now on is masked out, and their last token waits in `pending` for the next turn.
        logits = _forward(model, cache_kw, state, tokens[:, None], live[:, None], state.next_pos[:, None])  # (B, V)
        state.next_pos = state.next_pos + live
    return list(zip(new, reasons)), state


# ---------------------------------------------------------------- the episode loop


def rollout(model, tokenizer, examples: list[Example], retriever, cfg: RolloutConfig,
            privileged: list[str] | None = None) -> list[Episode]:
    """`num_generations` episodes per example (example-major order, group_id = the example's index here).

    At most `cfg.rollout_batch_size` episodes decode at once (None: all): the episodes are cut into chunks in
    order, each decoded with its own KV cache, which is freed before the next chunk starts. A chunk may split a
    group; group ids are set before chunking, so they stay one per question. Greedy episodes do not depend on the
    chunking; sampled ones draw from one generator across chunks, so a run is deterministic for a given bound.
    `privileged[i]`, if given, is appended to example i's user turn (OPSD's teacher reading a reference).
    The model decodes in eval mode (no dropout; with gradient checkpointing on, a training-mode model would not
    fill the KV cache) and is put back in the mode it came in.
    """
    if cfg.max_new_tokens < 1 or cfg.max_obs_tokens < 1 or cfg.max_turns < 0 or cfg.num_generations < 1:
        raise ValueError(f"bad RolloutConfig: {cfg}")
    if cfg.rollout_batch_size is not None and cfg.rollout_batch_size < 1:
        raise ValueError(f"rollout_batch_size must be at least 1, got {cfg.rollout_batch_size}")
    episodes = []
    for group_id, example in enumerate(examples):
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. a BOS).
        prompt = build_prompt(tokenizer, example.question, privileged=privileged[group_id] if privileged else "")
        prompt_ids = tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids
        episodes += [Episode(example, group_id, list(prompt_ids), [], []) for _ in range(cfg.num_generations)]
    greedy = cfg.greedy or cfg.temperature == 0
    generator = None if greedy else torch.Generator(device=_device(model)).manual_seed(cfg.seed)
    size = cfg.rollout_batch_size or max(len(episodes), 1)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(episodes), size):
            _decode(model, tokenizer, episodes[start:start + size], retriever, cfg, greedy, generator)
    finally:
        model.train(was_training)
    for e in episodes:
        e.text = tokenizer.decode(e.response_ids)
    return episodes


def _decode(model, tokenizer, episodes: list[Episode], retriever, cfg: RolloutConfig, greedy: bool, generator):
    """Run these episodes to their end, in one batch with one KV cache (dropped on return)."""
    eos_ids = eos_token_ids(model, tokenizer)
    note_ids = tokenizer(INVALID_ACTION_NOTE, add_special_tokens=False).input_ids

    def room(e: Episode) -> int:
        return cfg.max_context_tokens - len(e.prompt_ids) - len(e.response_ids)

    def finish(e: Episode, reason: str) -> None:
        e.finish_reason, e.is_truncated = reason, reason == "context"

    def inject(e: Episode, ids: list[int]) -> None:
        """Append injected ids (loss_mask 0) if at least one token of room is left after them."""
        if len(ids) >= room(e):
            finish(e, "context")
        else:
            e.response_ids += ids
            e.loss_mask += [0] * len(ids)

    for e in episodes:
        if room(e) < 1:
            finish(e, "context")  # the prompt alone fills the context
    active = [e for e in episodes if not e.finish_reason]
    pending = [list(e.prompt_ids) for e in active]  # per active episode: ids not yet in the KV cache
    state = None
    for turn in range(cfg.max_turns + 1):
        if not active:
            break
        final = turn == cfg.max_turns  # Search-R1's last generation: only an answer counts
        # 1. generate one turn for all active episodes
        budgets = [min(cfg.max_new_tokens, room(e)) for e in active]
        outputs, state = generate_turn(model, tokenizer, state, pending, budgets, eos_ids=eos_ids, greedy=greedy,
                                       temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
        turn_texts = tokenizer.batch_decode([ids for ids, _ in outputs])
        injected = {}  # episode index in `active` -> ids appended after its turn

        # 2. act on each turn's text
        waiting: list[int] = []
        for i, (e, (ids, reason), text) in enumerate(zip(active, outputs, turn_texts)):
            e.response_ids += ids
            e.loss_mask += [1] * len(ids)
            action, content = parse_turn(text)
            if action == "answer":
                e.answer, e.reward = content, exact_match(content, e.example.golden_answers)
                finish(e, "answer")
            elif reason == "eos":
                finish(e, "eos")
            elif reason == "length" and room(e) < 1:
                finish(e, "context")
            elif final:
                finish(e, "length" if reason == "length" else "max_turns")
            elif action == "search":
                e.queries.append(content)
                waiting.append(i)
            else:  # invalid action (a turn cut by max_new_tokens too): Search-R1's note, and go on
                injected[i] = note_ids
                e.num_invalid += 1

        # 3. one retrieval call for every episode waiting on a search
        if waiting:
            results = retriever.search([active[i].queries[-1] for i in waiting], cfg.topk)
            if len(results) != len(waiting):
                raise RuntimeError(f"the retriever answered {len(results)} of {len(waiting)} queries")
            obs = observation_ids(tokenizer, [format_observation(p) for p in results], cfg.max_obs_tokens)
            for i, ids in zip(waiting, obs):
                active[i].num_searches += 1
                injected[i] = ids
        for i, ids in injected.items():
            inject(active[i], ids)

        # the episodes that go on keep their cache rows; their last sampled token and the injection come next
        keep = [i for i, e in enumerate(active) if not e.finish_reason]
        if len(keep) < len(active) and keep:
            state = select_rows(state, keep)
        pending = [[outputs[i][0][-1]] + injected[i] for i in keep]
        active = [active[i] for i in keep]
