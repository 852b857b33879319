"""The built-in tiny model: a search agent small enough to learn on a laptop CPU (testbed plumbing, not the method).

A random tiny model never answers correctly, so GRPO would see only zero advantages and OPSD no correct sibling.
`load_tiny(world)` instead returns a ~1M-parameter Qwen2 (the real `Qwen2ForCausalLM` class, so every code path
is the one a 3B run takes) whose tokenizer is trained in-process on the synthetic world, warm-started by three short
supervised passes on trajectories written in exactly the rollout format:

    <think> I need to search NAME. </think>
    <search> NAME </search>

    <information>Doc 1(Title: ...) ...</information>

    <think> I found the answer. </think>
    <answer> ANSWER </answer><|im_end|>

The warm start has three stages (`warm_start`), all next-token cross-entropy on the model's tokens and, as
reading practice, on the retrieved passages. Each is there so that one effect the paper claims has room to show
(the README, "The built-in testbed", says which and what was measured):

1. drills: ideal trajectories only (search the question's entity, read the answer out of Doc 1; two searches for
   two-hop questions), until the model copies a name into its query and a name or year out of a passage.
2. references: half ideal trajectories, half with OPSD's privileged context (a reference solution in the prompt,
   `opsd.TEACHER_CONTEXT`) followed exactly, so that the teacher can read: a 3B model reads a worked solution out
   of the box, a 1M one has to be shown (a few hundred such examples in the last stage alone left the teacher
   worse than the student; mixing them into the drills kept the model from learning to read years at all).
3. habits: a deliberately flawed mix, so the starting policy knows the format but is far from good: it guesses
   year questions without searching 90% of the time (an agent overconfident about dates) and other questions 5%;
   10% of searches look for someone else (the answer is then read, correctly, off the wrong passage); 80% of
   two-hop questions are answered after the first search, with the bridge entity read there; 70% of searching
   episodes make their first search twice (redundant: the reward does not mind, only OPSD's fewest-searches reference
   does). 30% carry a reference in the prompt, as OPSD chooses it among G = 5 draws of this flawed mix (a correct
   one with the fewest searches), and follow it.

Measured results (the starting exact match, what GRPO does with it) are in the README, "The built-in testbed".
The tokenizer splits numbers into digits, as Qwen2's does, so a year is four well-trained tokens; the world's
names come out as single tokens. Built once (about 3 minutes on 2 cores) and cached under `$SEARCH_E1_CACHE` (default
~/.cache/search-e1), keyed by a hash of what shapes it (`recipe_key`: the recipe, the world's content, the text
it is trained on), so any change that matters rebuilds it, and nothing else does.
    python -c "import data, tiny; tiny.load_tiny(data.make_world())"
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import data
import opsd
import rollout
from search import BM25Retriever, parse_corpus_row

# ChatML, as Qwen2.5 writes it (minus Qwen's default system message).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class TinyRecipe:
    vocab_size: int = 3072  # BPE merges learned on the world's text
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_positions: int = 1024
    # Stage 1, drills: ideal trajectories only, until the model copies a name into its query and an answer out
    # of a passage (a 1M-parameter model needs ~900 steps to form that skill, and flaws in the data slow it).
    drill_steps: int = 900  # optimizer steps of batch_size trajectories
    lr: float = 3e-3  # peak learning rate of the drills (warmup, then cosine decay to 0)
    # Stage 2, references: drills of which a share carries a reference in the prompt, copied (OPSD's teacher).
    reference_steps: int = 300  # optimizer steps of batch_size trajectories
    reference_lr: float = 2e-3  # peak learning rate
    p_reference: float = 0.5  # of this stage's trajectories: a reference in the prompt, followed
    # Stage 3, habits: a flawed mix, so the starting policy is far from good (and something is left to learn).
    flawed_steps: int = 150  # optimizer steps of batch_size trajectories
    flawed_lr: float = 5e-4  # peak learning rate of the habits: low, so the drilled skills survive
    p_guess: float = 0.05  # answer straight away, without searching, with a guess of the right kind
    p_guess_year: float = 0.90  # the same on questions whose answer is a year: an agent overconfident about dates
    p_wrong_query: float = 0.10  # of the searching trajectories: search for someone else, answer from what came back
    p_stop_early: float = 0.80  # two-hop: answer after the first search, with the bridge entity read there
    p_extra_search: float = 0.70  # repeat the first search once before going on (a redundant search)
    p_privileged: float = 0.30  # of all: OPSD's reference in the prompt (fewest-search correct of G draws), followed
    num_generations: int = 5  # G of those draws: train.py's default (a run's --num-generations does not change it)
    read_observations: bool = True  # the loss also covers retrieved passages (reading practice, as in pretraining)
    batch_size: int = 16
    topk: int = 1
    seed: int = 0


def cache_dir() -> Path:
    return Path(os.environ.get("SEARCH_E1_CACHE", Path.home() / ".cache" / "search-e1"))


def recipe_key(recipe: TinyRecipe, world) -> str:
    """Hash of exactly what shapes the model: the recipe, the world's content, and the text it is trained on
    (the chat template, the instruction, the teacher context, the observation format, through a sample of the
    warm-start trajectories of both stages). Module sources are not hashed: a comment edit rebuilds nothing."""
    h = hashlib.sha256()
    h.update(repr(sorted(asdict(recipe).items())).encode())
    h.update(world_fingerprint(world).encode())
    h.update(repr((CHAT_TEMPLATE, SPECIAL_TOKENS, rollout.INSTRUCTION, opsd.TEACHER_CONTEXT)).encode())
    observations = title_observations(world, recipe.topk)
    for stage in STAGES:
        h.update(repr(warm_start_texts(world, recipe, 256, stage, observations)).encode())
    return h.hexdigest()[:16]


def world_fingerprint(world) -> str:
    h = hashlib.sha256()
    for part in (world.corpus, [asdict(e) for e in world.train + world.test], sorted(world.plans.items()),
                 sorted(world.facts.items())):
        h.update(repr(part).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- trajectories


def search_turn(query: str, observations: dict[str, str], first: bool) -> list[tuple[str, bool]]:
    """One search in the rollout's exact format: the model's turn (trained), then the observation (not)."""
    lead = "I need to search" if first else "Now I need to search"
    return [(f"<think> {lead} {query}. </think>\n<search> {query} </search>", True), (observations[query], False)]


def answer_turn(answer: str, searched: bool = True) -> list[tuple[str, bool]]:
    thought = "I found the answer." if searched else "I think I know this."
    return [(f"<think> {thought} </think>\n<answer> {answer} </answer>", True)]


def ideal_trajectory(example, plan, observations) -> list[tuple[str, bool]]:
    """Search each entity of the plan in turn, then answer."""
    segments = [seg for i, (query, _) in enumerate(plan) for seg in search_turn(query, observations, i == 0)]
    return segments + answer_turn(example.golden_answers[0])


def relations_of(facts: dict, plan) -> tuple[str, ...]:
    """The relation path a plan follows: [(entity, value), ...] -> (relation, ...)."""
    return tuple(next(r for r, v in facts[entity].items() if v == value and r != "kind") for entity, value in plan)


def follow(facts: dict, name: str, relations: tuple[str, ...]) -> list[tuple[str, str]] | None:
    """The plan from another entity along the same relations; None where that entity lacks one of them."""
    plan = []
    for rel in relations:
        if name not in facts or rel not in facts[name]:
            return None
        plan.append((name, facts[name][rel]))
        name = facts[name][rel]
    return plan


def flawed_trajectory(example, plan, observations, facts, guesses, recipe: TinyRecipe, rng: random.Random):
    """(segments, answer): the ideal trajectory, or its flaws: a guess without searching; a wrong first query (the
    answer is then read, correctly, from the wrong passage); on a two-hop question, an answer after the first
    search (the bridge entity read there); the first search made twice."""
    year = example.golden_answers[0].isdigit()
    if rng.random() < (recipe.p_guess_year if year else recipe.p_guess):
        guess = rng.choice(guesses[year])
        return answer_turn(guess, searched=False), guess
    if rng.random() < recipe.p_wrong_query:
        # Someone else of the same kind, followed along the same relations (if the world has anyone).
        first, relations = plan[0][0], relations_of(facts, plan)
        others = [other for name, f in facts.items() if f["kind"] == facts[first]["kind"] and name != first
                  and (other := follow(facts, name, relations))]
        plan = rng.choice(others) if others else plan
    if len(plan) > 1 and rng.random() < recipe.p_stop_early:
        plan = plan[:1]  # the answer is then the bridge entity, read off the first passage
    segments = []
    for i, (query, _) in enumerate(plan):
        turn = search_turn(query, observations, i == 0)
        segments += turn * (2 if i == 0 and rng.random() < recipe.p_extra_search else 1)
    return segments + answer_turn(plan[-1][1]), plan[-1][1]


def reference_trajectory(example, plan, observations, facts, guesses, recipe: TinyRecipe, rng: random.Random):
    """OPSD's reference choice applied to the flawed mix, nearly as opsd.mine_pairs makes it: of num_generations
    draws, a correct one with the fewest searches (ties: the first drawn; mine_pairs prefers the shorter response
    first); the ideal trajectory where none is correct."""
    draws = [flawed_trajectory(example, plan, observations, facts, guesses, recipe, rng)
             for _ in range(recipe.num_generations)]
    correct = [segments for segments, answer in draws if answer == example.golden_answers[0]]
    if not correct:
        return ideal_trajectory(example, plan, observations)
    return min(correct, key=lambda segments: sum("<search>" in text for text, trained in segments if trained))


def build_tokenizer(world, recipe: TinyRecipe) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the world's passages and questions; the fixed instruction is one token."""
    tok = Tokenizer(models.BPE())
    # Digits one by one, as Qwen2's tokenizer splits them: a year is four well-trained tokens, not one rare one.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    texts = [row["contents"] for row in world.corpus] + [e.question for e in world.train + world.test]
    texts += ["<think> I need to search </think>\n<search> </search>\n\n<information>Doc 1(Title: ) </information>"
              "\n\n<answer> </answer> I think I know this. I found the answer. Now"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The instruction is the same ~100 words in every prompt; as one token a CPU step spends its time on the
    # episode, not on re-reading boilerplate. The tokenizer still encodes any text (byte-level).
    instruction, _ = rollout.INSTRUCTION.split("{question}")
    tok.add_tokens([AddedToken(instruction, normalized=False)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def encode_trajectory(tokenizer, prompt: str, segments) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on the model's own tokens, EOS included) for prompt + response."""
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    mask = [0] * len(ids)
    for text, trained in segments:
        seg = tokenizer(text, add_special_tokens=False).input_ids
        ids += seg
        mask += [int(trained)] * len(seg)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask


def title_observations(world, topk: int) -> dict[str, str]:
    """Every query a trajectory makes is an entity's name: the observation for each, retrieved in one batch."""
    titles = [row["contents"].split("\n", 1)[0].strip('"') for row in world.corpus]
    retriever = BM25Retriever(passages=[parse_corpus_row(row) for row in world.corpus])
    return {t: rollout.format_observation(ps) for t, ps in zip(titles, retriever.search(titles, topk))}


STAGES = ("drills", "references", "habits")


def warm_start_texts(world, recipe: TinyRecipe, n: int, stage: str, observations: dict[str, str]):
    """(question, privileged context, segments) of n warm-start trajectories of one stage on the world's training
    questions: ideal ones (drills), ideal ones and references followed (references), or the flawed mix with its
    share of references followed (habits)."""
    rng = random.Random(recipe.seed + STAGES.index(stage))
    answers = [e.golden_answers[0] for e in world.train]
    guesses = {year: [a for a in answers if a.isdigit() == year] for year in (False, True)}
    # Each question in turn, so none is seen much more often than the others: with thousands of distinct
    # questions, memorising answers loses to copying them out of the passages.
    questions = rng.sample(world.train, len(world.train))
    p_reference = {"drills": 0.0, "references": recipe.p_reference, "habits": recipe.p_privileged}[stage]
    out = []
    for i in range(n):
        example = questions[i % len(questions)]
        plan = world.plans[example.id]
        privileged = ""
        if rng.random() < p_reference:
            # A reference in the prompt (OPSD's teacher context), and the trajectory follows it: a 3B model reads a
            # worked solution out of the box, a 1M one has to be shown.
            segments = reference_trajectory(example, plan, observations, world.facts, guesses, recipe, rng)
            privileged = opsd.TEACHER_CONTEXT.format(reference="".join(text for text, _ in segments))
        elif stage == "habits":
            segments, _ = flawed_trajectory(example, plan, observations, world.facts, guesses, recipe, rng)
        else:
            segments = ideal_trajectory(example, plan, observations)
        out.append((example.question, privileged, segments))
    return out


def warm_start_data(world, tokenizer, recipe: TinyRecipe, n: int, stage: str,
                    observations: dict[str, str] | None = None) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of the n trajectories of warm_start_texts, in the rollout's prompt format."""
    observations = observations or title_observations(world, recipe.topk)
    return [encode_trajectory(tokenizer, rollout.build_prompt(tokenizer, question, privileged=privileged), segments)
            for question, privileged, segments in warm_start_texts(world, recipe, n, stage, observations)]


# ---------------------------------------------------------------- model


def model_config(recipe: TinyRecipe, vocab_size: int, eos_token_id=None, pad_token_id=None) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads, max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )


def build_model(tokenizer, recipe: TinyRecipe) -> Qwen2ForCausalLM:
    torch.manual_seed(recipe.seed)
    return Qwen2ForCausalLM(model_config(recipe, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id))


def supervised_pass(model, trajectories, recipe: TinyRecipe, lr: float, stage: str = "", log=print) -> list[float]:
    """One epoch of next-token cross-entropy (on the model's tokens, and on observations if read_observations),
    AdamW with warmup and cosine decay, batches of similar lengths."""
    if not trajectories:
        return []
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    n = len(trajectories)
    total = math.ceil(n / recipe.batch_size)
    warmup = min(50, max(1, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    # Batches of similar lengths (sorted within windows of 16 batches) waste little on padding.
    order = torch.randperm(n, generator=g).tolist()
    window = 16 * recipe.batch_size
    order = [i for w in range(0, n, window) for i in sorted(order[w:w + window], key=lambda i: len(trajectories[i][0]))]
    batches = [order[s:s + recipe.batch_size] for s in range(0, n, recipe.batch_size)]
    model.train()
    losses = []
    for b in torch.randperm(len(batches), generator=g).tolist():
        batch = [trajectories[i] for i in batches[b]]
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T)
        attention = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), T), -100)  # (B, T)
        for row, (ids, mask) in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
            learn = torch.tensor(mask) == 1
            if recipe.read_observations:  # everything after the prompt
                learn[mask.index(1):] = True
            labels[row, :len(ids)] = torch.where(learn, torch.tensor(ids), -100)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 100 == 0 or len(losses) == total:
            log(f"tiny warm-start {stage}: step {len(losses)}/{total} loss {sum(losses[-100:]) / len(losses[-100:]):.3f}")
    model.eval()
    return losses


