"""GRPO: group-relative advantages, the PPO-clip surrogate with a k3 KL to a reference, and one update.

    metrics = grpo_step(policy, ref_model, optimizer, episodes, cfg)   # called by train.py once per rollout batch

Objective, maximised over the policy pi (Shao et al. 2024, DeepSeekMath; as Search-R1 runs it):

    J = 1/Z * sum_i sum_t m_it * [ min(ratio_it * A_i, clipped_ratio_it * A_i) - beta * k3_it ]
    ratio_it         = pi(y_it | prefix) / pi_old(y_it | prefix)
    clipped_ratio_it = clip(ratio_it, 1 - epsilon, 1 + epsilon_high)          (epsilon_high = epsilon by default)
    k3_it            = pi_ref / pi - log(pi_ref / pi) - 1                        (per token, at the sampled token)
    A_i              = (R_i - mean_g R) / (std_g R + 1e-6)                      (scale_rewards="group")

m_it is the loss mask: 1 on tokens the policy sampled, 0 on retrieved text and padding. R_i is the episode's
reward (exact match), the advantage A_i is shared by all its tokens, g is its group (the G samples of one
question), std is the unbiased sample std. scale_rewards="batch" divides by the std of the whole batch instead,
"none" does not divide (Dr. GRPO).

The normaliser Z (loss_type), always over the whole mini-batch (one optimizer step), on all processes:
    token_mean: the number of loss tokens (Search-R1's default)
    seq_mean:   each sequence's token mean, then the mean over sequences (the original GRPO)
    dr_grpo:    B * cfg.max_context_tokens, a constant (Dr. GRPO's MAX_TOKENS; here the episode token budget)
Micro-batches divide by the same Z, so gradient accumulation gives the gradient of one big batch.

Deviations from the paper and from Search-R1's code (verl), numbered:
1. token_mean divides by the token count of the whole mini-batch; verl (as Search-R1 ran it) takes a token mean
   per micro-batch and averages the micro-batches, so tokens of short micro-batches weigh more.
2. A group whose rewards are all equal gets advantage exactly 0, a single-sample group included; verl gives a
   single-sample group r / (1 + eps), and (r - mean) rounding could make tiny non-zero advantages elsewhere.
3. k3 is not clamped; verl's `low_var_kl` clamps it to [-10, 10], which zeroes the gradient of far-off tokens.
4. Options the paper does not use, off by default: epsilon_high (DAPO), scale_rewards batch/none, loss_type
   seq_mean/dr_grpo, mask_truncated_completions, num_iterations > 1, mini_batch_size < batch.
Optimizer steps per rollout batch = num_iterations * ceil(episodes / mini_batch_size). Search-R1's defaults
(train.py: 512 questions x 5 = 2,560 episodes in mini-batches of 256 x 5 = 1,280) give two: the first step's
ratio is exactly 1, the second's is pi / pi_old with pi_old = the policy before the first, so the clip can bind.
With one step per batch (mini_batch_size = the whole batch), pi_old is the current policy (detached): ratio = 1,
the clip never binds, and the gradient is the plain policy gradient with the group baseline.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fused import pad_batch, response_logprobs
from parallel import all_gather, all_reduce_sum, optimizer_step, reshard

ADV_EPS = 1e-6  # verl's compute_grpo_outcome_advantage, as Search-R1 uses it (TRL uses 1e-4)


# ---------------------------------------------------------------- pure functions


def compute_advantages(rewards, group_ids, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantages (N,): reward minus its group's mean, divided per `scale_rewards`.

    group: by the group's unbiased std (GRPO, Search-R1/verl, TRL's default); batch: by the std of all rewards in
    the batch, on all processes (TRL's scale_rewards="batch"); none: not divided (Dr. GRPO).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # (N,)
    ids = torch.as_tensor(group_ids)  # (N,)
    advantages = torch.zeros_like(rewards)  # (N,)
    for g in ids.unique():
        idx = ids == g  # (N,)
        r = rewards[idx]  # (G,)
        if r.max() == r.min():  # all equal, or one sample: no signal. Exactly 0, not rounding noise / eps
            continue
        advantages[idx] = r - r.mean()
        if scale_rewards == "group":
            advantages[idx] /= r.std() + ADV_EPS
    if scale_rewards == "batch":
        advantages /= all_gather(rewards).std() + ADV_EPS
    elif scale_rewards not in ("group", "none"):
        raise ValueError(f"scale_rewards={scale_rewards!r}: choose group, batch or none")
    return advantages


def policy_loss(logps, old_logps, advantages, loss_mask, *, epsilon: float = 0.2, epsilon_high: float | None = None,
                loss_type: str = "token_mean", ref_logps=None, beta: float = 0.0, normaliser: float | None = None):
    """Clipped surrogate (+ beta * k3) on (B, T) per-token tensors -> (loss, metrics).

    `normaliser` is Z of the module docstring, computed by the caller over the whole mini-batch; None = from this
    batch alone (token_mean: its loss tokens, seq_mean: B, dr_grpo: B * T). Masked positions must hold finite
    values. Metrics are token means over this batch's loss tokens, without gradient.
    """
    mask = loss_mask.to(logps.dtype)  # (B, T)
    adv = advantages.to(logps.dtype).unsqueeze(-1)  # (B, 1)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)  # (B, T)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)  # (B, T)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)  # (B, T)
    kl = None
    if ref_logps is not None and beta > 0:
        # k3, Schulman, "Approximating KL Divergence" (2020): unbiased, non-negative, low variance
        log_r = ref_logps - logps  # (B, T)
        kl = torch.exp(log_r) - log_r - 1  # (B, T)
        per_token = per_token + beta * kl  # (B, T)

    if loss_type == "token_mean":
        loss = (per_token * mask).sum() / (mask.sum().clamp(min=1) if normaliser is None else normaliser)
    elif loss_type == "seq_mean":
        per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # (B,) TRL's "grpo" loss
        loss = per_seq.sum() / (per_seq.shape[0] if normaliser is None else normaliser)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.numel() if normaliser is None else normaliser)
    else:
        raise ValueError(f"loss_type={loss_type!r}: choose token_mean, seq_mean or dr_grpo")

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        # tokens whose gradient the clip removed (TRL's low/high clip ratio, summed)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))  # (B, T)
        metrics = {"clip_fraction": (clipped * mask).sum() / n, "ratio_mean": (ratio * mask).sum() / n}
        if kl is not None:
            metrics["kl"] = (kl * mask).sum() / n
    return loss, metrics


# ---------------------------------------------------------------- one update


def grpo_step(policy, ref_model, optimizer, episodes, cfg) -> dict:
    """One GRPO update over a rollout batch (this process's episodes) -> namespaced metrics.

    cfg attributes: epsilon, epsilon_high, beta, loss_type, scale_rewards, mask_truncated_completions,
    micro_batch_size, mini_batch_size (None/0 = whole batch), num_iterations, max_grad_norm, chunk_size,
    temperature, and max_context_tokens for loss_type="dr_grpo".
    """
    device = next(policy.parameters()).device
    n = len(episodes)
    micro = cfg.micro_batch_size
    mini = cfg.mini_batch_size or n
    num_iterations = getattr(cfg, "num_iterations", 1) or 1

    # 1. advantages from rewards; groups never straddle processes
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float32)  # (N,)
    group_ids = [e.group_id for e in episodes]
    advantages = compute_advantages(rewards, group_ids, cfg.scale_rewards).to(device)  # (N,)
    groups = {}
    for e in episodes:
        groups.setdefault(e.group_id, []).append(e.reward)
    zero_std_groups = sum(max(r) == min(r) for r in groups.values())

    # 2. loss masks from provenance: rollout's mask, all zeros for truncated episodes if asked (TRL, DAPO)
    loss_masks = [[0] * len(e.loss_mask) if cfg.mask_truncated_completions and e.is_truncated else list(e.loss_mask)
                  for e in episodes]

    def batch_of(idx):
        return pad_batch([episodes[i].prompt_ids for i in idx], [episodes[i].response_ids for i in idx],
                         [loss_masks[i] for i in idx], device)

    def all_logprobs(model):  # (N, T_max), no grad
        out = torch.zeros(n, max(len(e.response_ids) for e in episodes), device=device)
        for s in range(0, n, micro):
            batch = batch_of(range(s, min(s + micro, n)))
            logps, _ = response_logprobs(model, batch, cfg.chunk_size, cfg.temperature)  # (b, T)
            out[s:s + logps.shape[0], :logps.shape[1]] = logps
        return out

    # 3. old log-probs (only needed when the policy moves within the batch) and reference log-probs
    num_steps = num_iterations * math.ceil(n / mini)
    with torch.no_grad():
        old_all = all_logprobs(policy) if num_steps > 1 else None
        ref_all = all_logprobs(ref_model) if cfg.beta > 0 and ref_model is not None else None
        if ref_all is not None:
            reshard(ref_model)  # (sharded: its gathered root would otherwise stay resident)

    # 4. updates: mini-batches (optimizer steps) of micro-batches (forward/backward), normaliser per mini-batch
    sums = dict.fromkeys(["tokens", "clip_fraction", "ratio_mean", "kl", "entropy"], 0.0)
    losses, grad_norms, skipped = [], [], 0
    for _ in range(num_iterations):
        for start in range(0, n, mini):
            idx_mini = list(range(start, min(start + mini, n)))
            num_seqs = all_reduce_sum(torch.tensor(float(len(idx_mini))))
            num_tokens = all_reduce_sum(torch.tensor(float(sum(sum(loss_masks[i]) for i in idx_mini))))
            if num_tokens == 0:  # nothing trained on any process: no step (AdamW would still move)
                continue
            if cfg.loss_type == "token_mean":
                normaliser = num_tokens.item()
            elif cfg.loss_type == "seq_mean":
                normaliser = num_seqs.item()
            else:  # dr_grpo
                normaliser = num_seqs.item() * cfg.max_context_tokens
            step_loss = torch.zeros((), device=device)
            for s in range(0, len(idx_mini), micro):
                idx = idx_mini[s:s + micro]
                batch = batch_of(idx)
                logps, entropy = response_logprobs(policy, batch, cfg.chunk_size, cfg.temperature)  # (b, T), (n,)
                T = logps.shape[1]
                old = old_all[idx, :T] if old_all is not None else logps.detach()  # (b, T)
                ref = ref_all[idx, :T] if ref_all is not None else None  # (b, T)
                loss, m = policy_loss(logps, old, advantages[idx], batch.loss_mask, epsilon=cfg.epsilon,
                                      epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type, ref_logps=ref,
                                      beta=cfg.beta, normaliser=normaliser)
                loss.backward()
                step_loss += loss.detach()
                tokens = float(batch.loss_mask.sum())
                sums["tokens"] += tokens
                sums["entropy"] += float(entropy.sum())
                for k, v in m.items():
                    sums[k] += float(v) * tokens
            loss_value, grad_norm, applied = optimizer_step(policy, optimizer, step_loss, cfg.max_grad_norm)
            losses.append(loss_value)
            grad_norms.append(grad_norm)
            skipped += not applied

    # 5. metrics over the whole step and all processes
    keys = ["tokens", "clip_fraction", "ratio_mean", "kl", "entropy"]
    totals = all_reduce_sum(torch.tensor([sums[k] for k in keys] + [float(rewards.sum()), float(n), len(groups),
                                         zero_std_groups], dtype=torch.float64)).tolist()
    tok = max(totals[0], 1.0)
    all_rewards = all_gather(rewards)
    metrics = {
        "grpo/loss": sum(losses) / max(len(losses), 1),
        "grpo/clip_fraction": totals[1] / tok,
        "grpo/ratio_mean": totals[2] / tok,
        "grpo/entropy": totals[4] / tok,
        "grpo/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        "grpo/zero_std_fraction": totals[8] / max(totals[7], 1.0),
        "grpo/skipped_steps": float(skipped),
        "grpo/optimizer_steps": float(len(losses) - skipped),
        "grpo/loss_tokens": totals[0],
        "reward/mean": totals[5] / max(totals[6], 1.0),
        "reward/std": float(all_rewards.std()) if len(all_rewards) > 1 else 0.0,
    }
    if ref_all is not None:
        metrics["grpo/kl"] = totals[3] / tok  # k3 token mean; absent without a reference model
    return metrics
