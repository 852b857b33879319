"""Search-E1 self-evolution: rounds of GRPO, then on-policy self-distillation (OPSD), then evaluation.

    python train.py                                     # tiny model, synthetic world, local BM25 (CPU, minutes)
    python train.py --model Qwen/Qwen2.5-3B-Instruct --train-data nq_hotpotqa_train.parquet \
        --eval-data nq_test.jsonl,hotpotqa_dev.jsonl --retriever http://127.0.0.1:8000/retrieve --bf16
    torchrun --nproc_per_node 8 train.py ...             # one rank per GPU (gloo on CPU)
    python train.py --resume runs/NAME                  # continue a killed run from its last checkpoint

The loop: an evaluation of the starting model (round -1, the baseline; --no-eval-at-start skips it), then per
round (the paper runs 2):
  GRPO phase, `grpo_steps` steps:  1 rollout  -> 2 reward (exact match) -> 3 group advantage
                                   -> 4 old/ref log-probs -> 5 clipped policy update  (grpo.py)
  OPSD phase: roll out the current policy on fresh training questions, mine (student, reference) sibling pairs,
              freeze a copy of the policy as teacher, and minimise the clipped forward KL(teacher || student) on
              the student's own tokens, the teacher reading the reference in its prompt  (opsd.py)
  evaluation: greedy episodes on the eval sets, exact match per set and the average  (evaluate.py)

Every step appends one line to RUN/metrics.jsonl; RUN/checkpoint holds the latest state (weights, optimizer, RNG,
position in the schedule), written atomically every `save_every` GRPO steps and after each phase, so a run
killed at any moment resumes from its last checkpoint and ends with the same numbers as an uninterrupted run.
"""
import argparse
import copy
import dataclasses
import inspect
import json
import os
import random
import re
import shutil
import time
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import data
import evaluate
import grpo
import opsd
from rollout import RolloutConfig, rollout
from search import BM25Retriever, HTTPRetriever, parse_corpus_row


@dataclass
class TrainConfig:
    # --- model
    model: str = "tiny"  # "tiny" (built-in, trained in-process), a hub id, or a local directory
    gguf_file: str | None = None  # load `model` from this GGUF file inside it (needs gguf + accelerate)
    bf16: bool = False  # bfloat16 weights and activations (GPU); fp32 otherwise
    gradient_checkpointing: bool = False  # recompute activations in backward (large models)
    # --- data
    train_data: str | None = None  # FlashRAG / Search-R1 file or hub name; None = the synthetic world
    eval_data: str | None = None  # comma-separated files or hub names; None = the synthetic world's test split
    eval_limit: int | None = None  # questions per eval set (None = all)
    world_seed: int = 0  # seed of the synthetic world
    world_scale: float = 8.0  # entities in the synthetic world, x 320 passages
    world_train: int = 6000  # training questions in the synthetic world (its test split has 200)
    # --- retrieval
    retriever: str | None = None  # http://host:port/retrieve (Search-R1 API); None = local BM25 over `corpus`
    corpus: str | None = None  # Search-R1 corpus jsonl for local BM25; None = the synthetic world's corpus
    topk: int = 3  # passages per search
    # --- rollout (Search-R1 defaults)
    num_generations: int = 5  # G, samples per question
    max_turns: int = 4  # searches per episode
    max_new_tokens: int = 500  # per turn
    max_obs_tokens: int = 500  # retrieved text per search, in tokens
    max_context_tokens: int = 4096  # prompt + response
    temperature: float = 1.0  # sampling temperature of training rollouts (evaluation is greedy)
    top_p: float = 1.0  # nucleus mass of training rollouts
    # --- schedule
    num_rounds: int = 2  # GRPO -> OPSD rounds (the paper: 2)
    grpo_steps: int = 100  # GRPO updates per round
    batch_size: int = 512  # questions per GRPO step, over all processes (Search-R1: 512)
    opsd_questions: int = 512  # questions rolled out per OPSD phase
    opsd_epochs: int = 1  # passes over the mined pairs
    opsd_batch_size: int = 64  # pairs per OPSD optimizer step
    # --- GRPO (grpo.py)
    lr: float = 1e-6  # Search-R1: 1e-6
    weight_decay: float = 0.01  # AdamW
    beta: float = 0.001  # k3 KL coefficient to the initial model (0 = no reference model)
    epsilon: float = 0.2  # PPO clip
    epsilon_high: float | None = None  # upper clip (DAPO); None = epsilon
    loss_type: str = "token_mean"  # token_mean | seq_mean | dr_grpo
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False  # no loss on episodes cut by the context limit
    num_iterations: int = 1  # passes over each rollout batch (TRL's mu)
    mini_batch_size: int | None = 1280  # episodes per optimizer step, all processes (0 or None = whole batch; Search-R1: 256 x 5)
    micro_batch_size: int = 8  # episodes per forward/backward
    max_grad_norm: float = 1.0  # gradient clipping
    chunk_size: int = 1024  # rows of hidden states per lm_head chunk in the fused log-prob / KL
    # --- OPSD (opsd.py)
    opsd: bool = True  # run the OPSD phase after each GRPO phase (--no-opsd: GRPO only, the ablation)
    opsd_lr: float | None = None  # None = lr
    opsd_clip: float | None = 1.0  # upper clip of each vocabulary entry's KL term (None = off)
    opsd_students: str = "most_different"  # most_different | incorrect | all
    # --- plumbing
    eval_at_start: bool = True  # evaluate the starting model first: the baseline of the curves (--no-eval-at-start)
    output_dir: str = "runs"  # run folders go here
    run_name: str | None = None  # None = a timestamp
    seed: int = 0  # data order and rollout sampling
    save_every: int = 10  # GRPO steps between checkpoints (and after every phase)
    resume: str | None = None  # a run folder to continue
    save_rollouts: bool = False  # write every GRPO step's episodes to RUN/rollouts/ (token ids, masks, rewards)


