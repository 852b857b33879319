"""Chunked `lm_head -> log_softmax` without materialising (tokens x vocab) logits.

    hidden, weight = hidden_states(model, input_ids, attention_mask)   # (B, L, H), (V, H): no logits computed
    logps = token_logprobs(hidden[rows], weight, targets)             # (N,)  log p(target | prefix)
    kl = forward_kl(student_h, teacher_h, weight, teacher_weight, clip=1.0)  # (N,)  KL(teacher || student)
    batch = pad_batch(prompts, responses, loss_masks, device)          # episodes -> tensors (grpo.py, opsd.py)
    logps, entropy = response_logprobs(model, batch, chunk_size, temperature)   # (B, T) at the loss tokens

With z = h W^T / temperature (one row per token, V entries), p = softmax(z):

    token_logprobs:  log p[target] = z[target] - logsumexp(z)
    forward_kl:      sum_v min(clip, p_T[v] (log p_T[v] - log p_S[v]))      (clip=None: no min)

Qwen2.5's vocabulary has 151,936 entries, so 32k tokens of fp32 logits take ~20 GB, and autograd keeps several
such tensors (logits, log_softmax, their gradients). Here the rows are processed `chunk_size` at a time and
nothing of size (N, V) is kept: the backward recomputes each chunk's logits from the saved hidden states and
weight (activation checkpointing, restricted to the lm_head). Peak extra memory is O(chunk_size x V) plus one fp32
(V, H) gradient accumulator, at the price of one more (N x H x V) matmul. forward_kl(reduction="sum"), the OPSD
loss, instead computes its gradient during the forward (its incoming gradient is one scalar), so it needs no
recomputation. The numbers are those of the naive version (tests/test_fused.py). Liger-Kernel does the same with
Triton kernels (GPU only); this is plain PyTorch and runs anywhere. bench/bench_fused.py measures both.

Precision: each chunk's logits are computed in the lm_head weight's dtype, autocast or not, and upcast to fp32, so
log_softmax and the KL always run in fp32 and the weight gradient is accumulated in fp32. Under --bf16 the policy
keeps fp32 weights (parallel.py), so its log-probs come from an fp32 head over the bf16-computed hidden states; a
frozen bf16 reference or teacher computes its head in bf16 (as `logits.float()` in transformers).
Out of scope: heads that are not a plain linear map, e.g. a final logit softcapping (Gemma 2), a logit scale
(Cohere, Granite) or an lm_head bias; `hidden_states` refuses those models.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors; fp32 and fp64 stay as they are (gradcheck runs in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # In the weight's dtype, whatever autocast says (fp32 for the policy's master weights; module docstring)
    with torch.autocast(h.device.type, enabled=False):
        z = _upcast(h.to(weight.dtype) @ weight.T)  # (c, V), then upcast
    return z.div_(temperature) if temperature != 1.0 else z


# In-place versions of torch's own kernels, computed in the same order ((z - max) first), so that the numbers
# match the naive version even for logits in the thousands, and a chunk costs one (c, V) buffer, not three.


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """log softmax(z) in place: (z - max) - log(sum(exp(z - max))); one (c, V) temporary for the sum."""
    z -= z.amax(-1, keepdim=True)
    return z.sub_(z.exp().sum(-1, keepdim=True).log_())  # (c, V)


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """softmax(z) in place: exp(z - max) / sum."""
    z -= z.amax(-1, keepdim=True)
    z.exp_()
    return z.div_(z.sum(-1, keepdim=True))  # (c, V)


def _log_softmax_at_(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[targets] (c,), destroying z, without any (c, V) temporary."""
    z -= z.amax(-1, keepdim=True)
    at = z.gather(1, targets[:, None]).squeeze(1)  # (c,)
    return at - z.exp_().sum(-1).log_()


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)  # (c,)


