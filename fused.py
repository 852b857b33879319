"""Chunked `lm_head -> log_softmax` without materialising (tokens x vocab) logits.

    hidden, weight = hidden_states(model, input_ids, attention_mask)   # (B, L, H), (V, H): no logits computed
    logps = token_logprobs(hidden[rows], weight, targets)             # (N,)  log p(target | prefix)
    kl = forward_kl(student_h, teacher_h, weight, teacher_weight, clip=1.0)  # (N,)  KL(teacher || student)

With z = h W^T / temperature (one row per token, V entries), p = softmax(z):

    token_logprobs:  log p[target] = z[target] - logsumexp(z)
    forward_kl:      sum_v min(clip, p_T[v] (log p_T[v] - log p_S[v]))      (clip=None: no min)

Qwen2.5's vocabulary has 151,936 entries, so 32k tokens of fp32 logits take ~20 GB, and autograd keeps several
such tensors (logits, log_softmax, their gradients). Here the rows are processed `chunk_size` at a time and only
per-row scalars (the logsumexp) are saved; the backward recomputes each chunk's logits from the saved hidden
states and weight (activation checkpointing, restricted to the lm_head). Peak extra memory is O(chunk_size x V)
plus one fp32 (V, H) gradient accumulator, at the price of one more (N x H x V) matmul. The numbers are those of
the naive version (tests/test_fused.py). Liger-Kernel does the same with Triton kernels (GPU only); this is plain
PyTorch and runs anywhere.

bf16/fp16 inputs: each chunk's logits are computed in the input dtype and upcast to fp32 (as `logits.float()` in
transformers), so softmax, logsumexp and the KL run in fp32; the weight gradient is accumulated in fp32.
Out of scope: heads that are not a plain linear map, e.g. a final logit softcapping (Gemma 2), a logit scale
(Cohere, Granite) or an lm_head bias; `hidden_states` refuses those models.
"""
from __future__ import annotations