# Where the built-in tiny model needs otherwise. Applied only to flags not given on the command line.
TINY_DEFAULTS = dict(
    lr=2e-4, weight_decay=0.0, grpo_steps=16, batch_size=16, opsd_questions=64, opsd_batch_size=32,
    mini_batch_size=None, micro_batch_size=80, max_new_tokens=40, max_obs_tokens=160, max_context_tokens=800,
    eval_limit=200, save_every=4, opsd_lr=2e-4, topk=1,  # topk: the passages tiny.py warm-starts on
)


def parse_config(argv=None) -> TrainConfig:
    """Flags from the dataclass: one per field, its comment as help; "none" sets an optional field to None."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hints = typing.get_type_hints(TrainConfig)
    comments = dict(re.findall(r"^    (\w+): .*?#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    for f in dataclasses.fields(TrainConfig):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        help = f"{comments.get(f.name, '')} (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            optional = type(None) in typing.get_args(kind)
            parse = (lambda b: lambda v: None if v.lower() == "none" else b(v))(base) if optional else base
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None or hints[k] is not bool}
    if given.get("resume"):
        # A resumed run keeps its own config; only the resume path comes from the command line.
        if set(given) - {"resume"}:
            raise SystemExit("error: --resume takes no other flags (the run keeps its config.json)")
        path = Path(given["resume"]) / "config.json"
        try:
            # (runs from before eval_at_start existed have no baseline unit in their schedule)
            return TrainConfig(**{"eval_at_start": False, **json.loads(path.read_text()), "resume": given["resume"]})
        except (OSError, ValueError, TypeError) as e:
            raise SystemExit(f"error: --resume {given['resume']}: no readable config.json there ({e})")
    if given.get("model", "tiny") == "tiny":
        given = {**TINY_DEFAULTS, **given}
    return TrainConfig(**given)


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Impossible configurations end here, before anything is loaded or written."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    if cfg.batch_size % world_size:
        bad(f"--batch-size {cfg.batch_size} is not divisible by the {world_size} processes")
    if cfg.opsd_questions % world_size:
        bad(f"--opsd-questions {cfg.opsd_questions} is not divisible by the {world_size} processes")
    if cfg.loss_type not in ("token_mean", "seq_mean", "dr_grpo"):
        bad(f"--loss-type {cfg.loss_type!r}: choose token_mean, seq_mean or dr_grpo")
    if cfg.scale_rewards not in ("group", "batch", "none"):
        bad(f"--scale-rewards {cfg.scale_rewards!r}: choose group, batch or none")
    if cfg.opsd_students not in ("most_different", "incorrect", "all"):
        bad(f"--opsd-students {cfg.opsd_students!r}: choose most_different, incorrect or all")
    if cfg.num_generations < 2:
        bad("--num-generations must be at least 2 (group advantages need siblings)")
    for name in ("batch_size", "opsd_questions", "opsd_batch_size", "opsd_epochs", "num_iterations", "chunk_size",
                 "micro_batch_size", "max_new_tokens", "max_obs_tokens", "topk", "save_every"):
        if getattr(cfg, name) < 1:
            bad(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("grpo_steps", "num_rounds", "max_turns"):
        if getattr(cfg, name) < 0:
            bad(f"--{name.replace('_', '-')} must not be negative")
    if cfg.opsd_batch_size % world_size:
        bad(f"--opsd-batch-size {cfg.opsd_batch_size} is not divisible by the {world_size} processes")
    if cfg.mini_batch_size and (cfg.batch_size * cfg.num_generations) % cfg.mini_batch_size:
        bad(f"--mini-batch-size {cfg.mini_batch_size} does not divide the {cfg.batch_size * cfg.num_generations} "
            "episodes of a step")
    if cfg.mini_batch_size and cfg.mini_batch_size % world_size:
        bad(f"--mini-batch-size {cfg.mini_batch_size} is not divisible by the {world_size} processes")
    if cfg.train_data and not (cfg.corpus or cfg.retriever):
        bad("--train-data needs a retriever: give --corpus FILE (local BM25) or --retriever URL")
    if bool(cfg.train_data) != bool(cfg.eval_data):
        bad("--train-data and --eval-data go together (without both, the run uses the synthetic world)")
    if not cfg.train_data and cfg.corpus:
        bad("--corpus needs --train-data and --eval-data (the synthetic world brings its own corpus)")


def rollout_config(cfg: TrainConfig, *, seed: int, greedy: bool = False) -> RolloutConfig:
    return RolloutConfig(
        num_generations=1 if greedy else cfg.num_generations, max_turns=cfg.max_turns,
        max_new_tokens=cfg.max_new_tokens, max_obs_tokens=cfg.max_obs_tokens,
        max_context_tokens=cfg.max_context_tokens, topk=cfg.topk, temperature=cfg.temperature,
        top_p=cfg.top_p, greedy=greedy, seed=seed,
    )


# ---------------------------------------------------------------- loading


def load_model(cfg: TrainConfig, world, device):
    """(model, tokenizer). 'tiny' is built in-process (tiny.py); anything else goes through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model == "tiny":
        import tiny

        # Under torchrun rank 0 builds (or loads) the cached model first; the others then load it.
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank != 0 and world_size > 1:
            dist.barrier()
        model, tokenizer = tiny.load_tiny(world, world_args(cfg), log=tqdm.write)
        if rank == 0 and world_size > 1:
            dist.barrier()
    else:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model, dtype=torch.bfloat16 if cfg.bf16 else torch.float32, **kwargs
            )
        except (OSError, ValueError) as e:
            offline = " (HF_HUB_OFFLINE is set: give a local directory)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise SystemExit(f"error: cannot load model {cfg.model!r}{offline}: {str(e).splitlines()[0]}")
    if cfg.bf16:
        model = model.to(torch.bfloat16)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False  # rollouts pass use_cache explicitly
    return model.to(device), tokenizer