def _accumulate_grads(dz, h, weight, grad_h, grad_w, rows):
    """Chain d(loss)/d(logits) of a chunk (c, V) through logits = h @ weight.T (the 1/temperature already in dz)."""
    with torch.autocast(h.device.type, enabled=False):
        if grad_h is not None:
            grad_h[rows] = (dz.to(weight.dtype) @ weight).to(grad_h.dtype)  # (c, H)
        if grad_w is not None:
            grad_w.addmm_(dz.T, _upcast(h).to(grad_w.dtype))  # (V, H) += (V, c) @ (c, H), accumulated in fp32


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, with_entropy):
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=_upcast(hidden).dtype)  # (N,)
        entropy = logps.new_empty(n if with_entropy else 0)  # (N,) for metrics only
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            z = _logits(hidden[c], weight, temperature)  # (c, V)
            if with_entropy:
                logp = _log_softmax_(z)  # (c, V)
                logps[c] = logp.gather(1, targets[c, None]).squeeze(1)
                entropy[c] = _entropy(logp)
            else:
                logps[c] = _log_softmax_at_(z, targets[c])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            c = slice(s, s + ctx.chunk_size)
            # d log p[t] / d z = onehot(t) - p, times the incoming gradient g and the 1/temperature of z
            g = (grad_logps[c] / ctx.temperature)[:, None]  # (c, 1)
            dz = _softmax_(_logits(hidden[c], weight, ctx.temperature)).mul_(-g)  # (c, V) -g p
            dz.scatter_add_(1, targets[c, None], g.to(dz.dtype))
            _accumulate_grads(dz, hidden[c], weight, grad_h, grad_w, c)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def _kl_chunk(logp, logp_t, clip, with_grad):
    """Per-row clipped KL (c,), unclipped KL (c,) and, if asked, d(sum of clipped KL)/d(student logits) (c, V).

    logp, logp_t: student and teacher log-probs (c, V); both are overwritten.
    """
    p_t = logp_t.exp()  # (c, V)
    terms = logp_t.sub_(logp).mul_(p_t)  # (c, V) p_T (log p_T - log p_S), in logp_t's buffer
    kl_unclipped = terms.sum(-1)  # (c,)
    kl, keep = kl_unclipped, None
    if clip is not None:
        keep = terms <= clip if with_grad else None  # (c, V) where the gradient passes (as clamp's backward)
        kl = terms.clamp_(max=clip).sum(-1)  # (c,)
    if not with_grad:
        return kl, kl_unclipped, None
    a = p_t.neg_()  # (c, V) d term / d log p_S = -p_T, zero where clipped
    if keep is not None:
        a *= keep
    # through log_softmax: d/dz = a - p_S * sum(a)
    return kl, kl_unclipped, a.sub_(logp.exp_().mul_(a.sum(-1, keepdim=True)))


