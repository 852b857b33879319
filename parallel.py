"""How the model runs on the hardware, shared by both objectives and train.py: processes and precision.

    with autocast(cfg.bf16, device): ...               # bf16 compute, fp32 master weights (train.py, each unit)
    ref = frozen_copy(policy, torch.bfloat16)          # a reference / teacher without gradients, in bf16
    episodes = rollout(for_decoding(policy, cfg.bf16), ...)    # decode with a bf16 copy: a bf16 KV cache
    loss, grad_norm, applied = optimizer_step(model, optimizer, loss, max_grad_norm)   # grpo.py, opsd.py

Processes. One process: every function here is the identity or a plain local step. Under `torchrun` (gloo on
CPU, NCCL on GPU) each process holds its shard of the episodes; losses are divided by normalisers counted over
all processes, so the SUM of the per-process gradients is the gradient of the global loss.

Precision (--bf16). The policy keeps fp32 weights, and AdamW keeps fp32 state, so an update of 1e-6 relative size
is not rounded away (a bf16 weight has 8 bits of mantissa: updates below ~1/256 of a weight vanish, and at lr 1e-6
nearly all do; verl: "create model in fp32, otherwise the optimizer is in bf16, which is incorrect"). Forward
passes run under torch.autocast(bfloat16): matmuls in bf16, the residual stream, norms and softmaxes in fp32, the
rollouts decode with a bf16 copy of the policy (for_decoding), so the KV cache is bf16 too. Bytes per trained
parameter: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) = 16, plus the bf16 copy that autocast keeps of
each weight while a forward region runs, or that a rollout decodes with (2). Models without gradients (the GRPO
reference, the full-fine-tuning OPSD teacher) hold bf16 weights: 2 bytes per parameter. The fused lm_head
(fused.py) computes in its weight's dtype: fp32 for the policy, so per-token log-probs and ratios are not
blurred by bf16 rounding of the logits (an error of ~0.4% of a logit of 20 is a ratio error of ~8%).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist


def autocast(enabled: bool, device) -> torch.autocast:
    """bf16 compute for everything inside (a no-op when not enabled): module docstring, "Precision"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def for_decoding(policy, bf16: bool):
    """The model rollouts decode with: the policy itself, or under --bf16 a bf16 copy made for this rollout (2
    bytes per parameter, freed after it). Decoding the fp32 policy under autocast would keep the KV cache's keys in
    fp32 (the rotary embedding multiplies them by the fp32 residual stream's cos/sin): 1.5x the cache."""
    return frozen_copy(policy, torch.bfloat16) if bf16 else policy


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A copy of `model` for inference only (eval mode, no gradients), its parameters in `dtype` (None: as they
    are). Each parameter is converted on its own while copying, so a bf16 copy of an fp32 model never holds a
    second fp32 set; tied parameters stay tied."""
    memo = {}
    for p in model.parameters():
        if id(p) not in memo:
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity in a single process); bookkeeping numbers, so on NCCL it hops to the GPU."""
    if not distributed():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else x.device
    y = x.detach().to(device, copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


def all_gather(values: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-d tensor over processes (sizes may differ)."""
    if not distributed():
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values.tolist())
    return torch.tensor([v for part in parts for v in part], dtype=values.dtype)


def all_sum(metrics: dict) -> dict:
    """Sum per-process numbers over processes (counts such as pairs mined)."""
    if not distributed():
        return metrics
    keys = sorted(metrics)
    t = all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, t.tolist()))


def all_mean(metrics: dict) -> dict:
    """Average per-process metrics over processes (rank-local quantities such as rollout statistics)."""
    return {k: v / world_size() for k, v in all_sum(metrics).items()}


def max_over_ranks(value: int) -> int:
    if not distributed():
        return value
    t = torch.tensor([value])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_grads(model) -> None:
    """SUM gradients over processes, once per optimizer step, after local accumulation.

    We do not wrap the model in DDP: losses are computed from the decoder's hidden states (fused.hidden_states),
    which bypasses a DDP wrapper's forward. Normalisers are global, so the sum is the gradient of the global loss.
    A parameter without gradient on this process contributes zeros, so every process joins every all-reduce.
    """
    if not distributed():
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)  # one call per tensor: simple; bucketing would be faster on many GPUs


def optimizer_step(model, optimizer, loss: torch.Tensor, max_grad_norm: float | None) -> tuple[float, float, bool]:
    """All-reduce, clip and apply the accumulated gradients -> (global loss, grad norm, applied).

    A non-finite loss or gradient norm skips the step: the gradients are zeroed, never applied. Every process
    takes the same decision (both numbers are global).
    """
    all_reduce_grads(model)
    loss = float(all_reduce_sum(loss.detach().reshape(1).double()))
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)) if params else 0.0
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, applied
