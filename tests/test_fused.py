"""fused.py against the materialised version (logits, log_softmax, kl_div): values and gradients (tier 1); episodes
as padded batches, masks from lengths."""
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from fused import forward_kl, hidden_states, pad_batch, token_logprobs

TOL = dict(rtol=1e-5, atol=1e-5)
N, H, V = 37, 16, 50  # N is prime: no chunk size below divides it


def naive_logprobs(hidden, weight, targets, temperature=1.0):
    logp = F.log_softmax(hidden @ weight.T / temperature, dim=-1)  # (N, V) materialised
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def naive_kl(hidden, teacher_hidden, weight, teacher_weight, clip=None, temperature=1.0):
    logp = F.log_softmax(hidden @ weight.T / temperature, dim=-1)  # (N, V)
    logp_t = F.log_softmax(teacher_hidden @ teacher_weight.T / temperature, dim=-1).detach()  # (N, V)
    terms = F.kl_div(logp, logp_t, log_target=True, reduction="none")  # (N, V) p_T (log p_T - log p_S)
    return (terms.clamp(max=clip) if clip is not None else terms).sum(-1)


def inputs(seed=0, extreme=False, dtype=torch.float32):
    """extreme: integer-valued hidden states and weights, so logits are exact integers up to ~2,000 in magnitude
    (softmax rows one-hot to fp32 precision) and any difference is the softmax arithmetic's, not the matmul's."""
    g = torch.Generator().manual_seed(seed)
    if extreme:
        draw = lambda *shape, hi: torch.randint(-hi, hi + 1, shape, generator=g).float()  # noqa: E731
        hidden, weight = draw(N, H, hi=40), draw(V, H, hi=3)
        teacher_hidden, teacher_weight = draw(N, H, hi=40), draw(V, H, hi=3)
    else:
        hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
        teacher_hidden, teacher_weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    teacher_hidden, teacher_weight = teacher_hidden.to(dtype), teacher_weight.to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    upstream = torch.randn(N, generator=g, dtype=dtype)  # an arbitrary gradient from the loss above
    upstream[::5] = 0  # masked rows: zero upstream gradient
    return hidden, weight, teacher_hidden, teacher_weight, targets, upstream


def value_and_grads(fn, hidden, weight, upstream):
    hidden.grad = weight.grad = None
    out = fn()
    (out * upstream).sum().backward()
    return out.detach(), hidden.grad.clone(), weight.grad.clone()


CASES = [  # (chunk_size, temperature, extreme logits)
    (8, 1.0, False), (5, 0.7, False), (64, 1.3, False), (1, 1.0, False), (6, 1.0, True), (7, 0.5, True),
]