import torch


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision tensors; fp32 and fp64 stay as they are (gradcheck runs in fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _logits(h: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = _upcast(h @ weight.T)  # (c, V) in the input dtype, then fp32
    return z / temperature if temperature != 1.0 else z


def _log_softmax_(z: torch.Tensor) -> torch.Tensor:
    """z -> log softmax(z) in place, computed as torch does: (z - max) - log(sum(exp(z - max))).

    Returns each row's (max, log-sum) (c, 2), to redo exactly this on the chunk recomputed in the backward:
    a single saved logsumexp would round at the logits' magnitude (1e-4 at 1,000) and lose precision there.
    """
    row_max = z.amax(-1, keepdim=True)  # (c, 1)
    z -= row_max
    log_sum = z.exp().sum(-1, keepdim=True).log_()  # (c, 1)
    z -= log_sum
    return torch.cat([row_max, log_sum], dim=-1)  # (c, 2)


def _redo_log_softmax_(z: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return z.sub_(stats[:, :1]).sub_(stats[:, 1:])  # (c, V)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature):
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=_upcast(hidden).dtype)  # (N,)
        stats = logps.new_empty(n, 2)  # (N, 2) each row's softmax normaliser, saved for the backward
        entropy = torch.empty_like(logps)  # (N,) of softmax(z), for metrics only
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            logp = _logits(hidden[c], weight, temperature)  # (c, V) logits ...
            stats[c] = _log_softmax_(logp)  # ... turned into log p in place
            logps[c] = logp.gather(1, targets[c, None]).squeeze(1)
            entropy[c] = _entropy(logp)
        ctx.save_for_backward(hidden, weight, targets, stats)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, targets, stats = ctx.saved_tensors
        chunk_size, temperature = ctx.chunk_size, ctx.temperature
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk_size):
            c = slice(s, s + chunk_size)
            h = hidden[c]  # (c, H)
            p = _redo_log_softmax_(_logits(h, weight, temperature), stats[c]).exp_()  # (c, V) softmax
            # d log p[t] / d z = onehot(t) - p, times the incoming gradient and the 1/temperature of z
            dz = p.neg_()  # (c, V)
            dz.scatter_add_(1, targets[c, None], torch.ones_like(stats[c, :1]))
            dz *= grad_logps[c, None] / temperature
            if grad_h is not None:
                grad_h[c] = dz.to(weight.dtype) @ weight  # (c, H)
            if grad_w is not None:
                grad_w.addmm_(dz.T, _upcast(h))  # (V, H) += (V, c) @ (c, H)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


class _ForwardKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size, temperature):
        n = hidden.shape[0]
        kl = hidden.new_empty(n, dtype=_upcast(hidden).dtype)  # (N,) the loss: clipped terms summed
        kl_unclipped = torch.empty_like(kl)  # (N,) the true KL, for metrics
        entropy = torch.empty_like(kl)  # (N,) of the student, for metrics
        stats = kl.new_empty(n, 2)  # (N, 2) student softmax normaliser
        stats_t = kl.new_empty(n, 2)  # (N, 2) teacher softmax normaliser
        for s in range(0, n, chunk_size):
            c = slice(s, s + chunk_size)
            logp = _logits(hidden[c], weight, temperature)  # (c, V) student logits ...
            logp_t = _logits(teacher_hidden[c], teacher_weight, temperature)  # (c, V) teacher logits ...
            stats[c], stats_t[c] = _log_softmax_(logp), _log_softmax_(logp_t)  # ... now log p, in place
            terms = (logp_t - logp).mul_(logp_t.exp())  # (c, V) p_T (log p_T - log p_S)
            kl_unclipped[c] = terms.sum(-1)
            kl[c] = terms.clamp_(max=clip).sum(-1) if clip is not None else kl_unclipped[c]
            entropy[c] = _entropy(logp)
        ctx.save_for_backward(hidden, teacher_hidden, weight, teacher_weight, stats, stats_t)
        ctx.clip, ctx.chunk_size, ctx.temperature = clip, chunk_size, temperature
        ctx.mark_non_differentiable(kl_unclipped, entropy)
        return kl, kl_unclipped, entropy

    @staticmethod
    def backward(ctx, grad_kl, _grad_unclipped, _grad_entropy):
        hidden, teacher_hidden, weight, teacher_weight, stats, stats_t = ctx.saved_tensors
        clip, chunk_size, temperature = ctx.clip, ctx.chunk_size, ctx.temperature
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=_upcast(weight).dtype) if ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], chunk_size):
            c = slice(s, s + chunk_size)
            h = hidden[c]  # (c, H)
            logp = _redo_log_softmax_(_logits(h, weight, temperature), stats[c])  # (c, V) student log p
            logp_t = _redo_log_softmax_(_logits(teacher_hidden[c], teacher_weight, temperature), stats_t[c])
            p_t = logp_t.exp()  # (c, V)
            # d term / d log p_S = -p_T where the term is below the clip (clamp passes the gradient at equality)
            a = p_t.neg()  # (c, V)
            if clip is not None:
                a *= (logp_t - logp).mul_(p_t) <= clip
            # through log_softmax: d/dz = a - p_S * sum(a)
            dz = a.sub_(logp.exp_().mul_(a.sum(-1, keepdim=True)))  # (c, V)
            dz *= grad_kl[c, None] / temperature
            if grad_h is not None:
                grad_h[c] = dz.to(weight.dtype) @ weight  # (c, H)
            if grad_w is not None:
                grad_w.addmm_(dz.T, _upcast(h))  # (V, H)
        # The teacher is a constant: no gradient for its hidden states or weight, even if they require one.
        return grad_h, None, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)  # (c,)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                   temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(hidden @ weight.T / temperature)[targets] per row: (N,) fp32 (fp64 for fp64 inputs).

    hidden (N, H), weight (V, H) (the lm_head weight), targets (N,) int64. Differentiable in hidden and weight.
    `return_entropy=True` also returns the entropy of each row's distribution (N,), without gradient.
    """
    logps, entropy = _TokenLogprobs.apply(hidden, weight, targets, chunk_size, temperature)
    return (logps, entropy) if return_entropy else logps


def forward_kl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, weight: torch.Tensor,
               teacher_weight: torch.Tensor, clip: float | None = None, chunk_size: int = 1024,
               temperature: float = 1.0, return_stats: bool = False):
    """Per-row KL(teacher || student) over the full vocabulary, each entry's term clipped from above: (N,).

    student_hidden, teacher_hidden (N, H); weight, teacher_weight (V, H), possibly the same tensor. The teacher
    is treated as a constant (no gradient); gradients flow to student_hidden and weight.
    `return_stats=True` returns (kl, unclipped kl, student entropy), the last two without gradient.
    """
    kl, kl_unclipped, entropy = _ForwardKL.apply(student_hidden, teacher_hidden, weight, teacher_weight, clip,
                                                 chunk_size, temperature)
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
    out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False)
    return out.last_hidden_state, head.weight
