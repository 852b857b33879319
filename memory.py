"""The memory plan: what one GPU holds in each phase of a run, from the model's config alone (nothing is loaded).

    python train.py --dry-run --model Qwen/Qwen2.5-3B-Instruct --bf16 --gradient-checkpointing   # print it, stop

train.py prints the plan before every run. Figures are bytes per process (per GPU), for the worst case of the
configuration (every episode as long as its budgets allow), so a plan that fits leaves the run room; typical
episodes are shorter. P = parameters, A = LoRA adapter parameters, W = processes.

    policy weights          4 P            fp32 master weights (parallel.py: also under --bf16)
    gradients               4 P            fp32, during an update
    AdamW (GRPO)            8 P            two fp32 moments, resident all run
    bf16 copies             2 P            --bf16: the bf16 copy autocast keeps in a forward, or a rollout decodes with
    reference               2 P or 4 P     beta > 0: frozen copy, bf16 under --bf16
    OPSD, LoRA              16 A           adapter weights, gradients and AdamW (the teacher is the adapter off)
    OPSD, full fine-tuning  2|4 P + 12 P   a frozen teacher copy, and gradients + a second AdamW for the phase
    KV cache                N x S x L x 2 x kv_heads x head_dim x (2 under --bf16, else 4)
                            N = rollout_batch_size episodes, S = the longest cache a batch can grow: prompt +
                            (max_turns + 1) x max_new_tokens + max_turns x max_obs_tokens (rows that stop early
                            and padding leave holes, so S may exceed max_context_tokens)
    activations             tokens x per-token bytes, tokens = micro_batch_size x max_context_tokens:
                            without checkpointing L x (32 H + 16 I + 8 kv) bytes fp32, L x (30 H + 8 I + 4 kv) under
                            --bf16 (H hidden, I intermediate, kv = kv_heads x head_dim); with checkpointing 4 H per
                            layer (each layer's fp32 input) plus one layer recomputed; plus 10 H (final norm, head
                            input). Measured with saved-tensor hooks on Qwen2 (tests/test_memory.py).
    fused chunk             chunk_size x V x 4 x 3 (logits and two temporaries; the KL holds the teacher's too)
                            + V x H x 4 (the lm_head weight-gradient accumulator, fp32)

Peaks are per phase (rollout, GRPO update, OPSD, evaluation): each sums what is resident then.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 1024 ** 3
PROMPT_TOKENS = 256  # the instruction and a question, tokenised (Qwen2.5's template: ~200)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelShape:
    params: int  # unique parameters (a tied head counted once)
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    lora_params_per_rank: int  # adapter parameters per unit of rank: sum of (in + out) over the adapted linears

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def model_shape(config) -> ModelShape:
    """The sizes the plan needs, from a transformers config (parameters counted on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    lora = sum(m.in_features + m.out_features for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(params=params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=config.intermediate_size, vocab=config.vocab_size,
                      heads=config.num_attention_heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                      head_dim=head_dim, lora_params_per_rank=lora)


def kv_bytes_per_token(shape: ModelShape, bf16: bool) -> int:
    return shape.layers * 2 * shape.kv_dim * (2 if bf16 else 4)  # K and V of every layer


def kv_cache_bytes(shape: ModelShape, cfg) -> int:
    longest = PROMPT_TOKENS + (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens
    episodes = cfg.rollout_batch_size or cfg.batch_size * cfg.num_generations
    return episodes * longest * kv_bytes_per_token(shape, cfg.bf16)


def layer_bytes_per_token(shape: ModelShape, bf16: bool) -> int:
    """Saved activations of one decoder layer, per token (fits of saved-tensor measurements, module docstring)."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    return 30 * h + 8 * i + 4 * kv if bf16 else 32 * h + 16 * i + 8 * kv


def activation_bytes(shape: ModelShape, cfg) -> int:
    tokens = cfg.micro_batch_size * cfg.max_context_tokens
    layer = layer_bytes_per_token(shape, cfg.bf16)
    per_token = (shape.layers * 4 * shape.hidden + layer if cfg.gradient_checkpointing else shape.layers * layer)
    return tokens * (per_token + 10 * shape.hidden)


def plan(cfg, shape: ModelShape, world_size: int = 1) -> dict:
    """{"items": {name: bytes}, "phases": {phase: (bytes, [items])}, "peak": (phase, bytes)} for one process."""
    P, shard = shape.params, 1  # (sharding across processes divides the sharded items by W: issue 12)
    weight = 2 if cfg.bf16 else 4
    lora = cfg.opsd and cfg.opsd_lora_rank > 0
    items = {
        "policy weights (fp32)": 4 * P // shard,
        "gradients (fp32)": 4 * P // shard,
        "AdamW state (GRPO, fp32)": 8 * P // shard,
        "bf16 weight copies (autocast / decoding)": 2 * P if cfg.bf16 else 0,
        "reference model": weight * P // shard if cfg.beta > 0 else 0,
        f"KV cache ({cfg.rollout_batch_size or 'all'} episodes)": kv_cache_bytes(shape, cfg),
        f"activations (micro-batch {cfg.micro_batch_size})": activation_bytes(shape, cfg),
        "activations, no-grad forward (one layer)": cfg.micro_batch_size * cfg.max_context_tokens *
        layer_bytes_per_token(shape, cfg.bf16),
        f"fused chunk ({cfg.chunk_size} rows)": cfg.chunk_size * shape.vocab * 4 * 3 + shape.vocab * shape.hidden * 4,
    }
    if lora:
        items[f"OPSD LoRA adapter (rank {cfg.opsd_lora_rank}) + grads + AdamW"] = \
            16 * cfg.opsd_lora_rank * shape.lora_params_per_rank
    elif cfg.opsd:
        items["OPSD teacher copy"] = weight * P // shard
        items["OPSD AdamW (fp32)"] = 8 * P // shard
    kv, act, nograd, chunk = (next(k for k in items if k.startswith(s)) for s in
                              ("KV cache", "activations (", "activations, no-grad", "fused chunk"))
    resident = ["policy weights (fp32)", "AdamW state (GRPO, fp32)", "reference model",
                "bf16 weight copies (autocast / decoding)"]
    phases = {
        "rollout": resident + [kv],
        "GRPO update": resident + ["gradients (fp32)", act, chunk],
        "evaluation": resident + [kv],
    }
    if cfg.opsd:
        opsd_items = [k for k in items if k.startswith("OPSD")]
        phases["OPSD phase"] = resident + opsd_items + [act, nograd, chunk] + ([] if lora else ["gradients (fp32)"])
    phases = {name: (sum(items[k] for k in keys), [k for k in keys if items[k]]) for name, keys in phases.items()}
    peak = max(phases.items(), key=lambda kv: kv[1][0])
    return {"items": items, "phases": phases, "peak": (peak[0], peak[1][0])}


# What to try, in order, when the peak does not fit: (flag, how to change the config). Each is kept if it helps.
REMEDIES = [
    ("--bf16", lambda c: dataclasses.replace(c, bf16=True)),
    ("--gradient-checkpointing", lambda c: dataclasses.replace(c, gradient_checkpointing=True)),
    ("--opsd-lora-rank 64", lambda c: dataclasses.replace(c, opsd_lora_rank=64) if c.opsd and not c.opsd_lora_rank
     else c),
    ("--micro-batch-size {micro_batch_size}", lambda c: dataclasses.replace(c, micro_batch_size=max(
        1, c.micro_batch_size // 2))),
    ("--rollout-batch-size {rollout_batch_size}", lambda c: dataclasses.replace(c, rollout_batch_size=max(
        1, (c.rollout_batch_size or c.batch_size * c.num_generations) // 2))),
    ("--chunk-size {chunk_size}", lambda c: dataclasses.replace(c, chunk_size=max(128, c.chunk_size // 2))),
]


def advice(cfg, shape: ModelShape, budget: int, world_size: int = 1) -> list[str] | None:
    """Flag changes that make the plan fit `budget` bytes (first the cheapest in throughput), or None if none do."""
    changed = []
    for _ in range(40):
        if plan(cfg, shape, world_size)["peak"][1] <= budget:
            return changed
        for flag, change in REMEDIES:
            new = change(cfg)
            if plan(new, shape, world_size)["peak"][1] < plan(cfg, shape, world_size)["peak"][1]:
                cfg = new
                flag = flag.format(**dataclasses.asdict(cfg))
                changed = [f for f in changed if f.split()[0] != flag.split()[0]] + [flag]
                break
        else:
            return None
    return None


def format_plan(cfg, shape: ModelShape, budget: int | None, world_size: int = 1, where: str = "") -> str:
    """The plan as a table, the peak against the budget, and the flags that would make it fit."""
    p = plan(cfg, shape, world_size)
    size = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e9 else f"{shape.params / 1e6:.1f}M"
    lines = [f"memory plan per GPU{where}: {size} parameters, "
             f"{'bf16 compute / fp32 master' if cfg.bf16 else 'fp32'}"
             f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}"]
    for name, nbytes in p["items"].items():
        if nbytes:
            lines.append(f"  {name:<52} {nbytes / GiB:9.2f} GiB")
    for name, (nbytes, _) in p["phases"].items():
        lines.append(f"  = {name:<50} {nbytes / GiB:9.2f} GiB")
    phase, peak = p["peak"]
    if budget is None:
        lines.append(f"  peak: {peak / GiB:.2f} GiB ({phase})")
        return "\n".join(lines)
    verdict = "fits" if peak <= budget else "does NOT fit"
    lines.append(f"  peak: {peak / GiB:.2f} GiB ({phase}) of {budget / GiB:.1f} GiB: {verdict}")
    if peak > budget:
        fix = advice(cfg, shape, budget, world_size)
        lines.append("  to fit, try: " + " ".join(fix) if fix else
                     "  no single-GPU setting fits: more GPUs (torchrun; issue 12: sharding) or a smaller model")
    return "\n".join(lines)