def world_args(cfg: TrainConfig) -> dict:
    return {"seed": cfg.world_seed, "scale": cfg.world_scale, "num_train": cfg.world_train}


def make_retriever(url: str | None, corpus: str | None, world):
    """HTTP (checked once, so a dead server fails here), BM25 over a corpus file, or BM25 over the world."""
    if url:
        retriever = HTTPRetriever(url)
        try:
            retriever.search(["health check"], 1)
        except Exception as e:  # noqa: BLE001 - one clear line, whatever the transport said
            raise SystemExit(f"error: retriever {url} is not answering: {str(e).splitlines()[0]}")
        return retriever
    try:
        return BM25Retriever(corpus) if corpus else BM25Retriever(passages=[parse_corpus_row(r) for r in world.corpus])
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def load_data(cfg: TrainConfig):
    """(world or None, train examples, {eval name: examples}, retriever)."""
    world = None
    if not cfg.train_data or cfg.model == "tiny":  # the tiny model's tokenizer is trained on the world
        world = data.make_world(**world_args(cfg))
    try:
        train = data.load_qa(cfg.train_data, split="train") if cfg.train_data else world.train
        if cfg.eval_data:
            evals = {}
            for name in cfg.eval_data.split(","):
                examples = data.load_qa(name.strip())
                evals[examples[0].source if examples else Path(name).stem] = examples
        else:
            evals = {"synthetic": world.test}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    if cfg.eval_limit:
        evals = {k: v[:cfg.eval_limit] for k, v in evals.items()}
    if not train:
        raise SystemExit(f"error: {cfg.train_data}: no training questions")
    retriever = make_retriever(cfg.retriever, cfg.corpus, world)
    return world, train, evals, retriever