class _ForwardKL(torch.autograd.Function):
    """Per-row KL (reduction "none": the backward recomputes each chunk) or its sum (reduction "sum": the
    gradient is computed during the forward, Liger-Kernel's trick, so no logits are computed twice)."""

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size, temperature, reduction,
                with_grad, with_stats):
        n = hidden.shape[0]
        kl = hidden.new_empty(n, dtype=_upcast(hidden).dtype)  # (N,) the loss: clipped terms summed
        kl_unclipped = kl.new_empty(n if with_stats else 0)  # (N,) the true KL, for metrics
        entropy = kl.new_empty(n if with_stats else 0)  # (N,) of the student, for metrics
        grad_now = reduction == "sum" and with_grad
        # (only what needs one: a frozen head, as in LoRA OPSD, gets no (V, H) accumulator and no extra matmul)
        grad_h = torch.empty_like(hidden) if grad_now and ctx.needs_input_grad[0] else None  # (N, H)
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if grad_now and ctx.needs_input_grad[2] \
            else None  # (V, H)
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            logp = _log_softmax_(_logits(hidden[c], weight, temperature))  # (c, V) student
            logp_t = _log_softmax_(_logits(teacher_hidden[c], teacher_weight, temperature))  # (c, V) teacher
            if with_stats:
                entropy[c] = _entropy(logp)
            kl[c], unclipped, dz = _kl_chunk(logp, logp_t, clip, grad_now)
            if with_stats:
                kl_unclipped[c] = unclipped
            if grad_now:
                _accumulate_grads(dz.div_(temperature), hidden[c], weight, grad_h, grad_w, c)
        if grad_now:
            ctx.save_for_backward(grad_h, grad_w)
        else:
            ctx.save_for_backward(hidden, teacher_hidden, weight, teacher_weight)
        ctx.clip, ctx.chunk_size, ctx.temperature = clip, chunk_size, temperature
        ctx.grad_now, ctx.weight_dtype = grad_now, weight.dtype
        ctx.mark_non_differentiable(kl_unclipped, entropy)
        return (kl.sum() if reduction == "sum" else kl), kl_unclipped, entropy

    @staticmethod
    def backward(ctx, grad_kl, _grad_unclipped, _grad_entropy):
        # The teacher is a constant: no gradient for its hidden states or weight, even if they require one.
        nones = (None,) * 7
        if ctx.grad_now:  # computed in the forward; scale by the incoming scalar gradient
            grad_h, grad_w = ctx.saved_tensors
            grad_h = grad_h * grad_kl if grad_h is not None else None
            grad_w = (grad_w * grad_kl).to(ctx.weight_dtype) if grad_w is not None else None
            return grad_h, None, grad_w, *nones
        hidden, teacher_hidden, weight, teacher_weight = ctx.saved_tensors
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            c = slice(s, s + ctx.chunk_size)
            logp = _log_softmax_(_logits(hidden[c], weight, ctx.temperature))  # (c, V) recomputed
            logp_t = _log_softmax_(_logits(teacher_hidden[c], teacher_weight, ctx.temperature))  # (c, V)
            _, _, dz = _kl_chunk(logp, logp_t, ctx.clip, True)  # (c, V)
            dz *= grad_kl[c, None] / ctx.temperature
            _accumulate_grads(dz, hidden[c], weight, grad_h, grad_w, c)
        return grad_h, None, None if grad_w is None else grad_w.to(weight.dtype), *nones


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                   temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(hidden @ weight.T / temperature)[targets] per row: (N,) fp32 (fp64 for fp64 inputs).

    hidden (N, H), weight (V, H) (the lm_head weight), targets (N,) int64. Differentiable in hidden and weight.
    `return_entropy=True` also returns the entropy of each row's distribution (N,), without gradient.
    """
    logps, entropy = _TokenLogprobs.apply(hidden, weight, targets, chunk_size, temperature, return_entropy)
    return (logps, entropy) if return_entropy else logps


def forward_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
               teacher_weight: torch.Tensor, clip: float | None = None, chunk_size: int = 1024,
               temperature: float = 1.0, reduction: str = "none", return_stats: bool = False):
    """Per-row KL(teacher || student) over the full vocabulary, each entry's term clipped from above: (N,).

    student_hidden, teacher_hidden (N, H); weight, teacher_weight (V, H), possibly the same tensor. The teacher
    is treated as a constant (no gradient); gradients flow to student_hidden and weight.
    reduction="sum" returns the sum over rows (a scalar) and computes its gradient during the forward: two
    (N x H x V) matmuls fewer than "none", whose backward recomputes the student's and the teacher's logits.
    `return_stats=True` returns (kl, unclipped kl per row, student entropy per row), the last two without gradient.
    """
    if reduction not in ("none", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose none or sum")
    with_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or weight.requires_grad)
    kl, kl_unclipped, entropy = _ForwardKL.apply(student_hidden, teacher_hidden, weight, teacher_weight, clip,
                                                 chunk_size, temperature, reduction, with_grad, return_stats)
    return (kl, kl_unclipped, entropy) if return_stats else kl


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Final hidden states (B, L, H) and the lm_head weight (V, H) of a transformers causal LM, no logits computed.

    Right padding: position ids count real tokens only. `logits = hidden @ weight.T` holds for models whose head
    is one bias-free linear layer (Llama, Qwen2/2.5/3, Mistral, ...); others are refused rather than silently
    computed wrong.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise ValueError(f"fused log-probs assume logits = hidden @ lm_head.weight.T; "
                             f"{type(model).__name__} has {name}={getattr(config, name)}")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"fused log-probs assume a bias-free lm_head; {type(model).__name__}'s has a bias")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    if hasattr(model, "hidden_and_head"):  # a sharded model (parallel.shard): one FSDP forward of the root
        return model.hidden_and_head(input_ids, attention_mask, position_ids)
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
    return out.last_hidden_state, head.weight


# ---------------------------------------------------------------- episodes as batches of token ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) prompt + response, right-padded with 0 (never read: attention_mask says)
    attention_mask: torch.Tensor  # (B, L) 1 on real tokens, from lengths
    loss_mask: torch.Tensor  # (B, T) response positions, 1 = trained
    rows: torch.Tensor  # (n,) batch row of each loss token
    cols: torch.Tensor  # (n,) its response position t
    positions: torch.Tensor  # (n,) position of the hidden state that predicts it: len(prompt) + t - 1
    targets: torch.Tensor  # (n,) the token


def pad_batch(prompts: list[list[int]], responses: list[list[int]], loss_masks: list[list[int]], device) -> Batch:
    """Right-padded tensors for prompt + response sequences; every mask comes from lengths and loss masks."""
    B, L, T = len(prompts), max(len(p) + len(r) for p, r in zip(prompts, responses)), max(map(len, responses))
    input_ids = torch.zeros(B, L, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros(B, L, dtype=torch.long)  # (B, L)
    loss_mask = torch.zeros(B, T, dtype=torch.long)  # (B, T)
    rows, cols, positions = [], [], []
    for b, (p, r, m) in enumerate(zip(prompts, responses, loss_masks)):
        assert p and len(r) == len(m), "a prompt is never empty; a loss mask is as long as its response"
        input_ids[b, :len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[b, :len(p) + len(r)] = 1
        loss_mask[b, :len(m)] = torch.tensor(m, dtype=torch.long)
        ts = [t for t, keep in enumerate(m) if keep]
        rows += [b] * len(ts)
        cols += ts
        positions += [len(p) + t - 1 for t in ts]
    rows, cols, positions = (torch.tensor(x, dtype=torch.long) for x in (rows, cols, positions))
    targets = input_ids[rows, positions + 1]  # (n,)
    return Batch(*(x.to(device) for x in (input_ids, attention_mask, loss_mask, rows, cols, positions, targets)))


def response_hidden(model, batch: Batch):
    """Final hidden states at the loss tokens' predicting positions (n, H), and the lm_head weight (V, H)."""
    hidden, weight = hidden_states(model, batch.input_ids, batch.attention_mask)  # (B, L, H), (V, H)
    return hidden[batch.rows, batch.positions], weight


def response_logprobs(model, batch: Batch, chunk_size: int, temperature: float):
    """log pi(token | prefix) at loss tokens as (B, T) (0 elsewhere), and the policy entropy there (n,)."""
    h, weight = response_hidden(model, batch)  # (n, H), (V, H)
    logp, entropy = token_logprobs(h, weight, batch.targets, chunk_size, temperature, return_entropy=True)
    logps = logp.new_zeros(batch.loss_mask.shape).index_put((batch.rows, batch.cols), logp)  # (B, T)
    return logps, entropy
