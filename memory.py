"""The memory plan: what one GPU holds in each phase of a run, from the model's config alone (nothing is loaded).

    python train.py --dry-run --model Qwen/Qwen2.5-3B-Instruct --bf16 --gradient-checkpointing   # print it, stop
    WORLD_SIZE=8 python train.py --dry-run --model Qwen/Qwen2.5-7B-Instruct --bf16 ...            # per GPU of 8

train.py prints the plan before every run. Figures are bytes per process (per GPU), for the worst case of the
configuration (every episode as long as its budgets allow), so a plan that fits leaves the run room; typical
episodes are shorter. P = parameters, A = LoRA adapter parameters, W = processes.

    policy weights          4 P            fp32 master weights (parallel.py: also under --bf16)
    gradients               4 P            fp32, during an update
    AdamW (GRPO)            8 P            two fp32 moments, resident all run
    bf16 copies             2 P            --bf16: the bf16 copy autocast keeps in a forward, or a rollout decodes with
    reference               2 M + 4 (P-M)  beta > 0: a frozen copy, its M matmul weights in bf16 (4 P in fp32)
    OPSD, LoRA              16 A           adapter weights, gradients and AdamW (the teacher is the adapter off)
    OPSD, full fine-tuning  frozen + 12 P  a frozen teacher copy (as the reference), gradients, a second AdamW
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

Sharded over W processes (torchrun: FSDP2, parallel.shard), the weights, gradients, AdamW moments (GRPO's and a
full-fine-tuning OPSD phase's) and the reference take 1/W of the above each (none of the GPU's with --cpu-offload);
each process adds the unsharded decoding copy rollouts read (2|4 P; it is also the full-fine-tuning teacher) and,
in a forward, the gathered weights of two layers and of the root (embeddings, head).
Peaks are per phase (rollout, GRPO update, OPSD, evaluation): each sums what is resident then.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GiB = 1024 ** 3
PROMPT_TOKENS = 256  # the instruction and a question, tokenised (Qwen2.5's template: ~200)


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
    matmul_params: int  # the decoder's linear layers (a frozen bf16 copy converts these alone)
    layer_params: int  # one decoder layer's (an FSDP2 group)
    root_params: int  # the rest: embeddings, final norm, an untied lm_head (the root FSDP2 group)

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
    head_module = model.get_output_embeddings()
    # LoRA on every linear layer but the head (opsd.LORA_TARGETS, PEFT's "all-linear"): r x (in + out) each
    lora = sum(m.in_features + m.out_features for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head_module)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    matmul = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters()
                 if id(p) not in head)
    return ModelShape(params=params, layers=config.num_hidden_layers, hidden=config.hidden_size,
                      intermediate=config.intermediate_size, vocab=config.vocab_size,
                      heads=config.num_attention_heads,
                      kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                      head_dim=head_dim, lora_params_per_rank=lora, matmul_params=matmul, layer_params=layer,
                      root_params=params - layer * config.num_hidden_layers)


def kv_bytes_per_token(shape: ModelShape, bf16: bool) -> int:
    return shape.layers * 2 * shape.kv_dim * (2 if bf16 else 4)  # K and V of every layer


def kv_cache_bytes(shape: ModelShape, cfg, world_size: int = 1) -> int:
    longest = PROMPT_TOKENS + (cfg.max_turns + 1) * cfg.max_new_tokens + cfg.max_turns * cfg.max_obs_tokens
    questions = max(cfg.batch_size, cfg.opsd_questions if cfg.opsd else 0)  # a rollout's, over all processes
    episodes = cfg.rollout_batch_size or -(-questions * cfg.num_generations // world_size)
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


def plan(cfg, shape: ModelShape, world_size: int = 1, sharded: bool | None = None) -> dict:
    """{"items": {name: bytes}, "phases": {phase: (bytes, [items])}, "peak": (phase, bytes)} for one process.

    Sharded (FSDP2, parallel.shard: torchrun or --cpu-offload when `sharded` is None): weights, gradients, AdamW
    moments and the reference are 1/W per process (and in CPU memory with --cpu-offload); each process also holds
    the unsharded decoding copy that rollouts read (refreshed once per rollout; without LoRA it is the OPSD teacher
    too) and, in a forward, two gathered layers (the one computing and the one prefetched) and the root
    (embeddings, head; fp32).
    """
    P, W = shape.params, world_size
    sharded = W > 1 or cfg.cpu_offload if sharded is None else sharded
    on_gpu = 0 if cfg.cpu_offload else 1  # (offloaded shards live in CPU memory)
    weight = 2 if cfg.bf16 else 4  # bytes per parameter of the decoding copy
    frozen = 2 * shape.matmul_params + 4 * (P - shape.matmul_params) if cfg.bf16 else 4 * P  # a frozen copy
    lora = cfg.opsd and cfg.opsd_lora_rank > 0
    part = (lambda n: on_gpu * n // W) if sharded else (lambda n: n)  # noqa: E731
    items = {
        "policy weights (fp32)": part(4 * P),
        "gradients (fp32)": part(4 * P),
        "AdamW state (GRPO, fp32)": part(8 * P),
        "reference model": part(frozen) if cfg.beta > 0 else 0,
        "bf16 weight copies (autocast / decoding)": 0 if sharded else 2 * P if cfg.bf16 else 0,
        "decoding copy (unsharded)": weight * P if sharded else 0,
        "FSDP gathered weights (2 layers + root)": 2 * shape.layer_params * weight + shape.root_params * 4
        if sharded else 0,
        f"KV cache ({cfg.rollout_batch_size or 'all'} episodes)": kv_cache_bytes(shape, cfg, W),
        f"activations (micro-batch {cfg.micro_batch_size})": activation_bytes(shape, cfg),
        "activations, no-grad forward (one layer)": cfg.micro_batch_size * cfg.max_context_tokens *
        layer_bytes_per_token(shape, cfg.bf16),
        f"fused chunk ({cfg.chunk_size} rows)": cfg.chunk_size * shape.vocab * 4 * 3 + shape.vocab * shape.hidden * 4,
    }
    if lora:
        items[f"OPSD LoRA adapter (rank {cfg.opsd_lora_rank}) + grads + AdamW"] = \
            16 * cfg.opsd_lora_rank * shape.lora_params_per_rank
    elif cfg.opsd:
        items["OPSD teacher copy"] = 0 if sharded else frozen  # (sharded: the decoding copy teaches)
        items["OPSD AdamW (fp32)"] = part(8 * P)
    kv, act, nograd, chunk = (next(k for k in items if k.startswith(s)) for s in
                              ("KV cache", "activations (", "activations, no-grad", "fused chunk"))
    resident = ["policy weights (fp32)", "AdamW state (GRPO, fp32)", "reference model",
                "bf16 weight copies (autocast / decoding)", "decoding copy (unsharded)"]
    gathered = ["FSDP gathered weights (2 layers + root)"]
    phases = {
        "rollout": resident + [kv],
        "GRPO update": resident + gathered + ["gradients (fp32)", act, chunk],
        "evaluation": resident + [kv],
    }
    if cfg.opsd:
        opsd_items = [k for k in items if k.startswith("OPSD")]
        phases["OPSD phase"] = resident + gathered + opsd_items + [act, nograd, chunk] + \
            ([] if lora else ["gradients (fp32)"])
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
    ("--cpu-offload --opsd-lora-rank 0", lambda c: dataclasses.replace(c, cpu_offload=True, opsd_lora_rank=0)),
]


def advice(cfg, shape: ModelShape, budget: int, world_size: int = 1) -> list[str] | None:
    """Flag changes that make the plan fit `budget` bytes, or None if none of REMEDIES do: the remedies are taken
    in order while each lowers the peak, then any that the others make unnecessary is dropped again."""
    def peak(steps):
        c = cfg
        for _, change in steps:
            c = change(c)
        return plan(c, shape, world_size)["peak"][1], c

    steps = []
    for _ in range(40):
        if peak(steps)[0] <= budget:
            break
        for remedy in REMEDIES:
            if peak(steps + [remedy])[0] < peak(steps)[0]:
                steps.append(remedy)
                break
        else:
            return None
    else:
        return None
    for step in list(steps):  # drop what is not needed (the last remedies may make earlier ones redundant)
        rest = [s for s in steps if s is not step]
        if peak(rest)[0] <= budget:
            steps = rest
    final = peak(steps)[1]
    flags = dict.fromkeys(flag.format(**dataclasses.asdict(final)) for flag, _ in steps)
    return list(flags)


def format_plan(cfg, shape: ModelShape, budget: int | None, world_size: int = 1, where: str = "") -> str:
    """The plan as a table, the peak against the budget, and the flags that would make it fit."""
    p = plan(cfg, shape, world_size)
    size = f"{shape.params / 1e9:.2f}B" if shape.params >= 1e9 else f"{shape.params / 1e6:.1f}M"
    lines = [f"memory plan per GPU{where}: {size} parameters, {world_size} process{'es' if world_size > 1 else ''}, "
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
                     "  no setting tried fits: more GPUs (torchrun shards the state) or a smaller model")
    return "\n".join(lines)