# ---------------------------------------------------------------- the schedule


def schedule(cfg: TrainConfig) -> list[tuple[int, str, int]]:
    """Every unit of work in order, as (round, phase, step); a checkpoint records the index of the next one."""
    units = []
    if cfg.eval_at_start:
        units.append((-1, "eval", 0))  # round -1: the starting model, the baseline every curve is read against
    for r in range(cfg.num_rounds):
        units += [(r, "grpo", s) for s in range(cfg.grpo_steps)]
        units += [(r, "opsd", 0)] if cfg.opsd else []
        units += [(r, "eval", 0)]
    return units


def draw_questions(examples, n: int, seed: int, offset: int):
    """Questions [offset, offset + n) of an endless stream of seeded shuffles: the data cursor is `offset`."""
    out = []
    while len(out) < n:
        epoch, pos = divmod(offset + len(out), len(examples))
        order = np.random.default_rng([seed, epoch]).permutation(len(examples))
        out += [examples[i] for i in order[pos:pos + n - len(out)]]
    return out


def shard(items, rank: int, world_size: int):
    """Whole questions per rank, so a GRPO group never straddles processes."""
    return items[rank::world_size]


def unit_seed(cfg: TrainConfig, unit: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + unit) * 1009 + rank


# ---------------------------------------------------------------- plumbing: checkpoints and logs


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict) -> None:
    """Atomic: written to checkpoint.tmp, then swapped in; a kill at any moment leaves one whole checkpoint."""
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1000GB")  # one file, so resume reads model.safetensors
    tokenizer.save_pretrained(tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"optimizer": optimizer.state_dict(), "rng": rng, **state}, tmp / "trainer_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives only a kill between the two renames
        if (run_dir / name / "trainer_state.pt").exists():
            return run_dir / name
    return None


