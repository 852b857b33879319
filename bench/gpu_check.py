"""The paper's recipe on one GPU, checked: peak memory of each phase against memory.py's plan, and throughput.

    python bench/gpu_check.py                     # CUDA: a random-init model with Qwen2.5-3B's configuration
    python bench/gpu_check.py --toy               # a small configuration on the CPU (the test suite runs this)
    python bench/gpu_check.py --corpus ../shared/data/corpus/wiki18_sample.jsonl --rollout-batch-size 32

No weights can be downloaded on the GPU machines, so the model is built from Qwen2.5-3B's published configuration
(36 layers, hidden 2048, 2 KV heads of 128, vocabulary 151,936, tied embeddings: 3.09B parameters) with random
weights, in fp32 master weights with bf16 compute (--bf16) and gradient checkpointing, as train.py runs it. A
random model never writes a tag, so a thin wrapper (Scripted) lets it sample `--free-tokens` tokens per turn and
then forces `<search> TITLE </search>` (an answer in the last turn): every forward is the real model's, the
retrieval is real BM25 over `--corpus` (the synthetic world's by default: ../shared may not be on the GPU
machine), observations are real, and the episodes have the lengths of a busy search agent. Then, on those
episodes: one GRPO step (grpo.grpo_step, the reference model in bf16), one OPSD phase with LoRA (the paper's way)
and one with full fine-tuning (opsd.opsd_phase, one optimizer step each). Printed per phase: seconds, tokens/s,
peak CUDA memory (torch.cuda.max_memory_allocated) and what memory.py planned for that phase.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import grpo  # noqa: E402
import memory  # noqa: E402
import opsd  # noqa: E402
import parallel  # noqa: E402
import train  # noqa: E402
from rollout import rollout  # noqa: E402
from search import BM25Retriever, parse_corpus_row  # noqa: E402

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=True)
TOY = dict(QWEN25_3B, vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


class Scripted(torch.nn.Module):
    """The real model's forward; then, per turn, `free` tokens sampled as it likes (never EOS, a tag's bracket or
    an id the tokenizer lacks), then the script: `<search> query </search>`, or `<answer> a </answer>` in the last turn.
    A turn starts where more than one token is fed (the prompt, or the last token + an observation); a chunk's
    first turn is the one fed into an empty KV cache."""

    def __init__(self, model, tokenizer, query: str, free: int, max_turns: int):
        super().__init__()
        self.model, self.free, self.max_turns = model, free, max_turns
        self.config, self.generation_config = model.config, model.generation_config
        encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        self.search, self.answer = encode(f" <search> {query} </search>"), encode(" <answer> yes </answer>")
        self.vocab = len(tokenizer)
        # no free token may start or end a tag by chance: ids whose text holds "<" or ">" are the script's alone
        self.tags = [i for i in range(self.vocab) if any(c in tokenizer.decode([i]) for c in "<>")]
        gen_eos = model.generation_config.eos_token_id
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else gen_eos or []
        self.eos = sorted({tokenizer.eos_token_id, *gen_eos} - {None})
        self.turn, self.step = 0, 0

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is None or cache.get_seq_length() == 0  # a new rollout chunk starts with an empty cache
        out = self.model(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:
            self.turn, self.step = (0 if fresh else self.turn + 1), 0
        else:
            self.step += 1
        logits = out.logits[:, -1]  # (B, V)
        logits[:, self.vocab:] = float("-inf")
        logits[:, self.eos + self.tags] = float("-inf")
        script = self.answer if self.turn >= self.max_turns else self.search
        if self.step >= self.free:
            forced = script[min(self.step - self.free, len(script) - 1)]
            logits.fill_(float("-inf"))
            logits[:, forced] = 0.0
        return out


def measure(name, fn, device, planned, tokens):
    """Run fn() -> result; print and return (seconds, tokens/s, peak GiB, planned GiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / memory.GiB if device.type == "cuda" else float("nan")
    n = tokens(result) if callable(tokens) else tokens
    row = (name, seconds, n / seconds, peak, planned / memory.GiB)
    print(f"{name:<26}{seconds:>9.1f}{n / seconds:>12.0f}{peak:>12.2f}{planned / memory.GiB:>12.2f}", flush=True)
    return result, row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", action="store_true", help="a small configuration, on the CPU if there is no GPU")
    parser.add_argument("--corpus", default=None, help="Search-R1 corpus jsonl for BM25 (default: the synthetic world)")
    parser.add_argument("--questions", type=int, default=13, help="questions in the rollout chunk (x 5 episodes)")
    parser.add_argument("--rollout-batch-size", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--max-obs-tokens", type=int, default=500)
    parser.add_argument("--free-tokens", type=int, default=120, help="tokens sampled per turn before the script")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--fsdp", action="store_true", help="also the torchrun code path (FSDP2) at world size 1")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.toy:
        raise SystemExit("error: no CUDA device here; `--toy` runs a small configuration on the CPU")
    device = torch.device("cuda" if cuda else "cpu")
    from transformers import Qwen2Config

    import tiny

    world = data.make_world(seed=0)
    tokenizer = tiny.build_tokenizer(world, tiny.TinyRecipe())  # any tokenizer: the model's vocabulary is larger
    config = Qwen2Config(**(TOY if args.toy else QWEN25_3B), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    passages = [parse_corpus_row(r) for r in world.corpus] if args.corpus is None else None
    retriever = BM25Retriever(args.corpus) if args.corpus else BM25Retriever(passages=passages)
    query = (passages or retriever.passages)[0].title

    flags = ["--model", "x/y", "--bf16", "--gradient-checkpointing", "--num-generations", "5",
             "--rollout-batch-size", str(args.rollout_batch_size), "--max-turns", str(args.max_turns),
             "--max-new-tokens", str(args.max_new_tokens), "--max-obs-tokens", str(args.max_obs_tokens),
             "--micro-batch-size", str(args.micro_batch_size), "--mini-batch-size", "none",
             "--batch-size", str(args.questions), "--opsd-questions", str(args.questions),
             "--opsd-batch-size", "1000", "--opsd-lora-rank", str(args.lora_rank), "--opsd-diagnostic-pairs", "0",
             "--opsd-students", "all", "--lr", "1e-6", "--opsd-lr", "1e-5"]
    cfg = train.parse_config(flags)
    if not cuda:
        cfg = dataclasses.replace(cfg, bf16=False)  # (bf16 autocast on a CPU is slow and says nothing here)
    shape = memory.model_shape(config)
    print(memory.format_plan(cfg, shape, memory.GiB * 80 if cuda else None, where=" (this check's settings)"))
    rows = check(cfg, config, tokenizer, world, retriever, query, device, args, sharded=False)
    if args.fsdp:  # the torchrun code path (FSDP2) at world size 1, on a fresh model: its cost against the above
        import tempfile

        import torch.distributed as dist

        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tempfile.mkdtemp()}/store",
                                rank=0, world_size=1)
        sharded = check(cfg, config, tokenizer, world, retriever, query, device, args, sharded=True)
        print(f"\nFSDP2 at world size 1 against the unwrapped model (time and peak memory, sharded / unwrapped):")
        for (name, s0, _, m0, _), (_, s1, _, m1, _) in zip(rows, sharded):
            print(f"  {name:<26} time {s1 / s0:5.2f}x   peak memory {m1 / m0 if m0 == m0 else float('nan'):5.2f}x")
        dist.destroy_process_group()


def check(cfg, config, tokenizer, world, retriever, query, device, args, *, sharded: bool) -> list[tuple]:
    """Build the model, then measure a rollout chunk, a GRPO step, and OPSD with LoRA and with full fine-tuning:
    the rows (phase, seconds, tokens/s, peak GiB, planned GiB). sharded: FSDP2 as train.py runs it under torchrun
    (the plan's world-size-1 sharded figures: the decoding copy resident, the state sharded over 1)."""
    from transformers import Qwen2ForCausalLM

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    t0 = time.time()
    with torch.device(device):
        policy = Qwen2ForCausalLM(config)  # random init, fp32 master weights, directly on the device
    train.disable_dropout(policy)
    policy.gradient_checkpointing_enable()
    policy.config.use_cache = False
    print(f"\nmodel{' (FSDP2, world size 1)' if sharded else ''}: "
          f"{sum(p.numel() for p in policy.parameters()) / 1e6:,.1f}M parameters, built in "
          f"{time.time() - t0:.1f} s on {device}; bf16 compute: {cfg.bf16}", flush=True)
    shape = memory.model_shape(config)
    plans, full_plans = ({name: nbytes for name, (nbytes, _) in
                          memory.plan(c, shape, world_size=1, sharded=sharded)["phases"].items()}
                         for c in (cfg, dataclasses.replace(cfg, opsd_lora_rank=0)))
    frozen_dtype = torch.bfloat16 if cfg.bf16 else None
    ref = parallel.frozen_copy(policy, frozen_dtype)
    decoder = None
    if sharded:
        decoder = parallel.frozen_copy(policy, frozen_dtype, matmuls_only=False)
        ref = parallel.shard(ref, bf16=False)
        policy = parallel.shard(policy, bf16=cfg.bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    examples = world.train[:args.questions]
    rollout_cfg = train.rollout_config(cfg, seed=0)
    print(f"{'phase':<26}{'seconds':>9}{'tokens/s':>12}{'peak GiB':>12}{'plan GiB':>12}")
    rows = []

    def decoding_model():
        if decoder is None:
            return parallel.for_decoding(policy, cfg.bf16)
        parallel.refresh(decoder, policy)
        return decoder

    def do_rollout():
        scripted = Scripted(decoding_model(), tokenizer, query, args.free_tokens, cfg.max_turns)
        with torch.no_grad(), parallel.autocast(cfg.bf16, device):
            return rollout(scripted, tokenizer, examples, retriever, rollout_cfg)

    episodes, row = measure("rollout (sampled tokens)", do_rollout, device, plans["rollout"],
                            lambda eps: sum(sum(e.loss_mask) for e in eps))
    rows.append(row)
    assert all(e.num_searches == cfg.max_turns for e in episodes), [(e.finish_reason, e.num_searches) for e in episodes]
    for i, e in enumerate(episodes):  # mixed rewards: non-zero advantages, and correct siblings for OPSD
        e.reward = float(i % 2)
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in episodes)
    print(f"  {len(episodes)} episodes, {tokens / len(episodes):.0f} tokens each on average, "
          f"{sum(e.num_searches for e in episodes)} searches", flush=True)

    def grpo_update():
        policy.train()
        with parallel.autocast(cfg.bf16, device):
            return grpo.grpo_step(policy, ref, optimizer, episodes, cfg)

    metrics, row = measure("GRPO step (all tokens)", grpo_update, device, plans["GRPO update"], tokens)
    rows.append(row)
    assert metrics["grpo/optimizer_steps"] == 1 and metrics["grpo/skipped_steps"] == 0, metrics
    for name, rank, planned in (("OPSD phase, LoRA", cfg.opsd_lora_rank, plans["OPSD phase"]),
                                ("OPSD phase, full", 0, full_plans["OPSD phase"])):
        phase_cfg = dataclasses.replace(cfg, opsd_lora_rank=rank)

        def run_phase():
            frozen = decoding_model() if sharded and not rank else None
            with parallel.autocast(cfg.bf16, device):
                return opsd.opsd_phase(policy, episodes, tokenizer, phase_cfg, seed=0, frozen=frozen)

        metrics, row = measure(name, run_phase, device, planned, lambda m: m["opsd/loss_tokens"] * 3)
        rows.append(row)
        assert metrics["opsd/optimizer_steps"] == 1 and metrics["opsd/pairs"] > 0, metrics
    print("(tokens/s of an OPSD phase: student tokens x 3 passes (KL before, the step, KL after); the plan is the "
          "worst case of these settings)")
    del policy, ref, decoder, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