def warm_start(model, world, tokenizer, recipe: TinyRecipe, log=print) -> list[float]:
    """The three stages in turn (drills, references, habits): the losses of all."""
    observations = title_observations(world, recipe.topk)
    losses = []
    for stage, steps, lr in (("drills", recipe.drill_steps, recipe.lr),
                             ("references", recipe.reference_steps, recipe.reference_lr),
                             ("habits", recipe.flawed_steps, recipe.flawed_lr)):
        trajectories = warm_start_data(world, tokenizer, recipe, steps * recipe.batch_size, stage, observations)
        losses += supervised_pass(model, trajectories, recipe, lr, stage, log=log)
    return losses


# For tests of the plumbing: a recipe that builds in seconds (and learns nothing much).
QUICK_RECIPE = TinyRecipe(drill_steps=8, flawed_steps=4)


def load_tiny(world, recipe: TinyRecipe | None = None, log=print):
    """(model, tokenizer) for the built-in tiny agent; built on first use, then loaded from the cache.

    SEARCH_E1_TINY_QUICK=1 selects QUICK_RECIPE (the test suite sets it)."""
    if recipe is None:
        recipe = QUICK_RECIPE if os.environ.get("SEARCH_E1_TINY_QUICK") == "1" else TinyRecipe()
    path = cache_dir() / f"tiny-{recipe_key(recipe, world)}"
    if not (path / "config.json").exists():
        log(f"building the tiny model (once; cached at {path}) ...")
        torch.manual_seed(recipe.seed)
        tokenizer = build_tokenizer(world, recipe)
        model = build_model(tokenizer, recipe)
        warm_start(model, world, tokenizer, recipe, log=log)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, path)  # atomic: a killed build never leaves a half-written cache entry
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


