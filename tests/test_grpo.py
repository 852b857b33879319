"""grpo.py: advantages and loss against per-token Python loops, one update against the materialised loss,
accumulation, skipping, distributed equivalence (gloo), and learning a toy reward with a tiny Qwen2."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from data import Example
from grpo import compute_advantages, grpo_step, policy_loss
from rollout import Episode

LOSS_TYPES = ["token_mean", "seq_mean", "dr_grpo"]
SCALES = ["group", "batch", "none"]
MAX_CONTEXT = 40  # dr_grpo's constant in these tests


def tiny_model(seed=0, vocab=64, tied=False):
    """tied=True: one weight for the embedding and the head, as Qwen2.5-3B and the built-in tiny model have."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def make_cfg(**kw):
    cfg = dict(epsilon=0.2, epsilon_high=None, beta=0.0, loss_type="token_mean", scale_rewards="group",
               mask_truncated_completions=False, micro_batch_size=64, mini_batch_size=None, num_iterations=1,
               max_grad_norm=None, chunk_size=5, temperature=1.0, max_context_tokens=MAX_CONTEXT)
    return types.SimpleNamespace(**{**cfg, **kw})


def make_episodes(seed=0, num_groups=3, group_size=4, vocab=64):
    """Episodes of varied lengths with retrieved spans (loss mask 0) inside, and token 0 (a 'pad') sampled."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    episodes = []
    for q in range(num_groups):
        prompt = torch.randint(0, vocab, (rand(2, 7),), generator=g).tolist()
        for i in range(group_size):
            n = rand(3, 12)
            response = torch.randint(0, vocab, (n,), generator=g).tolist()
            response[0] = 0  # the pad id is a real sampled token here
            mask = [1] * n
            if n > 6:
                mask[2:5] = [0, 0, 0]  # an injected observation
            episodes.append(Episode(example=Example(str(q), f"question {q}", ["a"]), group_id=100 + q,
                                    prompt_ids=prompt, response_ids=response, loss_mask=mask,
                                    reward=float(rand(0, 2)), is_truncated=(q == 1 and i == 0)))
    episodes[0].reward, episodes[1].reward = 1.0, 0.0  # group 0 is never all-equal
    for e in episodes[4:8]:
        e.reward = 1.0  # group 1: all equal, advantage 0
    return episodes


# ---------------------------------------------------------------- the naive loops


def loop_advantages(rewards, group_ids, scale_rewards):
    n = len(rewards)
    batch_mean = sum(rewards) / n
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in rewards) / (n - 1))
    out = []
    for i in range(n):
        group = [rewards[j] for j in range(n) if group_ids[j] == group_ids[i]]
        if max(group) == min(group):
            out.append(0.0)
            continue
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        if scale_rewards == "group":
            out.append((rewards[i] - mean) / (std + 1e-6))
        elif scale_rewards == "batch":
            out.append((rewards[i] - mean) / (batch_std + 1e-6))
        else:
            out.append(rewards[i] - mean)
    return out


def loop_loss(logps, old_logps, advantages, mask, loss_type, eps_low, eps_high, ref_logps=None, beta=0.0,
              max_len=None):
    """The objective token by token, with 0-d tensors so that autograd gives the reference gradient."""
    B, T = mask.shape
    total, seq_means, num_tokens = 0.0, [], 0
    for b in range(B):
        seq_sum, seq_tokens = 0.0, 0
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(logps[b, t] - old_logps[b, t])
            clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
            term = -torch.minimum(ratio * advantages[b], clipped * advantages[b])
            if ref_logps is not None:
                x = ref_logps[b, t] - logps[b, t]
                term = term + beta * (torch.exp(x) - x - 1)
            seq_sum, seq_tokens = seq_sum + term, seq_tokens + 1
        total = total + seq_sum
        num_tokens += seq_tokens
        seq_means.append(seq_sum / max(seq_tokens, 1))
    if loss_type == "token_mean":
        return total / num_tokens
    if loss_type == "seq_mean":
        return sum(seq_means) / B
    return total / (B * max_len)


# ---------------------------------------------------------------- tier 1: math


@pytest.mark.parametrize("scale_rewards", SCALES)
def test_advantages_match_loop(scale_rewards):
    rewards = [1.0, 0.0, 0.5, 0.1, 0.1, 0.1, 1.0, 0.3, 0.0, 0.7, 0.9]
    group_ids = [3, 3, 3, 9, 9, 9, 5, 7, 7, 7, 7]  # an all-equal group (0.1 is inexact in binary), a singleton
    ours = compute_advantages(rewards, group_ids, scale_rewards)
    torch.testing.assert_close(ours, torch.tensor(loop_advantages(rewards, group_ids, scale_rewards)))
    assert (ours[3:7] == 0).all()  # exactly 0, not rounding noise divided by eps


@pytest.mark.parametrize("scale_rewards", SCALES)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_loop(loss_type, scale_rewards):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 7
    logps = (torch.randn(B, T, generator=g) - 2).requires_grad_()
    old_logps = logps.detach() + 0.3 * torch.randn(B, T, generator=g)  # ratios far enough from 1 to clip
    ref_logps = logps.detach() + 0.5 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, :] = 0  # a sequence with no loss token
    mask[3, 1:3] = 0  # retrieved tokens inside
    rewards, group_ids = [1.0, 0.0, 1.0, 0.5, 0.2], [0, 0, 1, 1, 1]
    advantages = compute_advantages(rewards, group_ids, scale_rewards)
    loop_adv = loop_advantages(rewards, group_ids, scale_rewards)
    torch.testing.assert_close(advantages, torch.tensor(loop_adv))

    loss, metrics = policy_loss(logps, old_logps, advantages, mask, epsilon=0.2, epsilon_high=0.28,
                                loss_type=loss_type, ref_logps=ref_logps, beta=0.04)
    (grad,) = torch.autograd.grad(loss, logps)
    ref = loop_loss(logps, old_logps, loop_adv, mask, loss_type, 0.2, 0.28, ref_logps, 0.04, max_len=T)
    (ref_grad,) = torch.autograd.grad(ref, logps)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)

    # metrics: token means over loss tokens
    m = mask.bool()
    ratio = torch.exp(logps.detach() - old_logps)[m]
    adv = advantages[:, None].expand(B, T)[m]
    clipped = ((ratio < 0.8) & (adv < 0)) | ((ratio > 1.28) & (adv > 0))
    assert 0 < metrics["clip_fraction"] < 1
    torch.testing.assert_close(metrics["clip_fraction"], clipped.float().mean())
    torch.testing.assert_close(metrics["ratio_mean"], ratio.mean())
    x = (ref_logps - logps.detach())[m]
    torch.testing.assert_close(metrics["kl"], (torch.exp(x) - x - 1).mean())


def test_micro_batch_losses_with_the_global_normaliser_sum_to_the_batch_loss():
    g = torch.Generator().manual_seed(1)
    logps = torch.randn(6, 5, generator=g).requires_grad_()
    old, adv = logps.detach() + 0.1, torch.randn(6, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    for loss_type, z in [("token_mean", float(mask.sum())), ("seq_mean", 6.0), ("dr_grpo", 30.0)]:
        whole, _ = policy_loss(logps, old, adv, mask, loss_type=loss_type)
        parts = sum(policy_loss(logps[s], old[s], adv[s], mask[s], loss_type=loss_type, normaliser=z)[0]
                    for s in (slice(0, 1), slice(1, 4), slice(4, 6)))
        torch.testing.assert_close(parts, whole)


# ---------------------------------------------------------------- one update


def sgd_step(model, episodes, cfg, ref_model=None):
    """grpo_step with SGD(lr=1): the parameter change is minus the applied gradient."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = grpo_step(model, ref_model, torch.optim.SGD(model.parameters(), lr=1.0), episodes, cfg)
    return [b - p.detach() for b, p in zip(before, model.parameters())], metrics


