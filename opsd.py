"""On-policy self-distillation (OPSD): the policy, shown a verified sibling solution, teaches itself without it.

    metrics = opsd_phase(policy, episodes, tokenizer, cfg, seed=seed)   # train.py, after each GRPO phase

One phase, on fresh on-policy episodes (G per question, this process's share), as `grpo_step` is one GRPO update:
  1 mine (student, reference) sibling pairs      2 build each teacher prompt, within the length bound
  3 freeze the teacher (the policy at the start of the phase)      4 KL before
  5 `opsd_epochs` passes of optimizer steps over the pairs (`opsd_step`)      6 KL after

The method (Search-E1, DESIGN.md "The method" 2-4):
1. Pairs. Per question (group of G on-policy samples), the reference is a correct episode (reward >= threshold)
   with the fewest searches (ties: fewest response tokens, then the first). Students are its siblings:
   "most_different" = one sibling, incorrect if any, maximising the distance below; "incorrect" = every
   incorrect sibling; "all" = every sibling. A question with no correct episode gives no pair (counted).
   Distance (ours): 1 - Jaccard similarity of the sets of token ids the two episodes sampled (loss mask 1), so
   different queries, reasoning and answers all count and retrieved text does not.
2. Teacher context (ours, one constant: TEACHER_CONTEXT): the reference's response text (its reasoning, searches,
   retrieved documents and answer, special tokens dropped) appended to the user turn of the normal prompt.
   Length bound (ours): the teacher reads privileged prompt + student response, which could reach twice
   max_context_tokens. It must fit in `opsd_max_tokens` (None = max_context_tokens) and in the model's
   positions; a pair over the bound first loses the reference's retrieved documents (each <information> block
   keeps its tags around OMITTED: the searches and the answer are what the student lacks), and is skipped if it is
   still over (both counted: opsd/cut_references, opsd/skipped_long_pairs).
3. Both models score the SAME student response tokens: the student (current policy) after the normal prompt, the
   teacher (frozen policy) after the privileged prompt. Retrieved tokens (loss mask 0) are excluded.
4. Loss, a token mean over all loss tokens of the step (all processes):

       L = 1/N * sum_tokens sum_v min(clip, p_T[v] (log p_T[v] - log p_S[v]))

   forward KL(teacher || student) over the full vocabulary (fused.forward_kl, no logits materialised), each
   entry's term clipped from above so that rare divergent entries cannot dominate; a clipped entry gives no
   gradient. clip = 1.0 (train.py's default): a term exceeds 1 only if p_S < p_T * e^(-1/p_T) (p_T = 1: 0.37,
   0.5: 0.068, 0.2: 0.0013), i.e. where the student all but rules out a token the teacher is sure of; ordinary
   disagreement stays unclipped. None = plain forward KL.
5. The teacher is frozen at the start of the phase. With --opsd-lora-rank R (the paper's way), a fresh LoRA adapter
   (PEFT; rank R, alpha 2R unless --opsd-lora-alpha, dropout 0, on every linear layer of the decoder, not the
   lm_head: LORA_TARGETS) is added to the policy; the student is the policy with its adapter, the teacher the
   same model with the adapter disabled (no copy of any weight), the optimizer (a fresh AdamW) covers the adapter
   only, and at the end the adapter is merged into the weights (W += alpha/R * B A), so the next GRPO round trains
   the merged policy. Without LoRA (R = 0) the whole policy is trained with a fresh AdamW, against a frozen copy
   (bf16 under --bf16).
Control (ours, --opsd-reference mismatched): every pair's reference is a correct episode of another question, so
the teacher's context is a real solution that does not fit; what OPSD gains over it is what the reference's content
gives (bench/ablation.py).
Diagnostic (ours, --opsd-diagnostic-pairs n): before any step, greedy episodes of the teacher (the policy with the
reference in its prompt) and of the student (normal prompt) on n of the pairs' questions. If the teacher is no
better than the student there is nothing to distil; opsd/teacher_em and opsd/student_em say which.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from dataclasses import dataclass

import torch

import fused
from fused import pad_batch, response_hidden
from parallel import (all_reduce_sum, all_sum, distributed, frozen_copy, is_dtensor, max_over_ranks, optimizer_step,
                      reshard, world_size)
from rollout import OBSERVATION_CLOSE, OBSERVATION_OPEN, Episode, build_prompt, rollout

# The privileged context appended to the teacher's user turn; {reference} = the reference episode's response.
TEACHER_CONTEXT = "\n\nA verified correct solution to this question, for reference:\n{reference}\n"
# What a retrieved block of the reference becomes when the teacher sequence is over its bound.
OMITTED = "(documents omitted)"


@dataclass
class Pair:
    student: Episode  # the sibling whose sampled tokens are scored
    reference: Episode  # the correct sibling the teacher reads
    teacher_ids: list[int] | None = None  # the teacher's prompt, once built (bound_teacher_prompts)
    documents: bool = True  # whether that prompt keeps the reference's retrieved documents


# ---------------------------------------------------------------- pairs and the teacher prompt


def distance(a: Episode, b: Episode) -> float:
    """1 - Jaccard similarity of the sets of sampled token ids (loss mask 1)."""
    sa = {t for t, m in zip(a.response_ids, a.loss_mask) if m}
    sb = {t for t, m in zip(b.response_ids, b.loss_mask) if m}
    return 1.0 - len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def mine_pairs(episodes: list[Episode], students: str = "most_different", threshold: float = 1.0):
    """(pairs, stats): one reference per group with a correct episode, students among its siblings."""
    if students not in ("most_different", "incorrect", "all"):
        raise ValueError(f"students={students!r}: choose most_different, incorrect or all")
    groups: dict[int, list[Episode]] = {}
    for e in episodes:
        groups.setdefault(e.group_id, []).append(e)
    pairs, skipped, ref_searches = [], 0, []
    for group in groups.values():
        correct = [i for i, e in enumerate(group) if e.reward >= threshold]
        if not correct:
            skipped += 1
            continue
        r = min(correct, key=lambda i: (group[i].num_searches, len(group[i].response_ids), i))
        reference = group[r]
        ref_searches.append(reference.num_searches)
        siblings = [e for i, e in enumerate(group) if i != r]
        incorrect = [e for e in siblings if e.reward < threshold]
        if students == "all":
            chosen = siblings
        elif students == "incorrect":
            chosen = incorrect
        else:  # most_different: incorrect ones first (the paper), then the farthest; max keeps the first on ties
            pool = incorrect or siblings
            chosen = [max(pool, key=lambda e: distance(e, reference))] if pool else []
        pairs += [Pair(student=e, reference=reference) for e in chosen]
    stats = {
        "pairs": float(len(pairs)),
        "groups": float(len(groups)),
        "skipped_groups": float(skipped),  # no correct episode
        "reference_searches": sum(ref_searches) / max(len(ref_searches), 1),
        "incorrect_students": sum(p.student.reward < threshold for p in pairs) / max(len(pairs), 1),
    }
    return pairs, stats


def mismatch_references(pairs: list[Pair]) -> list[Pair]:
    """The control arm (--opsd-reference mismatched): each pair's reference replaced by the reference of another
    question (the next group's, cyclically), so the teacher reads a correct solution of the wrong question. With a
    single question there is no other: no pairs."""
    references = list({p.reference.group_id: p.reference for p in pairs}.values())
    if len(references) < 2:
        return []
    following = {r.group_id: references[(i + 1) % len(references)] for i, r in enumerate(references)}
    return [Pair(p.student, following[p.reference.group_id]) for p in pairs]


def reference_text(tokenizer, episode: Episode, keep_documents: bool = True) -> str:
    """The reference's response as the teacher reads it, special tokens dropped (an end-of-turn token inside the
    user turn would end it). keep_documents=False: each retrieved block becomes <information>OMITTED</information>."""
    if keep_documents:
        return tokenizer.decode(episode.response_ids, skip_special_tokens=True).strip()
    pieces, start = [], 0
    for end in range(1, len(episode.response_ids) + 1):  # runs of equal loss mask: sampled vs injected text
        if end == len(episode.response_ids) or episode.loss_mask[end] != episode.loss_mask[start]:
            text = tokenizer.decode(episode.response_ids[start:end], skip_special_tokens=True)
            if not episode.loss_mask[start] and text.lstrip().startswith(OBSERVATION_OPEN.strip()):  # provenance
                text = OBSERVATION_OPEN + OMITTED + OBSERVATION_CLOSE
            pieces.append(text)
            start = end
    return "".join(pieces).strip()


def teacher_prompt_ids(tokenizer, pair: Pair, keep_documents: bool = True) -> list[int]:
    """The student's question in the normal prompt, with the reference trajectory appended to the user turn."""
    if pair.teacher_ids is not None and keep_documents:
        return pair.teacher_ids
    privileged = TEACHER_CONTEXT.format(reference=reference_text(tokenizer, pair.reference, keep_documents))
    prompt = build_prompt(tokenizer, pair.student.example.question, privileged=privileged)
    # tokenized as rollout.py tokenizes the student's prompt (special tokens only without a chat template)
    return tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids


