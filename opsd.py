"""On-policy self-distillation (OPSD): the policy, shown a verified sibling solution, teaches itself without it.

    pairs, stats = mine_pairs(episodes, students="most_different")       # after a fresh rollout of G per question
    teacher = copy.deepcopy(policy).eval().requires_grad_(False)        # frozen at the start of the phase
    metrics = opsd_step(policy, teacher, optimizer, pairs[:64], tokenizer, cfg)

The method (Search-E1, DESIGN.md "The method" 2-4):
1. Pairs. Per question (group of G on-policy samples), the reference is a correct episode (reward >= threshold)
   with the fewest searches (ties: fewest response tokens, then the first). Students are its siblings:
   "most_different" = one sibling, incorrect if any, maximising the distance below; "incorrect" = every
   incorrect sibling; "all" = every sibling. A question with no correct episode gives no pair (counted).
   Distance (ours): 1 - Jaccard similarity of the sets of token ids the two episodes sampled (loss mask 1), so
   different queries, reasoning and answers all count and retrieved text does not.
2. Teacher context (ours, one constant: TEACHER_CONTEXT): the reference's response text (its reasoning, searches,
   retrieved documents and answer, special tokens dropped) appended to the user turn of the normal prompt.
3. Both models score the SAME student response tokens: the student (current policy) after the normal prompt, the
   teacher (frozen policy) after the privileged prompt. Retrieved tokens (loss mask 0) are excluded.
4. Loss, a token mean over all loss tokens of the step (all processes):

       L = 1/N * sum_tokens sum_v min(clip, p_T[v] (log p_T[v] - log p_S[v]))

   forward KL(teacher || student) over the full vocabulary (fused.forward_kl, no logits materialised), each
   entry's term clipped from above so that rare divergent entries cannot dominate; a clipped entry gives no
   gradient. clip = 1.0 (train.py's default): a term exceeds 1 only if p_S < p_T * e^(-1/p_T) (p_T = 1: 0.37,
   0.5: 0.068, 0.2: 0.0013), i.e. where the student all but rules out a token the teacher is sure of; ordinary
   disagreement stays unclipped. None = plain forward KL.
The paper trains a LoRA adapter in this phase; here the whole policy is trained (LoRA is not implemented).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fused
from grpo import all_reduce_sum, optimizer_step, pad_batch, response_hidden
from rollout import Episode, build_prompt

# The privileged context appended to the teacher's user turn; {reference} = the reference episode's response.
TEACHER_CONTEXT = "\n\nA verified correct solution to this question, for reference:\n{reference}\n"


@dataclass
class Pair:
    student: Episode  # the sibling whose sampled tokens are scored
    reference: Episode  # the correct sibling the teacher reads


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


def reference_text(tokenizer, episode: Episode) -> str:
    # Special tokens dropped: an end-of-turn token inside the user turn would end it.
    return tokenizer.decode(episode.response_ids, skip_special_tokens=True).strip()


def teacher_prompt_ids(tokenizer, pair: Pair) -> list[int]:
    """The student's question in the normal prompt, with the reference trajectory appended to the user turn."""
    privileged = TEACHER_CONTEXT.format(reference=reference_text(tokenizer, pair.reference))
    prompt = build_prompt(tokenizer, pair.student.example.question, privileged=privileged)
    # tokenized as rollout.py tokenizes the student's prompt (special tokens only without a chat template)
    return tokenizer(prompt, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids


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
    """(student batch, teacher batch) per micro-batch: same response tokens, different prompts."""
    for s in range(0, len(pairs), micro):
        chunk = pairs[s:s + micro]
        responses = [p.student.response_ids for p in chunk]
        masks = [p.student.loss_mask for p in chunk]
        student = pad_batch([p.student.prompt_ids for p in chunk], responses, masks, device)
        teacher = pad_batch([teacher_prompt_ids(tokenizer, p) for p in chunk], responses, masks, device)
        assert torch.equal(student.targets, teacher.targets)  # row i of both is the same student token
        yield student, teacher


# ---------------------------------------------------------------- one update


def opsd_step(student_model, teacher_model, optimizer, pairs: list[Pair], tokenizer, cfg) -> dict:
    """One optimizer step of OPSD over `pairs` (may be empty on some process) -> namespaced metrics.

    cfg attributes: opsd_clip, micro_batch_size, max_grad_norm, chunk_size, temperature.
    """
    device = next(student_model.parameters()).device
    num_tokens = float(all_reduce_sum(torch.tensor(float(sum(sum(p.student.loss_mask) for p in pairs)))))
    step_loss = torch.zeros((), device=device)
    kl_sum = entropy_sum = 0.0
    if num_tokens > 0:
        for student, teacher in _pair_batches(pairs, tokenizer, cfg.micro_batch_size, device):
            with torch.no_grad():
                teacher_h, teacher_w = response_hidden(teacher_model, teacher)  # (n, H), (V, H)
            student_h, student_w = response_hidden(student_model, student)  # (n, H), (V, H)
            loss, m = opsd_loss(student_h, teacher_h, student_w, teacher_w, clip=cfg.opsd_clip,
                                normaliser=num_tokens, chunk_size=cfg.chunk_size, temperature=cfg.temperature)
            loss.backward()
            step_loss += loss.detach()
            kl_sum += float(m["kl_sum"])
            entropy_sum += float(m["entropy_sum"])
        loss_value, grad_norm, applied = optimizer_step(student_model, optimizer, step_loss, cfg.max_grad_norm)
    else:  # no student token on any process: nothing to learn, no step
        loss_value, grad_norm, applied = 0.0, 0.0, True
    kl_total, entropy_total = all_reduce_sum(torch.tensor([kl_sum, entropy_sum], dtype=torch.float64)).tolist()
    return {
        "opsd/loss": loss_value,  # clipped KL, token mean
        "opsd/kl": kl_total / max(num_tokens, 1.0),  # unclipped KL(teacher || student), token mean, before the step
        "opsd/student_entropy": entropy_total / max(num_tokens, 1.0),
        "opsd/grad_norm": grad_norm,
        "opsd/skipped_steps": float(not applied),
        "opsd/loss_tokens": num_tokens,
    }


@torch.no_grad()
def opsd_kl(student_model, teacher_model, pairs: list[Pair], tokenizer, cfg) -> float:
    """Unclipped forward KL(teacher || student), token mean over all pairs' loss tokens on all processes."""
    device = next(student_model.parameters()).device
    kl_sum, tokens = 0.0, 0.0
    for student, teacher in _pair_batches(pairs, tokenizer, cfg.micro_batch_size, device):
        teacher_h, teacher_w = response_hidden(teacher_model, teacher)
        student_h, student_w = response_hidden(student_model, student)
        kl = fused.forward_kl(student_h, teacher_h, student_w, teacher_w, None, cfg.chunk_size, cfg.temperature)
        kl_sum += float(kl.sum())
        tokens += kl.shape[0]
    kl_sum, tokens = all_reduce_sum(torch.tensor([kl_sum, tokens], dtype=torch.float64)).tolist()
    return kl_sum / max(tokens, 1.0)