def save_rollouts(path: Path, episodes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in episodes:
            row = {k: v for k, v in vars(e).items() if k != "example"}
            f.write(json.dumps({"example": asdict(e.example), **row}) + "\n")


class MetricsLog:
    """metrics.jsonl, one line per step; on resume, lines written after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_lines: int | None = None):
        self.path = path
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        if keep_lines is not None:
            path.write_text("".join(lines[:keep_lines]))
        self.lines = min(len(lines), keep_lines) if keep_lines is not None else len(lines)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1


def episode_metrics(episodes, prefix="rollout") -> dict:
    n = max(len(episodes), 1)
    return {
        "reward/mean": sum(e.reward for e in episodes) / n,
        f"{prefix}/searches_per_episode": sum(e.num_searches for e in episodes) / n,
        f"{prefix}/invalid_per_episode": sum(e.num_invalid for e in episodes) / n,
        f"{prefix}/response_tokens": sum(len(e.response_ids) for e in episodes) / n,
        f"{prefix}/truncated_fraction": sum(e.is_truncated for e in episodes) / n,
    }


def phase_metrics(steps: list[dict]) -> dict:
    """OPSD step metrics over the phase: token-weighted means, summed counts (each step's are already global)."""
    tokens = sum(m["opsd/loss_tokens"] for m in steps)
    out = {"opsd/loss_tokens": tokens, "opsd/skipped_steps": sum(m["opsd/skipped_steps"] for m in steps),
           "opsd/optimizer_steps": float(len(steps))}
    for key in ("opsd/loss", "opsd/kl", "opsd/student_entropy"):
        out[key] = sum(m[key] * m["opsd/loss_tokens"] for m in steps) / tokens if tokens else 0.0
    out["opsd/grad_norm"] = sum(m["opsd/grad_norm"] for m in steps) / max(len(steps), 1)
    return out


def max_over_ranks(value: int, world_size: int) -> int:
    if world_size == 1:
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_mean(metrics: dict, world_size: int) -> dict:
    """Average per-rank metrics over processes (rank-local quantities such as rollout statistics)."""
    if world_size == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / world_size for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    cfg = parse_config(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    check_config(cfg, world_size)
    if world_size > 1:
        # CPU bookkeeping tensors (metrics, counts) go over gloo beside NCCL.
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main_process = rank == 0
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours is the only progress bar
    say = tqdm.write if main_process else (lambda *a, **k: None)

    # Load everything that can fail before the run folder exists.
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    world, train_examples, eval_sets, retriever = load_data(cfg)
    policy, tokenizer = load_model(cfg, world, device)
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.beta > 0 else None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # Rank 0 names the run folder (a timestamp) and checks it; every rank gets the same folder or the same error.
    run_dir, error = Path(cfg.resume or Path(cfg.output_dir) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))), None
    if main_process and not cfg.resume:
        if (run_dir / "config.json").exists():
            error = f"error: {run_dir} already holds a run (use --resume {run_dir} or another --run-name)"
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if world_size > 1:
        shared = [run_dir, error]
        dist.broadcast_object_list(shared, src=0)
        run_dir, error = shared
    if error:
        raise SystemExit(error)
    next_unit, keep_lines, results = 0, 0, {}
    ckpt = find_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        from safetensors.torch import load_file

        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        weights = load_file(ckpt / "model.safetensors", device=str(device))
        missing, unexpected = policy.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # a tied lm_head is saved once, as the embedding
            raise SystemExit(f"error: {ckpt}: checkpoint does not match the model ({missing[:3]} {unexpected[:3]})")
        optimizer.load_state_dict(state["optimizer"])
        random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        next_unit, keep_lines, results = state["next_unit"], state["metrics_lines"], state["results"]
    log = MetricsLog(run_dir / "metrics.jsonl", keep_lines if cfg.resume else None) if main_process else None

    say("config: " + json.dumps(asdict(cfg)))
    say(f"run folder: {run_dir}  processes: {world_size}  device: {device}  "
        f"parameters: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M")
    units = schedule(cfg)
    # What one process does of a global step: its share of each GRPO mini-batch.
    rank_cfg = dataclasses.replace(cfg, mini_batch_size=cfg.mini_batch_size and cfg.mini_batch_size // world_size)
    bar = tqdm(total=len(units), initial=next_unit, desc="search-e1", disable=not main_process, dynamic_ncols=True)

    def checkpoint(next_index: int):
        if main_process:
            save_checkpoint(run_dir, policy, tokenizer, optimizer, {
                "next_unit": next_index, "metrics_lines": log.lines, "results": results,
                "data_cursor": sum(1 for r, p, _ in units[:next_index] if p == "grpo") * cfg.batch_size,
                "config": asdict(cfg),
            })
        if world_size > 1:
            dist.barrier()

    for index in range(next_unit, len(units)):
        rnd, phase, step = units[index]
        bar.set_description(f"round {rnd + 1}/{cfg.num_rounds} {phase}" if rnd >= 0 else "start eval")
        t0 = time.time()
        seed = unit_seed(cfg, index - cfg.eval_at_start, rank)  # the same with or without the baseline unit
        policy.train()  # rollouts switch to eval mode and back; training with gradient checkpointing needs train()
        if phase == "grpo":
            # 1. rollout on this rank's shard of the step's questions (G samples each)
            global_step = rnd * cfg.grpo_steps + step
            questions = draw_questions(train_examples, cfg.batch_size, cfg.seed, global_step * cfg.batch_size)
            with torch.no_grad():
                episodes = rollout(policy, tokenizer, shard(questions, rank, world_size), retriever,
                                   rollout_config(cfg, seed=seed))
            if cfg.save_rollouts:
                save_rollouts(run_dir / "rollouts" / f"unit{index:05d}-rank{rank}.jsonl", episodes)
            # 2-5. reward is set by the rollout (exact match); advantages, old/ref log-probs and the update
            metrics = all_mean(episode_metrics(episodes), world_size)
            metrics |= grpo.grpo_step(policy, ref_model, optimizer, episodes, rank_cfg)
        elif phase == "opsd":
            # Fresh on-policy samples, drawn from the stream beyond everything the GRPO steps take.
            offset = (cfg.num_rounds * cfg.grpo_steps + rnd) * cfg.batch_size + rnd * cfg.opsd_questions
            questions = draw_questions(train_examples, cfg.opsd_questions, cfg.seed, offset)
            with torch.no_grad():
                episodes = rollout(policy, tokenizer, shard(questions, rank, world_size), retriever,
                                   rollout_config(cfg, seed=seed))
            pairs, mined = opsd.mine_pairs(episodes, students=cfg.opsd_students)
            teacher = copy.deepcopy(policy).eval().requires_grad_(False)  # frozen at the start of the phase
            opt = torch.optim.AdamW(policy.parameters(), lr=cfg.opsd_lr or cfg.lr, weight_decay=cfg.weight_decay)
            metrics = all_mean(episode_metrics(episodes, prefix="opsd_rollout"), world_size)
            metrics |= all_mean({f"opsd/{k}": v for k, v in mined.items()}, world_size)
            metrics["opsd/kl_before"] = opsd.opsd_kl(policy, teacher, pairs, tokenizer, cfg)
            # Every rank takes the same number of optimizer steps (gradients are all-reduced), some maybe empty.
            per_rank = max(cfg.opsd_batch_size // world_size, 1)
            num_steps = -(-max_over_ranks(len(pairs), world_size) // per_rank)
            rng, steps = random.Random(seed), []
            for _ in range(cfg.opsd_epochs):
                order = rng.sample(pairs, len(pairs))
                for i in range(num_steps):
                    steps.append(opsd.opsd_step(policy, teacher, opt, order[i * per_rank:(i + 1) * per_rank],
                                                tokenizer, cfg))
            metrics |= phase_metrics(steps)
            metrics["opsd/kl_after"] = opsd.opsd_kl(policy, teacher, pairs, tokenizer, cfg)
            del teacher, opt
        else:  # eval
            policy.eval()
            results = evaluate.evaluate_sets(policy, tokenizer, eval_sets, retriever,
                                             rollout_config(cfg, seed=0, greedy=True),
                                             rank=rank, world_size=world_size)
            metrics = {f"eval/{name}/{k}": v for name, row in results.items() for k, v in row.items()}
            if main_process:
                title = f"round {rnd + 1} evaluation" if rnd >= 0 else "evaluation of the starting model"
                tqdm.write(evaluate.format_table(results, title=title))
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["time/unit_s"] = time.time() - t0
        if main_process:
            log.write({"round": rnd, "phase": phase, "step": step, "unit": index, **metrics})
            shown = {"reward": "reward/mean", "searches": "rollout/searches_per_episode", "kl": "grpo/kl",
                     "opsd_kl": "opsd/kl_after", "em": "eval/" + next(iter(eval_sets)) + "/em"}
            bar.set_postfix({name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics})
        bar.update(1)
        # (the baseline evaluation is cheap to redo: no checkpoint of the unchanged model)
        if rnd >= 0 and (phase != "grpo" or (step + 1) % cfg.save_every == 0) or index == len(units) - 1:
            checkpoint(index + 1)
    bar.close()

    if main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))  # its presence marks a complete run
        say(f"done: {run_dir}")
    if world_size > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