@pytest.mark.parametrize("chunk_size,temperature,extreme", CASES)
def test_token_logprobs_match_naive(chunk_size, temperature, extreme):
    hidden, weight, _, _, targets, upstream = inputs(extreme=extreme)
    ours = value_and_grads(lambda: token_logprobs(hidden, weight, targets, chunk_size, temperature), hidden, weight,
                           upstream)
    ref = value_and_grads(lambda: naive_logprobs(hidden, weight, targets, temperature)[0], hidden, weight, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert (ours[1][::5] == 0).all()  # masked rows get exactly no gradient
    _, entropy = token_logprobs(hidden, weight, targets, chunk_size, temperature, return_entropy=True)
    torch.testing.assert_close(entropy, naive_logprobs(hidden, weight, targets, temperature)[1].detach(), **TOL)
    assert not entropy.requires_grad


@pytest.mark.parametrize("clip", [None, 0.05, 1.0])
@pytest.mark.parametrize("chunk_size,temperature,extreme", CASES)
def test_forward_kl_matches_naive(chunk_size, temperature, extreme, clip):
    hidden, weight, teacher_hidden, teacher_weight, _, upstream = inputs(extreme=extreme)
    ours = value_and_grads(lambda: forward_kl(hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size,
                                              temperature), hidden, weight, upstream)
    ref = value_and_grads(lambda: naive_kl(hidden, teacher_hidden, weight, teacher_weight, clip, temperature),
                          hidden, weight, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    if clip is not None and not extreme:  # the clip binds somewhere, so this case tests it
        unclipped = naive_kl(hidden, teacher_hidden, weight, teacher_weight, None, temperature)
        assert (unclipped > ours[0] + 1e-3).any()
    kl, kl_unclipped, entropy = forward_kl(hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size,
                                           temperature, return_stats=True)
    torch.testing.assert_close(kl_unclipped, naive_kl(hidden, teacher_hidden, weight, teacher_weight, None,
                                                      temperature).detach(), **TOL)
    torch.testing.assert_close(entropy, naive_logprobs(hidden, weight, torch.zeros(N, dtype=torch.long),
                                                       temperature)[1].detach(), **TOL)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("chunk_size,temperature,extreme", CASES)
def test_forward_kl_sum_matches_naive(chunk_size, temperature, extreme, clip):
    """reduction="sum" computes its gradient in the forward; the incoming gradient is a scalar (here 0.7)."""
    hidden, weight, teacher_hidden, teacher_weight, _, _ = inputs(extreme=extreme)
    upstream = torch.tensor(0.7)
    ours = value_and_grads(lambda: forward_kl(hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size,
                                              temperature, reduction="sum"), hidden, weight, upstream)
    ref = value_and_grads(lambda: naive_kl(hidden, teacher_hidden, weight, teacher_weight, clip, temperature).sum(),
                          hidden, weight, upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    with torch.no_grad():  # no gradient wanted: none computed, same value
        value = forward_kl(hidden, teacher_hidden, weight, teacher_weight, clip, chunk_size, temperature,
                           reduction="sum")
    torch.testing.assert_close(value, ours[0], **TOL)


def test_forward_kl_shared_weight_gets_only_the_student_gradient():
    """teacher_weight may be the very tensor `weight` (a LoRA-off teacher, or the same lm_head): it is a constant."""
    hidden, weight, teacher_hidden, _, _, upstream = inputs(seed=1)
    ours = value_and_grads(lambda: forward_kl(hidden, teacher_hidden, weight, weight, 0.1, 8), hidden, weight,
                           upstream)
    ref = value_and_grads(lambda: naive_kl(hidden, teacher_hidden, weight, weight.detach(), 0.1), hidden, weight,
                          upstream)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)
    # teacher hidden states that require grad still get none
    teacher_hidden.requires_grad_()
    forward_kl(hidden, teacher_hidden, weight, weight, None, 8).sum().backward()
    assert teacher_hidden.grad is None


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    n, h, v = 7, 4, 9
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    teacher_weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=g)
    assert torch.autograd.gradcheck(lambda a, b: token_logprobs(a, b, targets, 3, 0.8), (hidden, weight))
    clip = 0.15
    terms = F.kl_div(F.log_softmax(hidden @ weight.T, -1), F.log_softmax(teacher_hidden @ teacher_weight.T, -1),
                     log_target=True, reduction="none")
    assert (terms > clip).any() and ((terms - clip).abs() > 1e-4).all()  # clip binds, no term sits on the kink
    for c in (None, clip):
        for reduction in ("none", "sum"):
            assert torch.autograd.gradcheck(
                lambda a, b: forward_kl(a, teacher_hidden, b, teacher_weight, c, 3, 1.2, reduction=reduction),
                (hidden, weight))


def test_bf16_runs_in_fp32_and_is_close():
    hidden, weight, teacher_hidden, teacher_weight, targets, upstream = inputs(seed=2, dtype=torch.bfloat16)
    up32 = upstream.float()
    logps = token_logprobs(hidden, weight, targets, 8)
    assert logps.dtype == torch.float32
    (logps * up32).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    # the fp32 answer on the same (bf16-rounded) numbers
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = value_and_grads(lambda: naive_logprobs(h32, w32, targets)[0], h32, w32, up32)
    torch.testing.assert_close(logps.detach(), ref[0], rtol=0.02, atol=0.05)
    torch.testing.assert_close(hidden.grad.float(), ref[1], rtol=0.02, atol=0.05)
    torch.testing.assert_close(weight.grad.float(), ref[2], rtol=0.02, atol=0.05)
    kl = forward_kl(hidden, teacher_hidden, weight, teacher_weight, 1.0, 8)
    assert kl.dtype == torch.float32
    ref_kl = naive_kl(h32, teacher_hidden.float(), w32, teacher_weight.float(), 1.0)
    torch.testing.assert_close(kl.detach(), ref_kl.detach(), rtol=0.02, atol=0.05)
    # gradients without the clip: rounding may move a term across it, which switches its gradient on or off
    hidden.grad = weight.grad = h32.grad = w32.grad = None
    forward_kl(hidden, teacher_hidden, weight, teacher_weight, None, 8, reduction="sum").backward()
    naive_kl(h32, teacher_hidden.float(), w32, teacher_weight.float(), None).sum().backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hidden.grad.float(), h32.grad, rtol=0.02, atol=0.05)
    torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=0.02, atol=0.05)


