"""Distributed plumbing shared by both objectives: sums over processes and the optimizer step.

    loss, grad_norm, applied = optimizer_step(model, optimizer, loss, max_grad_norm)   # grpo.py, opsd.py

One process: every function here is the identity or a plain local step. Under `torchrun` (gloo on CPU, NCCL on
GPU) each process holds its shard of the episodes; losses are divided by normalisers counted over all processes,
so the SUM of the per-process gradients is the gradient of the global loss.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


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
