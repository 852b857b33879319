"""memory.py: the plan's figures against tensor sizes measured on a small Qwen2, and the plan for Qwen2.5-3B."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

import fused
import memory
import parallel
import train
from conftest import ROOT

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)
# Qwen2.5-3B's published configuration (its config.json): 3.09B parameters, tied embeddings.
QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)


def small(tied=True):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**CONFIG, tie_word_embeddings=tied))


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_and_adamw_state_are_what_the_plan_says(tied):
    model = small(tied)
    shape = memory.model_shape(model.config)
    assert shape.params == sum(p.numel() for p in model.parameters())  # a tied head counted once
    cfg = dataclasses.replace(train.parse_config(["--model", "x/y"]), beta=0.0)
    items = memory.plan(cfg, shape)["items"]
    assert items["policy weights (fp32)"] == sum(p.numel() * p.element_size() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(0, 300, (2, 8))).logits.sum().backward()
    assert items["gradients (fp32)"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    assert items["AdamW state (GRPO, fp32)"] == state


@pytest.mark.parametrize("bf16", [False, True])
def test_kv_cache_per_token_is_what_a_real_cache_holds(bf16):
    """Decoding as train.py does (the bf16 copy under autocast with --bf16): a bf16 cache, keys included."""
    model = small().eval()
    shape = memory.model_shape(model.config)
    B, T = 3, 17
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), parallel.autocast(bf16, "cpu"):
        parallel.for_decoding(model, bf16)(input_ids=torch.randint(0, 300, (B, T)), use_cache=True,
                                           past_key_values=cache)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == B * T * memory.kv_bytes_per_token(shape, bf16)
    # decoding the fp32 policy under autocast instead would keep the keys in fp32 (rotary against fp32 cos/sin)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), parallel.autocast(True, "cpu"):
        model(input_ids=torch.randint(0, 300, (B, T)), use_cache=True, past_key_values=cache)
    assert cache.layers[0].keys.dtype == torch.float32 and cache.layers[0].values.dtype == torch.bfloat16


def saved_bytes(model, B, T, bf16):
    """Bytes of the tensors autograd saves in a forward (the activations a backward needs), parameters excluded,
    and the autocast copies of the weights counted apart."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        return t

    ids, mask = torch.randint(0, 300, (B, T)), torch.ones(B, T, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fused.hidden_states(model, ids, mask)
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    casts = sum(n for ptr, (n, dtype, s) in seen.items() if dtype == torch.bfloat16 and s in weight_shapes)
    return sum(n for ptr, (n, _, _) in seen.items() if ptr not in params) - casts


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_activations_are_what_the_plan_says(bf16, checkpointing):
    model = small().train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    shape = memory.model_shape(model.config)
    cfg = dataclasses.replace(train.parse_config(["--model", "x/y"]), micro_batch_size=2, max_context_tokens=48,
                              bf16=bf16, gradient_checkpointing=checkpointing)
    measured = saved_bytes(model, 2, 48, bf16)
    planned = memory.activation_bytes(shape, cfg)
    if checkpointing:  # the plan adds the one layer recomputed in backward, which a forward does not save yet
        planned -= 2 * 48 * memory.layer_bytes_per_token(shape, bf16)
    assert planned == pytest.approx(measured, rel=0.1)


def test_lora_adapter_size_is_what_peft_builds():
    peft = pytest.importorskip("peft", reason="LoRA needs PEFT (requirements-lora.txt)")
    import opsd

    model = small()
    shape = memory.model_shape(model.config)
    adapted = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=opsd.LORA_TARGETS))
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 8 * shape.lora_params_per_rank


def dry_run(tmp_path, *flags):
    Qwen2Config(**QWEN25_3B).save_pretrained(tmp_path / "qwen2.5-3b")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--dry-run", "--model", str(tmp_path / "qwen2.5-3b"),
                           "--gpu-memory-gb", "80", *flags], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_dry_run_plans_qwen25_3b_on_one_80gb_gpu_and_says_what_makes_it_fit(tmp_path):
    out = dry_run(tmp_path, "--bf16")
    assert "3.09B parameters" in out and "policy weights (fp32)                                    11.50 GiB" in out
    # KV cache: 36 KiB per token (36 layers x K, V x 2 heads x 128 x 2 bytes), 128 episodes x 4,756 tokens
    assert f"{128 * 4756 * 36 * 1024 / memory.GiB:9.2f} GiB" in out.split("KV cache (128 episodes)")[1].splitlines()[0]
    assert "does NOT fit" in out and out.strip().endswith("to fit, try: --gradient-checkpointing")
    fixed = dry_run(tmp_path, "--bf16", "--gradient-checkpointing")
    assert ": fits" in fixed
    full = dry_run(tmp_path, "--bf16", "--gradient-checkpointing", "--opsd-lora-rank", "0")
    assert "OPSD teacher copy" in full and "OPSD AdamW" in full  # full fine-tuning pays for a teacher and a 2nd AdamW


def test_gpu_check_runs_at_toy_size_on_the_cpu():
    """bench/gpu_check.py's every phase (scripted rollout with searches, GRPO step, OPSD with LoRA and full), small,
    unwrapped and through FSDP2 at world size 1."""
    import importlib.util
    import math

    args = ["--toy", "--questions", "2", "--rollout-batch-size", "4", "--max-new-tokens", "40", "--max-obs-tokens",
            "80", "--free-tokens", "12", "--lora-rank", "4", "--fsdp"]
    if importlib.util.find_spec("peft") is None:
        pytest.skip("LoRA needs PEFT (requirements-lora.txt)")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("rollout", "GRPO", "OPSD"))]
    rows = [(line[:26].strip(), line[26:].split()) for line in lines]
    names = ["rollout (sampled tokens)", "GRPO step (all tokens)", "OPSD phase, LoRA", "OPSD phase, full"]
    assert [name for name, _ in rows] == names * 2  # unwrapped, then FSDP2 at world size 1
    for name, (seconds, tokens_per_s, peak, plan) in rows:
        assert float(seconds) > 0 and float(tokens_per_s) > 0 and float(plan) > 0, name
        assert math.isnan(float(peak))  # no CUDA here: no peak to report
    assert proc.stdout.count("10 episodes, ") == 2 and "40 searches" in proc.stdout  # 4 a episode, from BM25
    assert "FSDP2 at world size 1 against the unwrapped model" in proc.stdout