def test_no_rows_by_vocab_tensor_is_saved_for_backward():
    """What autograd keeps between forward and backward is O(N x H), never the (N, V) logits."""
    hidden, weight, teacher_hidden, teacher_weight, targets, _ = inputs()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_logprobs(hidden, weight, targets, 8).sum().backward()
        forward_kl(hidden, teacher_hidden, weight, teacher_weight, 1.0, 8).sum().backward()
        forward_kl(hidden, teacher_hidden, weight, teacher_weight, 1.0, 8, reduction="sum").backward()
    assert sizes and max(sizes) < N * V
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        naive_logprobs(hidden, weight, targets)[0].sum().backward()
    assert max(sizes) >= N * V  # the hook does see the naive version's logits


def test_empty_input():
    hidden, weight, teacher_hidden, teacher_weight, targets, _ = inputs()
    out = token_logprobs(hidden[:0], weight, targets[:0], 8)
    out.sum().backward()
    assert out.shape == (0,) and (weight.grad == 0).all()
    assert forward_kl(hidden[:0], teacher_hidden[:0], weight, teacher_weight, 1.0).shape == (0,)


# ---------------------------------------------------------------- hidden states from a transformers model


def tiny_qwen(tie=False):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_give_the_model_logits(tie):
    model = tiny_qwen(tie)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 0, 0, 12]]  # id 0 inside a sequence is a real token, not padding
    input_ids = torch.tensor([seqs[0], seqs[1] + [0, 0]])
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0, 0]])
    with torch.no_grad():
        hidden, weight = hidden_states(model, input_ids, attention_mask)
        assert weight is model.get_output_embeddings().weight
        for b, seq in enumerate(seqs):  # each sequence alone, unpadded: the reference logits
            logits = model(input_ids=torch.tensor([seq])).logits[0]  # (L, V)
            torch.testing.assert_close(hidden[b, :len(seq)] @ weight.T, logits, **TOL)
            targets = torch.tensor(seq[1:])
            torch.testing.assert_close(token_logprobs(hidden[b, :len(seq) - 1], weight, targets, 4),
                                       F.log_softmax(logits[:-1], -1).gather(1, targets[:, None]).squeeze(1), **TOL)


def test_hidden_states_refuse_softcapped_heads():
    model = tiny_qwen()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hidden_states(model, torch.tensor([[1, 2]]), torch.tensor([[1, 1]]))


def test_pad_batch_masks_come_from_lengths_not_token_values():
    prompts, responses = [[5, 0], [7, 8, 9]], [[0, 0, 3], [4]]
    batch = pad_batch(prompts, responses, [[1, 0, 1], [1]], "cpu")
    assert batch.input_ids.tolist() == [[5, 0, 0, 0, 3], [7, 8, 9, 4, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.loss_mask.tolist() == [[1, 0, 1], [1, 0, 0]]
    # loss token (row, response position) is predicted at position len(prompt) + t - 1
    assert list(zip(batch.rows.tolist(), batch.cols.tolist(), batch.positions.tolist())) == [(0, 0, 1), (0, 2, 3),
                                                                                            (1, 0, 2)]
    assert batch.targets.tolist() == [0, 3, 4]