def bound_teacher_prompts(pairs: list[Pair], tokenizer, max_tokens: int) -> tuple[list[Pair], dict]:
    """Set each pair's teacher prompt so that prompt + student response <= max_tokens (module docstring, 2):
    documents cut from the reference first, the pair dropped if that is not enough -> (kept pairs, counts)."""
    kept, cut, skipped = [], 0, 0
    for pair in pairs:
        response = len(pair.student.response_ids)
        for keep_documents in (True, False):
            ids = teacher_prompt_ids(tokenizer, pair, keep_documents)
            if len(ids) + response <= max_tokens:
                kept.append(Pair(pair.student, pair.reference, ids, keep_documents))
                cut += not keep_documents
                break
        else:
            skipped += 1
    return kept, {"cut_references": float(cut), "skipped_long_pairs": float(skipped)}


# ---------------------------------------------------------------- the loss


def opsd_loss(student_hidden, teacher_hidden, weight, teacher_weight, *, clip: float | None, normaliser: float,
              chunk_size: int = 1024, temperature: float = 1.0):
    """Clipped forward KL(teacher || student), summed over tokens / normaliser -> (loss, metrics).

    Hidden states (n, H) at the same n student tokens; metrics are sums over them (the caller normalises).
    """
    kl_sum, kl_unclipped, entropy = fused.forward_kl(student_hidden, teacher_hidden, weight, teacher_weight, clip,
                                                     chunk_size, temperature, reduction="sum",
                                                     return_stats=True)  # (), (n,), (n,)
    loss = kl_sum / normaliser
    metrics = {"kl_sum": kl_unclipped.sum(), "entropy_sum": entropy.sum(), "tokens": float(kl_unclipped.shape[0])}
    return loss, metrics