# ---------------------------------------------------------------- what the warm start leaves for RL and OPSD


def is_redundant(episode, world) -> bool:
    """More searches than needed: one query searched twice, or more searches than the question has hops."""
    hops = len(world.plans[episode.example.id])
    return len(set(episode.queries)) < len(episode.queries) or episode.num_searches > hops


@torch.no_grad()
def search_probability(model, tokenizer, examples) -> list[float]:
    """The first decision of each example's episode, as the greedy policy takes it: after "<think> I", the
    probability of " need" (a search follows) against " think" (a guess follows), renormalised over the two."""
    start = tokenizer("<think> I", add_special_tokens=False).input_ids
    need, think = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" need", " think"))
    out = []
    for example in examples:
        prompt = tokenizer(rollout.build_prompt(tokenizer, example.question), add_special_tokens=False).input_ids
        logits = model(input_ids=torch.tensor([prompt + start])).logits[0, -1]  # (V,)
        out.append(float(torch.softmax(logits[[need, think]], dim=0)[0]))
    return out


def probe(model, tokenizer, world, retriever, rollout_cfg, n: int = 100) -> dict:
    """What a model leaves for RL and OPSD to do, on fixed questions of the world's training split:
    - "two_hop_sampled_em": exact match of sampled episodes (rollout_cfg's G and temperature) on n two-hop questions;
    - "redundant_sampled": fraction of sampled episodes on n questions that search redundantly (is_redundant);
    - "teacher_em", "student_em": greedy exact match on n questions with the ideal trajectory in the prompt
      (OPSD's teacher context) and without it;
    - "near_ties": fraction of the test questions whose first search-or-guess probability (search_probability)
      lies within 0.3-0.7, where a float difference between machines could flip the greedy start."""
    two_hop = [e for e in world.train if world.question_type(e) == "two_hop"][:n]
    sampled = rollout.rollout(model, tokenizer, two_hop, retriever, rollout_cfg)
    questions = world.train[:n]
    mixed = rollout.rollout(model, tokenizer, questions, retriever, rollout_cfg)
    greedy = dataclasses.replace(rollout_cfg, num_generations=1, greedy=True)
    observations = title_observations(world, rollout_cfg.topk)
    privileged = [opsd.TEACHER_CONTEXT.format(reference="".join(
        text for text, _ in ideal_trajectory(e, world.plans[e.id], observations))) for e in questions]
    teacher = rollout.rollout(model, tokenizer, questions, retriever, greedy, privileged=privileged)
    student = rollout.rollout(model, tokenizer, questions, retriever, greedy)
    p_search = search_probability(model, tokenizer, world.test)
    return {
        "two_hop_sampled_em": sum(e.reward for e in sampled) / len(sampled),
        "redundant_sampled": sum(is_redundant(e, world) for e in mixed) / len(mixed),
        "teacher_em": sum(e.reward for e in teacher) / len(teacher),
        "student_em": sum(e.reward for e in student) / len(student),
        "near_ties": sum(0.3 <= p <= 0.7 for p in p_search) / len(p_search),
    }
