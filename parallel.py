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
passes run under torch.autocast(bfloat16), without its weight cache (autocast): matmuls in bf16; the residual
stream, norms and softmaxes in fp32. Rollouts decode with an all-bf16 copy of the policy (for_decoding), so the
KV cache is bf16 too. Bytes per trained parameter: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) = 16,
plus 2 for the bf16 casts a forward keeps for its backward, or for the copy a rollout decodes with. Models
without gradients (the GRPO reference, the full-fine-tuning OPSD teacher) hold their matmul weights in bf16 (2
bytes a parameter) and the rest in fp32 (frozen_copy), which makes them compute exactly what the policy
computes. The fused lm_head (fused.py) computes in its weight's dtype, fp32, so per-token log-probs and ratios are
not blurred by bf16 rounding of the logits (an error of ~0.4% of a logit of 20 is a ratio error of ~8%).
"""
from __future__ import annotations

import copy
import math
import types

import torch
import torch.distributed as dist


def autocast(enabled: bool, device) -> torch.autocast:
    """bf16 compute for everything inside (a no-op when not enabled): module docstring, "Precision". Without the
    cast cache: autocast would otherwise keep one bf16 copy of each weight for the whole region, without checking
    its version, so every forward after an optimizer step inside the region would still see the old weights."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


def for_decoding(policy, bf16: bool):
    """The model rollouts decode with: the policy itself, or under --bf16 a bf16 copy made for this rollout (2
    bytes per parameter, freed after it). Decoding the fp32 policy under autocast would keep the KV cache's keys in
    fp32 (the rotary embedding multiplies them by the fp32 residual stream's cos/sin): 1.5x the cache."""
    return frozen_copy(policy, torch.bfloat16, matmuls_only=False) if bf16 else policy


def frozen_copy(model, dtype: torch.dtype | None = None, matmuls_only: bool = True):
    """A copy of `model` for inference only (eval mode, no gradients), in `dtype` (None: as it is).

    matmuls_only: only the decoder's linear layers take `dtype` (the weights autocast would cast to bf16 anyway);
    embeddings, norms and the lm_head keep their fp32, so under autocast the copy computes exactly what `model`
    computes (a bf16 reference gives a KL of 0 at step 0, not bf16 noise), for 2 bytes per matmul parameter.
    Otherwise every parameter takes `dtype` (the decoding copy: a residual stream in bf16 keeps the KV cache bf16).
    Each parameter is converted on its own while copying, so a bf16 copy of an fp32 model never holds a second fp32
    set; tied parameters stay tied."""
    head = {id(p) for p in model.get_output_embeddings().parameters()} if matmuls_only else set()
    linear = {id(p) for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()}
    memo = {}
    for p in model.parameters():
        if id(p) not in memo:
            convert = dtype is not None and (not matmuls_only or (id(p) in linear and id(p) not in head))
            memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype if convert else p.dtype, copy=True),
                                             requires_grad=False)
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def reshard(model) -> None:
    """FSDP2 leaves the root group (embeddings, head) gathered after a forward, expecting a backward; after a
    forward without one (reference and KL passes), shard it again so it does not stay resident."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()


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
    """SUM the gradients FSDP2 does not reduce (plain, replicated parameters: a LoRA adapter on a sharded model),
    once per optimizer step, after local accumulation. Sharded parameters (DTensors) were reduce-scattered by FSDP2
    in backward, summed too (shard). Normalisers are global, so the sum is the gradient of the global loss. A
    parameter without gradient on this process contributes zeros, so every process joins every all-reduce."""
    if not distributed():
        return
    for p in model.parameters():
        if p.requires_grad and not is_dtensor(p):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)  # one call per tensor: an adapter is small


def optimizer_step(model, optimizer, loss: torch.Tensor, max_grad_norm: float | None) -> tuple[float, float, bool]:
    """All-reduce, clip and apply the accumulated gradients -> (global loss, grad norm, applied).

    A non-finite loss or gradient norm skips the step: the gradients are zeroed, never applied. Every process
    takes the same decision (both numbers are global; a sharded model's norm is reduced over its shards).
    """
    all_reduce_grads(model)
    loss = float(all_reduce_sum(loss.detach().reshape(1).double()))
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf) if params else torch.zeros(())
    grad_norm = float(norm.full_tensor() if is_dtensor(norm) else norm)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, applied


# ---------------------------------------------------------------- sharding (FSDP2) and sharded checkpoints


def is_dtensor(x) -> bool:
    return type(x).__name__ == "DTensor"


def is_sharded(model) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def _hidden_and_head(self, input_ids, attention_mask, position_ids):
    """Final hidden states and the lm_head weight, as one FSDP forward of the root (fused.hidden_states calls it):
    the root's hooks then gather the embeddings and the head like any forward would."""
    out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
    return out.last_hidden_state, self.get_output_embeddings().weight


def shard(model, *, bf16: bool, cpu_offload: bool = False):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over every process: each decoder layer is one group, then the
    root (embeddings, final norm and lm_head, which Qwen2.5 ties to the embeddings: FSDP2 forbids one parameter in
    two groups, so they stay together, as torchtitan keeps them). Each process holds 1/W of every weight, gradient
    and AdamW moment. Under --bf16 the layers gather their weights in bf16 (half the traffic; their norm weights
    too, the one difference from one process), matmuls run in bf16 under autocast, the residual stream stays
    fp32, and gradients are reduced in fp32 into the fp32 shards; the root stays fp32, so the lm_head (and the
    log-probs) are fp32 as in one process. Gradients are SUMMED over processes, not averaged (FSDP2's default):
    our normalisers are global."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard, register_fsdp_forward_method)

    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    # (cast_forward_inputs=False: the residual stream stays fp32 as in one process; autocast casts each matmul)
    layers = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=layers, offload_policy=offload)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32), offload_policy=offload)
    for module in model.modules():  # per FSDP group: the root's setting does not reach its children
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # (a plain SUM: gloo has no PREMUL_SUM)
    model.hidden_and_head = types.MethodType(_hidden_and_head, model)
    register_fsdp_forward_method(model, "hidden_and_head")
    return model


def refresh(copy_, model) -> None:
    """Copy `model`'s weights into `copy_` (a plain, unsharded module of the same architecture): each sharded
    parameter is gathered once (full_tensor), one at a time, and converted to the copy's dtype."""
    device, target = next(copy_.parameters()).device, dict(copy_.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            target[name].copy_(p.to(device).full_tensor() if is_dtensor(p) else p)


def save_sharded(path, model, optimizer) -> None:
    """Weights and AdamW state with torch.distributed.checkpoint: every process writes its shards into `path`
    (a folder every process can reach); a different number of processes can load them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))


def load_sharded(path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def full_state_dict(model) -> dict | None:
    """The full weights on rank 0's CPU (every process must call it); None on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if not distributed() or dist.get_rank() == 0 else None