def _pair_batches(pairs: list[Pair], tokenizer, micro: int, device):
    """(student batch, teacher batch) per micro-batch: same response tokens, different prompts. Every process yields
    the same number of micro-batches (the most any process has), padded with empty ones (one prompt token, no loss
    token): under FSDP2 every forward and backward is a collective that all processes must join."""
    count = max_over_ranks(-(-len(pairs) // micro))
    for s in range(0, count * micro, micro):
        chunk = pairs[s:s + micro]
        if not chunk:  # padding: a forward whose loss is 0 (the gradient flows, and is 0)
            student = pad_batch([[0]], [[0]], [[0]], device)
            yield student, student
            continue
        responses = [p.student.response_ids for p in chunk]
        masks = [p.student.loss_mask for p in chunk]
        student = pad_batch([p.student.prompt_ids for p in chunk], responses, masks, device)
        teacher = pad_batch([teacher_prompt_ids(tokenizer, p) for p in chunk], responses, masks, device)
        assert torch.equal(student.targets, teacher.targets)  # row i of both is the same student token
        yield student, teacher


# ---------------------------------------------------------------- the teacher: a frozen copy, or the adapter off

# LoRA on every linear layer of the decoder (PEFT's "all-linear": q, k, v, o, gate, up, down in Qwen2 / Llama),
# never on the lm_head, which Qwen2.5 ties to the embedding (memory.py counts the same layers).
LORA_TARGETS = "all-linear"


@contextlib.contextmanager
def as_teacher(model):
    """The teacher's view of `model`: a PEFT model with its adapter disabled (LoRA OPSD: the weights as they were
    when the phase began), else the model itself (a frozen copy)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def add_adapter(policy, rank: int, alpha: float):
    """A PEFT model around `policy` with a fresh LoRA adapter (B = 0: the policy's function is unchanged); the base
    weights are frozen in place, nothing is copied. Under torchrun the adapter is replicated: every process starts
    from rank 0's initialisation (A is random), and its gradients are all-reduced (parallel.all_reduce_grads)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RuntimeError("--opsd-lora-rank needs PEFT: pip install -r requirements-lora.txt") from None
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS, bias="none")
    peft_model = get_peft_model(policy, config)
    if distributed():
        for p in peft_model.parameters():
            if p.requires_grad:
                torch.distributed.broadcast(p.data, src=0)
    return peft_model


def merge_adapter(peft_model, trainable: dict[str, bool]):
    """W += (alpha / rank) * B @ A in every adapted layer, the adapter removed; the policy's parameters (the same
    tensors the GRPO optimizer holds) get back the requires_grad flags they had -> the policy. A sharded weight
    (FSDP2) adds the matching shard of the update."""
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                weight = module.get_base_layer().weight
                delta = module.get_delta_weight("default").to(weight.dtype)  # (out, in) = scale * B @ A
                if is_dtensor(weight):
                    from torch.distributed.tensor import distribute_tensor

                    delta = distribute_tensor(delta.to(weight.device), weight.device_mesh, weight.placements)
                weight.add_(delta)
    policy = peft_model.unload()  # the base model, its LoRA layers taken out (already merged above)
    for name, p in policy.named_parameters():
        p.requires_grad_(trainable[name])
    return policy


# ---------------------------------------------------------------- one update


def opsd_step(student_model, teacher_model, optimizer, pairs: list[Pair], tokenizer, cfg) -> dict:
    """One optimizer step of OPSD over `pairs` (may be empty on some process) -> namespaced metrics.

    The teacher is a frozen copy, or with LoRA the student itself, read with its adapter off (as_teacher).
    cfg attributes: opsd_clip, micro_batch_size, max_grad_norm, chunk_size, temperature.
    """
    device = next(student_model.parameters()).device
    num_tokens = float(all_reduce_sum(torch.tensor(float(sum(sum(p.student.loss_mask) for p in pairs)))))
    step_loss = torch.zeros((), device=device)
    kl_sum = entropy_sum = 0.0
    if num_tokens > 0:
        for student, teacher in _pair_batches(pairs, tokenizer, cfg.micro_batch_size, device):
            with torch.no_grad(), as_teacher(teacher_model) as t:
                teacher_h, teacher_w = response_hidden(t, teacher)  # (n, H), (V, H)
            student_h, student_w = response_hidden(student_model, student)  # (n, H), (V, H)
            loss, m = opsd_loss(student_h, teacher_h, student_w, teacher_w, clip=cfg.opsd_clip,
                                normaliser=num_tokens, chunk_size=cfg.chunk_size, temperature=cfg.temperature)
            loss.backward()
            step_loss += loss.detach()
            kl_sum += float(m["kl_sum"])
            entropy_sum += float(m["entropy_sum"])
        loss_value, grad_norm, applied = optimizer_step(student_model, optimizer, step_loss, cfg.max_grad_norm)
        skipped = not applied
    else:  # no student token on any process: nothing to learn, no step (and nothing skipped)
        loss_value, grad_norm, applied, skipped = 0.0, 0.0, False, False
    kl_total, entropy_total = all_reduce_sum(torch.tensor([kl_sum, entropy_sum], dtype=torch.float64)).tolist()
    return {
        "opsd/loss": loss_value,  # clipped KL, token mean
        "opsd/kl": kl_total / max(num_tokens, 1.0),  # unclipped KL(teacher || student), token mean, before the step
        "opsd/student_entropy": entropy_total / max(num_tokens, 1.0),
        "opsd/grad_norm": grad_norm,
        "opsd/optimizer_steps": float(applied),  # as grpo/optimizer_steps: applied steps only
        "opsd/skipped_steps": float(skipped),  # a non-finite loss or gradient
        "opsd/loss_tokens": num_tokens,
    }


@torch.no_grad()
def opsd_kl(student_model, teacher_model, pairs: list[Pair], tokenizer, cfg, threshold: float = 1.0) -> dict:
    """Unclipped forward KL(teacher || student), token means over all pairs' loss tokens on all processes:
    {"all", "correct", "incorrect"}, the last two over pairs whose student is correct / incorrect (absent when no
    process has such a pair)."""
    device = next(student_model.parameters()).device
    sums = torch.zeros(6, dtype=torch.float64)  # kl, tokens: all, correct students, incorrect students
    for s, (student, teacher) in zip(itertools.count(0, cfg.micro_batch_size),
                                     _pair_batches(pairs, tokenizer, cfg.micro_batch_size, device)):
        with as_teacher(teacher_model) as t:
            teacher_h, teacher_w = response_hidden(t, teacher)
        student_h, student_w = response_hidden(student_model, student)
        kl = fused.forward_kl(student_h, teacher_h, student_w, teacher_w, None, cfg.chunk_size, cfg.temperature)
        correct = torch.tensor([pairs[s + int(r)].student.reward >= threshold for r in student.rows.tolist()],
                               dtype=torch.bool)  # (n,) per loss token
        kl = kl.double().cpu()
        sums += torch.stack([kl.sum(), torch.tensor(float(len(kl))), kl[correct].sum(), correct.sum().double(),
                             kl[~correct].sum(), (~correct).sum().double()])
    for model in {id(m): m for m in (student_model, teacher_model)}.values():
        reshard(model)  # (sharded: the gathered root would otherwise stay resident until the next backward)
    sums = all_reduce_sum(sums).tolist()
    out = {"all": sums[0] / max(sums[1], 1.0)}
    for name, i in (("correct", 2), ("incorrect", 4)):
        if sums[i + 1] > 0:
            out[name] = sums[i] / sums[i + 1]
    return out


# ---------------------------------------------------------------- one phase


def phase_metrics(steps: list[dict]) -> dict:
    """Step metrics over the phase: token-weighted means, summed counts (each step's are already global)."""
    tokens = sum(m["opsd/loss_tokens"] for m in steps)
    out = {k: sum(m[k] for m in steps) for k in ("opsd/loss_tokens", "opsd/optimizer_steps", "opsd/skipped_steps")}
    for key in ("opsd/loss", "opsd/kl", "opsd/student_entropy"):
        out[key] = sum(m[key] * m["opsd/loss_tokens"] for m in steps) / tokens if tokens else 0.0
    out["opsd/grad_norm"] = sum(m["opsd/grad_norm"] for m in steps) / max(len(steps), 1)
    return out


def kl_metrics(kl: dict, when: str) -> dict:
    return {f"opsd/kl_{when}" + ("" if k == "all" else f"_{k}"): v for k, v in kl.items()}


@torch.no_grad()
def teacher_diagnostic(policy, pairs: list[Pair], tokenizer, retriever, rollout_cfg, n: int) -> dict:
    """Can the teacher do what the student cannot? Greedy episodes of the teacher (the policy, reference in its
    prompt) and of the student (the policy, normal prompt) on the questions of up to n pairs, one pair per
    question -> exact match of each (means over all processes' questions) and the number of questions."""
    chosen = list({p.student.group_id: p for p in pairs}.values())[:n]
    greedy = dataclasses.replace(rollout_cfg, num_generations=1, greedy=True)
    examples = [p.student.example for p in chosen]
    privileged = [TEACHER_CONTEXT.format(reference=reference_text(tokenizer, p.reference, p.documents))
                  for p in chosen]
    teacher = rollout(policy, tokenizer, examples, retriever, greedy, privileged=privileged)
    student = rollout(policy, tokenizer, examples, retriever, greedy)
    sums = all_sum({"teacher": sum(e.reward for e in teacher), "student": sum(e.reward for e in student),
                    "n": len(chosen)})
    k = max(sums["n"], 1.0)
    return {"opsd/teacher_em": sums["teacher"] / k, "opsd/student_em": sums["student"] / k,
            "opsd/diagnostic_questions": sums["n"]}


def opsd_phase(policy, episodes: list[Episode], tokenizer, cfg, *, seed: int, retriever=None,
               rollout_cfg=None, frozen=None) -> dict:
    """One OPSD phase on fresh on-policy episodes (this process's share) -> namespaced metrics (module docstring).

    cfg attributes: opsd_students, opsd_reference, opsd_max_tokens, max_context_tokens, opsd_lora_rank,
    opsd_lora_alpha, bf16, opsd_lr, lr, weight_decay, opsd_epochs, opsd_batch_size (pairs per optimizer step, all
    processes), opsd_diagnostic_pairs, and those of opsd_step. `seed` orders the pairs; with a retriever and a
    rollout config the teacher diagnostic runs. The policy is trained in place (with LoRA: its merged adapter).
    `frozen`: an unsharded copy of the policy as it is now, if the caller holds one (train.py's decoding copy
    under torchrun): the diagnostic decodes with it and, without LoRA, it is the teacher; None = made here.
    """
    # 1-2. pairs, each with its teacher prompt within the length bound
    pairs, mined = mine_pairs(episodes, students=cfg.opsd_students)
    if cfg.opsd_reference == "mismatched":  # the control: does the reference's content matter?
        pairs = mismatch_references(pairs)
    positions = getattr(policy.config.get_text_config(), "max_position_embeddings", None) or math.inf
    max_tokens = min(cfg.opsd_max_tokens or cfg.max_context_tokens, positions)
    references = list({id(p.reference): p.reference for p in pairs}.values())
    sums = all_sum({"groups": mined["groups"], "skipped_groups": mined["skipped_groups"], "references": len(references),
                    "reference_searches": sum(r.num_searches for r in references), "mined": len(pairs),
                    "incorrect": sum(p.student.reward < 1.0 for p in pairs)})  # over all processes
    pairs, bounded = bound_teacher_prompts(pairs, tokenizer, max_tokens)
    bounded = all_sum(bounded | {"pairs": len(pairs)})  # the pairs trained on: mined, minus those over the bound
    metrics = {f"opsd/{k}": v for k, v in bounded.items()}
    metrics |= {"opsd/groups": sums["groups"], "opsd/skipped_groups": sums["skipped_groups"],
                "opsd/reference_searches": sums["reference_searches"] / max(sums["references"], 1.0),
                "opsd/incorrect_students": sums["incorrect"] / max(sums["mined"], 1.0)}
    if cfg.opsd_diagnostic_pairs and retriever is not None:  # before any step: the policy is the teacher now
        metrics |= teacher_diagnostic(policy if frozen is None else frozen, pairs, tokenizer, retriever, rollout_cfg,
                                      cfg.opsd_diagnostic_pairs)

    # 3. the teacher, frozen at the start of the phase: the policy with a fresh adapter turned off (LoRA, the
    #    paper's way: no copy), or a copy of the policy (full fine-tuning; in bf16 under --bf16)
    if cfg.opsd_lora_rank:
        trainable = {name: p.requires_grad for name, p in policy.named_parameters()}
        student = teacher = add_adapter(policy, cfg.opsd_lora_rank, cfg.opsd_lora_alpha or 2 * cfg.opsd_lora_rank)
    else:
        teacher = frozen if frozen is not None else frozen_copy(policy, torch.bfloat16 if cfg.bf16 else None)
        student = policy
    params = [p for p in student.parameters() if p.requires_grad]  # the adapter, or the whole policy
    optimizer = torch.optim.AdamW(params, lr=cfg.opsd_lr or cfg.lr, weight_decay=cfg.weight_decay)
    metrics |= kl_metrics(opsd_kl(student, teacher, pairs, tokenizer, cfg), "before")

    # 4-5. optimizer steps; every process takes the same number (gradients are all-reduced), some maybe empty
    per_rank = max(cfg.opsd_batch_size // world_size(), 1)
    num_steps = -(-max_over_ranks(len(pairs)) // per_rank)
    rng, steps = random.Random(seed), []
    for _ in range(cfg.opsd_epochs):
        order = rng.sample(pairs, len(pairs))
        for i in range(num_steps):
            steps.append(opsd_step(student, teacher, optimizer, order[i * per_rank:(i + 1) * per_rank], tokenizer,
                                   cfg))
    metrics |= phase_metrics(steps)

    # 6. what the phase did to the KL on its own pairs; the adapter goes into the weights GRPO trains next
    metrics |= kl_metrics(opsd_kl(student, teacher, pairs, tokenizer, cfg), "after")
    if cfg.opsd_lora_rank:
        merge_adapter(student, trainable)
    return metrics