def logits_logps(m, e):
    """log p of each response token, from the full logits of the unpadded sequence (materialised)."""
    ids = torch.tensor([e.prompt_ids + e.response_ids])
    logp = F.log_softmax(m(input_ids=ids).logits[0, :-1], -1)  # (L-1, V)
    return logp[len(e.prompt_ids) - 1:].gather(1, torch.tensor(e.response_ids)[:, None]).squeeze(1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_step_gradient_is_that_of_the_materialised_loss(loss_type, tied):
    """Whole-model check: logits materialised by model(...).logits, the loss written as a loop, one backward."""
    model, ref_model = tiny_model(0, tied=tied), tiny_model(1, tied=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    episodes = make_episodes()
    cfg = make_cfg(loss_type=loss_type, beta=0.05, scale_rewards="group")
    grads, metrics = sgd_step(model, episodes, cfg, ref_model)

    T = max(len(e.response_ids) for e in episodes)
    logps = torch.zeros(len(episodes), T)
    ref = torch.zeros(len(episodes), T)
    mask = torch.zeros(len(episodes), T, dtype=torch.long)
    for i, e in enumerate(episodes):
        logps[i, :len(e.response_ids)] = logits_logps(model, e)
        with torch.no_grad():
            ref[i, :len(e.response_ids)] = logits_logps(ref_model, e)
        mask[i, :len(e.loss_mask)] = torch.tensor(e.loss_mask)
    adv = loop_advantages([e.reward for e in episodes], [e.group_id for e in episodes], "group")
    loss = loop_loss(logps, logps.detach(), adv, mask, loss_type, 0.2, 0.2, ref, 0.05, max_len=MAX_CONTEXT)
    model.zero_grad()
    loss.backward()
    for ours, p in zip(grads, model.parameters()):
        torch.testing.assert_close(ours, p.grad, rtol=1e-4, atol=1e-6)
    assert metrics["grpo/loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert metrics["grpo/zero_std_fraction"] == pytest.approx(1 / 3)
    assert metrics["grpo/kl"] > 0 and metrics["grpo/entropy"] > 0 and metrics["grpo/skipped_steps"] == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulation_equals_one_big_batch(loss_type):
    model, episodes = tiny_model(), make_episodes(seed=3)
    whole, m_whole = sgd_step(model, episodes, make_cfg(loss_type=loss_type, micro_batch_size=len(episodes)))
    for micro in (1, 5):  # 5 does not divide 12
        parts, m_parts = sgd_step(model, episodes, make_cfg(loss_type=loss_type, micro_batch_size=micro))
        for a, b in zip(parts, whole):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for k in ("grpo/loss", "grpo/entropy", "grpo/grad_norm", "grpo/ratio_mean"):
            assert m_parts[k] == pytest.approx(m_whole[k], rel=1e-5, abs=1e-7), k


def test_mask_truncated_completions_drops_exactly_those_episodes():
    model, episodes = tiny_model(), make_episodes(seed=4)
    assert sum(e.is_truncated for e in episodes) == 1
    masked, _ = sgd_step(model, episodes, make_cfg(mask_truncated_completions=True))
    zeroed = [copy.copy(e) for e in episodes]
    for e in zeroed:
        if e.is_truncated:
            e.loss_mask = [0] * len(e.loss_mask)
    expected, _ = sgd_step(model, zeroed, make_cfg())
    unmasked, _ = sgd_step(model, episodes, make_cfg())
    for a, b in zip(masked, expected):
        torch.testing.assert_close(a, b)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(masked, unmasked))


@pytest.mark.parametrize("tied", [False, True])
def test_several_optimizer_steps_equal_a_hand_written_loop_with_old_logprobs_from_before_the_update(tied):
    """num_iterations=2 over 3 mini-batches = 6 SGD steps. The reference loop: pi_old's log-probs once, from the
    model before any step (materialised logits), then for each pass and mini-batch the loop loss and one step.
    Stale, re-computed or misindexed old log-probs would give other parameters."""
    model, episodes = tiny_model(tied=tied), make_episodes(seed=5)
    cfg = make_cfg(mini_batch_size=4, num_iterations=2, micro_batch_size=3, epsilon=0.05)
    ours = copy.deepcopy(model)
    metrics = grpo_step(ours, None, torch.optim.SGD(ours.parameters(), lr=2.0), episodes, cfg)
    assert metrics["grpo/optimizer_steps"] == 2 * 3
    assert metrics["grpo/ratio_mean"] != pytest.approx(1.0, abs=1e-4)  # the policy moved away from pi_old
    assert metrics["grpo/clip_fraction"] > 0  # ... far enough for the clip to bind
    assert "grpo/kl" not in metrics  # no reference model, no KL

    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(reference.parameters(), lr=2.0)
    T = max(len(e.response_ids) for e in episodes)

    def padded(m, idx):  # (b, T) log-probs and masks of episodes idx
        logps, mask = torch.zeros(len(idx), T), torch.zeros(len(idx), T, dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(episodes[i].response_ids)
            logps[row, :n] = logits_logps(m, episodes[i])
            mask[row, :n] = torch.tensor(episodes[i].loss_mask)
        return logps, mask

    with torch.no_grad():
        old, _ = padded(reference, range(len(episodes)))
    adv = loop_advantages([e.reward for e in episodes], [e.group_id for e in episodes], "group")
    for _ in range(2):
        for start in (0, 4, 8):
            idx = list(range(start, start + 4))
            logps, mask = padded(reference, idx)
            loss = loop_loss(logps, old[idx], [adv[i] for i in idx], mask, "token_mean", 0.05, 0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(ours.parameters(), reference.parameters()):  # (6 steps of lr 2 accumulate fp32 rounding)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


def test_non_finite_loss_skips_the_step():
    model, episodes = tiny_model(), make_episodes()
    episodes[0].reward = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    metrics = grpo_step(model, None, opt, episodes, make_cfg(max_grad_norm=1.0))
    assert metrics["grpo/skipped_steps"] == 1 and metrics["grpo/optimizer_steps"] == 0
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state  # AdamW never stepped: no moments were created


def test_bad_options_raise():
    with pytest.raises(ValueError, match="scale_rewards"):
        compute_advantages([1.0, 0.0], [0, 0], "std")
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2), loss_type="mean")


# ---------------------------------------------------------------- distributed (gloo, 2 processes)


def _distributed_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    model, episodes = tiny_model(), make_episodes(seed=6, num_groups=4)
    # groups never straddle ranks: rank r holds groups 2r, 2r+1; per rank 2 mini-batches of one group each
    mine = [e for e in episodes if (e.group_id - 100) // 2 == rank]
    cfg = make_cfg(scale_rewards="batch", mini_batch_size=4, micro_batch_size=3, beta=0.1, max_grad_norm=0.5)
    metrics = grpo_step(model, tiny_model(1), torch.optim.SGD(model.parameters(), lr=1.0), mine, cfg)
    if rank == 0:
        torch.save({"params": [p.detach() for p in model.parameters()], "metrics": metrics}, out_file)
    dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    # fork: the children inherit the imported modules (a spawned child spends ~10 s importing transformers)
    torch.multiprocessing.start_processes(_distributed_worker, nprocs=2, start_method="fork",
                                          args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")))
    got = torch.load(tmp_path / "out.pt")
    # the same global batch in one process: mini-batch k = group k of rank 0, then group k of rank 1
    episodes = make_episodes(seed=6, num_groups=4)
    order = [e for k in (0, 1) for r in (0, 1) for e in episodes if e.group_id - 100 == 2 * r + k]
    model = tiny_model()
    cfg = make_cfg(scale_rewards="batch", mini_batch_size=8, micro_batch_size=3, beta=0.1, max_grad_norm=0.5)
    metrics = grpo_step(model, tiny_model(1), torch.optim.SGD(model.parameters(), lr=1.0), order, cfg)
    for a, b in zip(got["params"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
    for k, v in metrics.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


# ---------------------------------------------------------------- learning


def test_grpo_learns_a_toy_reward():
    """Reward = fraction of sampled tokens equal to TARGET: chance is 1/64; GRPO gets above 0.5."""
    V, TARGET, G, R = 64, 7, 8, 8
    model = tiny_model(0, vocab=V)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, V, (4,), generator=gen).tolist() for _ in range(4)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    cfg = make_cfg(micro_batch_size=32, max_grad_norm=1.0, chunk_size=64)

    @torch.no_grad()
    def sample():
        ids = torch.tensor([p for p in prompts for _ in range(G)])
        for _ in range(R):
            probs = model(input_ids=ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], 1)
        return ids[:, 4:].tolist()

    rewards = []
    for _ in range(25):
        episodes = [Episode(example=Example(str(i // G), "q", ["a"]), group_id=i // G, prompt_ids=prompts[i // G],
                            response_ids=r, loss_mask=[1] * R, reward=sum(x == TARGET for x in r) / R)
                    for i, r in enumerate(sample())]
        metrics = grpo_step(model, None, opt, episodes, cfg)
        rewards.append(metrics["reward/mean"])
        assert metrics["grpo/skipped_steps"] == 0
    assert sum(rewards[:3]) / 3 < 0.1
    assert sum(rewards[-3:]) / 3 > 0.5


def test_under_bf16_autocast_a_second_optimizer_step_sees_the_first():
    """Two optimizer steps in one autocast region (train.py wraps a whole unit in one): the second mini-batch's
    ratio must move off 1 as it does in fp32. (With autocast's weight cache on, the second step read the weights
    of before the first: ratio exactly 1, the clip never binding.)"""
    import parallel

    episodes = make_episodes(seed=5)
    cfg = make_cfg(mini_batch_size=6, micro_batch_size=3, epsilon=0.05)
    ratios = {}
    for bf16 in (False, True):
        model = tiny_model()
        with parallel.autocast(bf16, "cpu"):
            metrics = grpo_step(model, None, torch.optim.SGD(model.parameters(), lr=2.0), episodes, cfg)
        assert metrics["grpo/optimizer_steps"] == 2
        ratios[bf16] = metrics["grpo/ratio_mean"]
    assert ratios[False] != pytest.approx(1.0, abs=1e-3)
    assert ratios[True] == pytest.approx(ratios[False], abs=0.05 * abs(ratios[False] - 1))


def test_a_bf16_reference_computes_exactly_what_the_fp32_policy_computes_under_autocast():
    """parallel.frozen_copy keeps embeddings, norms and the head in fp32 and converts the matmul weights autocast
    would cast anyway: at step 0 the k3 KL to the reference is exactly 0, not bf16 noise."""
    import parallel

    for tied in (False, True):
        model = tiny_model(tied=tied)
        ref = parallel.frozen_copy(model, torch.bfloat16)
        assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert ref.model.embed_tokens.weight.dtype == ref.lm_head.weight.dtype == torch.float32
        with parallel.autocast(True, "cpu"):
            metrics = grpo_step(model, ref, torch.optim.SGD(model.parameters(), lr=0.0), make_episodes(),
                                make_cfg(beta=0.1))
        assert metrics["grpo/kl"] == 0.0
