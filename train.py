"""Search-E1 self-evolution: rounds of GRPO, then on-policy self-distillation (OPSD), then evaluation.

    python train.py                                     # tiny model, synthetic world, local BM25 (CPU, minutes)
    python train.py --model Qwen/Qwen2.5-3B-Instruct --train-data nq_hotpotqa_train.parquet \
        --eval-data nq_test.jsonl,hotpotqa_dev.jsonl --retriever http://127.0.0.1:8000/retrieve --bf16
    torchrun --nproc_per_node 8 train.py ...             # FSDP2 over one rank per GPU (gloo on CPU)
    python train.py --resume runs/NAME                  # continue a killed run from its last checkpoint
    python train.py --eval-only --model runs/NAME/checkpoint [--eval-data nq,bamboogle --data-dir DIR]

The loop: an evaluation of the starting model (round -1, the baseline; --no-eval-at-start skips it), then per
round (the paper runs 2):
  GRPO phase, `grpo_steps` steps:  1 rollout  -> 2 reward (exact match) -> 3 group advantage
                                   -> 4 old/ref log-probs -> 5 clipped policy update      (grpo.grpo_step)
  OPSD phase:                      1 rollout on fresh questions -> 2 sibling pairs -> 3 frozen teacher
                                   -> 4-6 clipped forward KL(teacher || student) steps    (opsd.opsd_phase)
  evaluation:                      greedy episodes on the eval sets, exact match per set and the average

Every unit of the schedule appends one line to RUN/metrics.jsonl; RUN/checkpoint holds the latest state (weights,
optimizer, RNG, position in the schedule), written atomically every `save_every` GRPO steps and after each phase,
so a run killed at any moment resumes from its last checkpoint and ends with the same numbers as an uninterrupted
run. `--eval-only` is the benchmark runner (Search-R1's evaluate.sh runs verl's trainer with val_only=True, the
same idea): the same flags, model loading and retrieval as training, and a checkpoint brings its run's settings.

The file reads top-down: configuration, loading, the schedule, then `main`, whose loop marks each block
# ALGO (the method: rollout, update, evaluation) or # PLUMBING (logging, checkpoints, processes).
"""
import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
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
import memory
import opsd
import parallel
from rollout import RolloutConfig, rollout
import search
from search import BM25Retriever, HTTPRetriever, parse_corpus_row


@dataclass
class TrainConfig:
    # --- model
    model: str = "tiny"  # "tiny" (built-in, trained in-process), a hub id, a local directory or a run's checkpoint
    gguf_file: str | None = None  # load `model` from this GGUF file inside it (needs gguf + accelerate)
    bf16: bool = False  # bf16 compute (autocast), fp32 master weights and AdamW; frozen copies in bf16 (GPU)
    gradient_checkpointing: bool = False  # recompute activations in backward (large models)
    # --- data
    train_data: str | None = None  # FlashRAG / Search-R1 file or hub name; None = the synthetic world
    eval_data: str | None = None  # comma-separated files, hub names, benchmark names (--data-dir); None = synthetic
    data_dir: str | None = None  # where benchmark names in --eval-data are looked up (FlashRAG's nq/test.jsonl, ...)
    eval_limit: int | None = None  # questions per eval set (None = all)
    world_seed: int = 0  # seed of the synthetic world
    world_scale: float = 8.0  # entities in the synthetic world, x 320 passages
    world_train: int = 6000  # training questions in the synthetic world (its test split has 200)
    # --- retrieval
    retriever: str | None = None  # http://host:port/retrieve (Search-R1 API); None = local BM25 over `corpus`
    corpus: str | None = None  # Search-R1 corpus jsonl for local BM25 or --dense; None = the synthetic world's corpus
    dense: str | None = None  # in-process dense retrieval, this encoder (intfloat/e5-base-v2); None = BM25
    embeddings: str | None = None  # --dense: passage embeddings .npy, loaded or written; None = beside the corpus
    faiss_index: str | None = None  # --dense: search this FAISS index (Search-R1's e5_Flat.index), not exact
    topk: int = 3  # passages per search
    # --- rollout (Search-R1 defaults)
    num_generations: int = 5  # G, samples per question
    max_turns: int = 4  # searches per episode
    max_new_tokens: int = 500  # per turn
    max_obs_tokens: int = 500  # retrieved text per search, in tokens
    max_context_tokens: int = 4096  # prompt + response
    temperature: float = 1.0  # sampling temperature of training rollouts (evaluation is greedy)
    top_p: float = 1.0  # nucleus mass of training rollouts
    rollout_batch_size: int | None = 128  # most episodes decoding at once (their KV cache); None = all
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
    mini_batch_size: int | None = 1280  # episodes per optimizer step, all processes (0/None: all; Search-R1: 256x5)
    micro_batch_size: int = 8  # episodes per forward/backward
    max_grad_norm: float = 1.0  # gradient clipping
    chunk_size: int = 1024  # rows of hidden states per lm_head chunk in the fused log-prob / KL
    # --- OPSD (opsd.py)
    opsd: bool = True  # run the OPSD phase after each GRPO phase (--no-opsd: GRPO only, the ablation)
    opsd_lr: float | None = None  # None = lr
    opsd_clip: float | None = 1.0  # upper clip of each vocabulary entry's KL term (None = off)
    opsd_students: str = "most_different"  # most_different | incorrect | all
    opsd_reference: str = "sibling"  # sibling (the paper) | mismatched (control: another question's correct episode)
    opsd_max_tokens: int | None = None  # teacher sequence bound (prompt, reference, student); None = max_context
    opsd_lora_rank: int = 64  # LoRA rank in the OPSD phase (the paper's adapter; needs PEFT); 0 = full fine-tuning
    opsd_lora_alpha: float | None = None  # LoRA alpha (scale alpha / rank); None = 2 x rank
    opsd_diagnostic_pairs: int = 64  # greedy teacher vs student episodes on this many questions a phase; 0 = off
    # --- plumbing
    eval_only: bool = False  # evaluate --model on the eval sets and stop (the benchmark runner)
    dry_run: bool = False  # print the memory plan and stop (reads only the model's config)
    gpu_memory_gb: float | None = None  # the memory plan's budget per GPU; None = the device's memory
    eval_at_start: bool = True  # evaluate the starting model first: the baseline of the curves (--no-eval-at-start)
    output_dir: str = "runs"  # run folders go here
    run_name: str | None = None  # None = a timestamp
    seed: int = 0  # data order and rollout sampling
    cpu_offload: bool = False  # FSDP2 keeps weight shards, gradients and AdamW state in CPU memory (see the plan)
    save_every: int = 10  # GRPO steps between checkpoints (and after every phase)
    resume: str | None = None  # a run folder to continue
    save_rollouts: bool = False  # write every GRPO step's episodes to RUN/rollouts/ (token ids, masks, rewards)


# Where the built-in tiny model needs otherwise. Applied only to flags not given on the command line.
TINY_DEFAULTS = dict(
    lr=2e-4, weight_decay=0.0, grpo_steps=12, batch_size=16, opsd_questions=64, opsd_batch_size=32,
    mini_batch_size=None, micro_batch_size=80, max_new_tokens=40, max_obs_tokens=160, max_context_tokens=800,
    eval_limit=200, save_every=4, opsd_lr=2e-4, topk=1,  # topk: the passages tiny.py warm-starts on
    rollout_batch_size=320, opsd_lora_rank=0,  # all of an OPSD phase's episodes at once; full fine-tuning (no PEFT)
)
# Fields a checkpoint's saved configuration does not pass on to a run or evaluation started from it.
NOT_INHERITED = ("model", "gguf_file", "resume", "run_name", "output_dir", "eval_only", "save_rollouts", "dry_run",
                 "gpu_memory_gb", "cpu_offload", "rollout_batch_size")  # (and the hardware: this machine's own)
# Inherited only with the eval sets they describe (new --eval-data: all of its questions, looked up anew).
EVAL_SET_FIELDS = ("eval_limit", "data_dir")


# ---------------------------------------------------------------- configuration


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_config(argv=None) -> TrainConfig:
    """Flags from the dataclass: one per field, its comment as help; "none" sets an optional field to None.

    Defaults come, in order, from the command line, then the model's own settings (TINY_DEFAULTS for "tiny", the
    saved configuration of a run's checkpoint), then the dataclass.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    hints = typing.get_type_hints(TrainConfig)
    comments = dict(re.findall(r"^    (\w+): .*?#\s*(.*)$", inspect.getsource(TrainConfig), re.M))
    for f in dataclasses.fields(TrainConfig):
        flag, kind = _flag(f.name), hints[f.name]
        tiny = f"; --model tiny: {TINY_DEFAULTS[f.name]}" if f.name in TINY_DEFAULTS else ""
        help = f"{comments.get(f.name, '')} (default: {f.default}{tiny})".replace("%", "%%")
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
        run_dir = Path(given["resume"])
        if (run_dir / "trainer_state.pt").exists():
            raise SystemExit(f"error: --resume {run_dir}: this is a checkpoint; resume its run folder {run_dir.parent}")
        try:
            saved = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --resume {run_dir}: no readable config.json there ({e})")
        # (runs from before eval_at_start existed have no baseline unit in their schedule)
        return _config({"eval_at_start": False, **saved, "resume": given["resume"]})
    model = given.get("model", "tiny")
    if model == "tiny":
        base = TINY_DEFAULTS
    else:
        saved = checkpoint_config(model)
        base = {k: v for k, v in (saved or {}).items() if k not in NOT_INHERITED}
        if "eval_data" in given:
            base = {k: v for k, v in base.items() if k not in EVAL_SET_FIELDS}
        if saved and int(os.environ.get("RANK", 0)) == 0:
            inherited = {k: v for k, v in base.items() if k not in given and v != getattr(TrainConfig, k, v)}
            print(f"settings from {model}'s run (give a flag to change one): "
                  + ", ".join(f"{k}={v}" for k, v in inherited.items()), file=sys.stderr)
    return _config({**base, **given})


def config_markdown() -> str:
    """The README's configuration tables, from the dataclass (tests/test_train.py checks the README has them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    out = []
    for line in inspect.getsource(TrainConfig).splitlines():
        if section := re.match(r"\s+# --- (.*)", line):
            out += ["", f"**{section.group(1)}**", "", "| flag | default | meaning |", "|---|---|---|"]
        elif field := re.match(r"    (\w+): .*?#\s*(.*)$", line):
            name, comment = field.groups()
            default = json.dumps(defaults[name]) if isinstance(defaults[name], str) else str(defaults[name])
            tiny = f" (tiny: {TINY_DEFAULTS[name]})" if name in TINY_DEFAULTS else ""
            out.append(f"| `{_flag(name)}` | {default}{tiny} | {comment.replace('|', '/')} |")
    return "\n".join(out[1:])


def _config(values: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in names})  # (keys of older/newer versions dropped)


def checkpoint_config(model: str) -> dict | None:
    """The training configuration saved with a run's checkpoint (None for anything else)."""
    path = Path(model)
    for candidate in (path / "run_config.json", path.parent / "config.json"):
        if (path / "trainer_state.pt").exists() and candidate.exists():
            try:
                return json.loads(candidate.read_text())
            except ValueError as e:
                raise SystemExit(f"error: {candidate}: unreadable ({e})")
    return None


def is_run_folder(path: Path) -> bool:
    return (path / "metrics.jsonl").exists() or (path / "checkpoint" / "trainer_state.pt").exists()


# Every numeric field's range: (test, what it must be). Optional fields may also be None.
RANGES = {
    "eval_limit": (lambda v: v >= 1, "at least 1"),
    "world_seed": (lambda v: v >= 0, "non-negative"),
    "world_scale": (lambda v: v > 0, "positive"),
    "world_train": (lambda v: v >= 1, "at least 1"),
    "topk": (lambda v: 1 <= v <= 100, "in 1..100"),
    "num_generations": (lambda v: v >= 2, "at least 2 (group advantages need siblings)"),
    "max_turns": (lambda v: v >= 0, "non-negative"),
    "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    "max_obs_tokens": (lambda v: v >= 1, "at least 1"),
    "max_context_tokens": (lambda v: v >= 2, "at least 2"),
    "temperature": (lambda v: v > 0, "positive (evaluation is greedy anyway; 0 would divide the log-probs by 0)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "rollout_batch_size": (lambda v: v >= 1, "at least 1"),
    "num_rounds": (lambda v: v >= 0, "non-negative"),
    "grpo_steps": (lambda v: v >= 0, "non-negative"),
    "batch_size": (lambda v: v >= 1, "at least 1"),
    "opsd_questions": (lambda v: v >= 1, "at least 1"),
    "opsd_epochs": (lambda v: v >= 1, "at least 1"),
    "opsd_batch_size": (lambda v: v >= 1, "at least 1"),
    "lr": (lambda v: v > 0, "positive"),
    "weight_decay": (lambda v: v >= 0, "non-negative"),
    "beta": (lambda v: v >= 0, "non-negative"),
    "epsilon": (lambda v: 0 < v < 1, "in (0, 1)"),
    "epsilon_high": (lambda v: v > 0, "positive"),
    "num_iterations": (lambda v: v >= 1, "at least 1"),
    "mini_batch_size": (lambda v: v >= 0, "non-negative (0 = the whole batch)"),
    "micro_batch_size": (lambda v: v >= 1, "at least 1"),
    "max_grad_norm": (lambda v: v > 0, "positive"),
    "chunk_size": (lambda v: v >= 1, "at least 1"),
    "opsd_lr": (lambda v: v > 0, "positive"),
    "opsd_clip": (lambda v: v > 0, "positive"),
    "opsd_max_tokens": (lambda v: v >= 2, "at least 2"),
    "opsd_lora_rank": (lambda v: v >= 0, "non-negative (0 = full fine-tuning)"),
    "opsd_lora_alpha": (lambda v: v > 0, "positive"),
    "opsd_diagnostic_pairs": (lambda v: v >= 0, "non-negative"),
    "gpu_memory_gb": (lambda v: v > 0, "positive"),
    "seed": (lambda v: v >= 0, "non-negative"),
    "save_every": (lambda v: v >= 1, "at least 1"),
}
CHOICES = {"loss_type": ("token_mean", "seq_mean", "dr_grpo"), "scale_rewards": ("group", "batch", "none"),
           "opsd_students": ("most_different", "incorrect", "all"), "opsd_reference": ("sibling", "mismatched")}


def check_config(cfg: TrainConfig, world_size: int) -> None:
    """Impossible configurations end here, before anything is loaded or written: one `error:` line."""
    def bad(msg):
        raise SystemExit(f"error: {msg}")
    for name, (ok, what) in RANGES.items():
        value = getattr(cfg, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            bad(f"{_flag(name)} {value}: must be {what}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            bad(f"{_flag(name)} {getattr(cfg, name)!r}: choose {', '.join(choices)}")
    for name in ("batch_size", "opsd_questions", "opsd_batch_size"):
        if getattr(cfg, name) % world_size:
            bad(f"{_flag(name)} {getattr(cfg, name)} is not divisible by the {world_size} processes")
    if cfg.mini_batch_size and (cfg.batch_size * cfg.num_generations) % cfg.mini_batch_size:
        bad(f"--mini-batch-size {cfg.mini_batch_size} does not divide the {cfg.batch_size * cfg.num_generations} "
            "episodes of a step")
    if cfg.mini_batch_size and cfg.mini_batch_size % world_size:
        bad(f"--mini-batch-size {cfg.mini_batch_size} is not divisible by the {world_size} processes")
    if (cfg.embeddings or cfg.faiss_index) and not cfg.dense:
        bad(f"{'--embeddings' if cfg.embeddings else '--faiss-index'} is for dense retrieval: give --dense MODEL")
    if cfg.dense and cfg.retriever:
        bad("--dense retrieves in-process; --retriever asks a server: give one of them")
    if cfg.train_data and not (cfg.corpus or cfg.retriever):
        bad("--train-data needs a retriever: give --corpus FILE (local BM25) or --retriever URL")
    if cfg.eval_only:
        if cfg.eval_data and not cfg.train_data and not (cfg.corpus or cfg.retriever):
            bad("--eval-data needs a retriever: give --corpus FILE (local BM25) or --retriever URL")
    elif bool(cfg.train_data) != bool(cfg.eval_data):
        bad("--train-data and --eval-data go together (without both, the run uses the synthetic world)")
    if not (cfg.train_data or cfg.eval_data) and cfg.corpus:
        bad("--corpus needs --train-data and --eval-data (the synthetic world brings its own corpus)")
    if cfg.opsd and cfg.opsd_lora_rank and not (cfg.eval_only or cfg.dry_run) and \
            importlib.util.find_spec("peft") is None:
        bad(f"--opsd-lora-rank {cfg.opsd_lora_rank} (LoRA in the OPSD phase, the default for real models) needs PEFT: "
            "pip install -r requirements-lora.txt, or --opsd-lora-rank 0 for full fine-tuning")
    if cfg.cpu_offload and cfg.opsd and cfg.opsd_lora_rank and not cfg.eval_only:
        bad("--cpu-offload with LoRA in the OPSD phase is not supported (the adapter would sit on the CPU beside "
            "the offloaded shards): add --opsd-lora-rank 0, or shard over more GPUs instead")
    if is_run_folder(Path(cfg.model)):
        bad(f"--model {cfg.model}: this is a run folder: use {Path(cfg.model) / 'checkpoint'}")


def rollout_config(cfg: TrainConfig, *, seed: int, greedy: bool = False) -> RolloutConfig:
    return RolloutConfig(
        num_generations=1 if greedy else cfg.num_generations, max_turns=cfg.max_turns,
        max_new_tokens=cfg.max_new_tokens, max_obs_tokens=cfg.max_obs_tokens,
        max_context_tokens=cfg.max_context_tokens, topk=cfg.topk, temperature=cfg.temperature,
        top_p=cfg.top_p, greedy=greedy, seed=seed, rollout_batch_size=cfg.rollout_batch_size,
    )


# ---------------------------------------------------------------- loading


def load_model(cfg: TrainConfig, world, device):
    """(model, tokenizer), fp32 weights (--bf16 computes in bf16 through autocast: parallel.py), dropout off.
    'tiny' is built in-process (tiny.py); anything else goes through transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model == "tiny":
        import tiny

        # Under torchrun rank 0 builds (or loads) the cached model first; the others then load it.
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if rank != 0 and world_size > 1:
            dist.barrier()
        model, tokenizer = tiny.load_tiny(world, log=tqdm.write)
        if rank == 0 and world_size > 1:
            dist.barrier()
    else:
        kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
        if not Path(cfg.model).is_dir():
            kwargs |= hub_access(cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32, **kwargs)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot load model {cfg.model!r}: {str(e).strip().splitlines()[0]}")
        if cfg.gguf_file:
            drop_gguf_marker(model)
    disable_dropout(model)
    if cfg.gradient_checkpointing:  # (transformers 5 renamed it; 4.x has only the old name)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.config.use_cache = False  # rollouts pass use_cache explicitly
    return model.to(device), tokenizer


def drop_gguf_marker(model) -> None:
    """transformers loads a GGUF file into plain fp32 modules (dequantized) but keeps its quantizer attached, which
    makes save_pretrained refuse the model; training these weights is fine, so the marker goes. GGUF blocks that
    stayed quantized (transformers with the `kernels` package) cannot be trained: an error says so."""
    kept = {type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()}
    if kept:
        raise SystemExit(f"error: --gguf-file: the model kept quantized GGUF modules ({', '.join(sorted(kept))}), "
                         "which cannot be trained; uninstall `kernels` so that transformers dequantizes them")
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def hub_access(name: str) -> dict:
    """A hub id: from the local cache if it is there, else from the hub if it answers; else one clear error now
    (an unreachable hub otherwise costs ~50 s of retries before transformers gives up)."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub id either (e.g. a mistyped local path)
        raise SystemExit(f"error: --model {name}: no such directory, and not a hub id") from None
    if isinstance(cached, str):
        return {"local_files_only": True}
    hint = "give a local directory (a `save_pretrained` folder or a run's checkpoint)"
    if constants.HF_HUB_OFFLINE:
        raise SystemExit(f"error: cannot load model {name!r}: not a local directory and not in the hub cache, and "
                         f"HF_HUB_OFFLINE is set: {hint}")
    import requests

    try:
        requests.head(constants.ENDPOINT, timeout=5)
    except requests.RequestException as e:
        raise SystemExit(f"error: cannot load model {name!r}: not a local directory, not in the hub cache, and "
                         f"{constants.ENDPOINT} is unreachable ({type(e).__name__}): {hint}")
    return {}


def disable_dropout(model) -> None:
    """No dropout anywhere, in train mode too (TRL's disable_dropout_in_model, plus the attention's dropout rate
    that Qwen2/Llama attention modules keep as a float): the policy's log-probs (train mode, for gradient
    checkpointing) and the reference's and teacher's (eval mode) then come from the same function, so the first
    GRPO ratio is exactly 1."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def model_config(cfg: TrainConfig):
    """The model's transformers config alone (the memory plan, --dry-run): no weights are read."""
    if cfg.model == "tiny":
        import tiny

        recipe = tiny.TinyRecipe()
        return tiny.model_config(recipe, vocab_size=recipe.vocab_size + 1)  # (+ the instruction token)
    from transformers import AutoConfig

    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    if not Path(cfg.model).is_dir():
        kwargs |= hub_access(cfg.model)
    try:
        return AutoConfig.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read the config of model {cfg.model!r}: {str(e).strip().splitlines()[0]}")


def memory_budget(cfg: TrainConfig, device) -> int | None:
    """Bytes per GPU the plan is checked against: --gpu-memory-gb, else the CUDA device's, else none (CPU)."""
    if cfg.gpu_memory_gb:
        return int(cfg.gpu_memory_gb * memory.GiB)
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def world_args(cfg: TrainConfig) -> dict:
    return {"seed": cfg.world_seed, "scale": cfg.world_scale, "num_train": cfg.world_train}


def make_retriever(cfg: TrainConfig, world, device=None):
    """HTTP (checked once, so a dead server fails here), dense (--dense, search.DenseRetriever on this process's
    device) or BM25, over a corpus file or the synthetic world's passages."""
    if cfg.retriever:
        retriever = HTTPRetriever(cfg.retriever)
        try:
            retriever.search(["health check"], 1)
        except Exception as e:  # noqa: BLE001 - one clear line, whatever the transport said
            raise SystemExit(f"error: retriever {cfg.retriever} is not answering: {str(e).splitlines()[0]}")
        return retriever
    passages = None if cfg.corpus else [parse_corpus_row(r) for r in world.corpus]
    first = not parallel.distributed() or dist.get_rank() == 0
    try:
        if cfg.dense:
            embeddings = cfg.embeddings or (search.default_embeddings_path(cfg.corpus, cfg.dense) if cfg.corpus else
                                            None)  # (the synthetic world's are encoded in memory: a few seconds)
            if not first:
                barrier()  # rank 0 encodes and writes the embeddings file; the others then load it
            retriever = search.DenseRetriever(cfg.dense, cfg.corpus, passages=passages, embeddings_path=embeddings,
                                              faiss_index=cfg.faiss_index, devices=[device or "cpu"],
                                              progress=sys.stderr.isatty() and first)
            if first:
                barrier()
            return retriever
        return BM25Retriever(cfg.corpus) if cfg.corpus else BM25Retriever(passages=passages)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def load_data(cfg: TrainConfig, device=None):
    """(world or None, train examples, {eval name: examples}, retriever)."""
    world = None
    if not (cfg.train_data and cfg.eval_data) or cfg.model == "tiny":  # the tiny tokenizer is trained on the world
        world = data.make_world(**world_args(cfg))
    try:
        train = [] if cfg.eval_only else data.load_qa(cfg.train_data, split="train") if cfg.train_data else world.train
        if cfg.eval_data:
            evals = data.load_eval_sets([s.strip() for s in cfg.eval_data.split(",") if s.strip()], cfg.data_dir)
        else:
            evals = {"synthetic": world.test}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    if cfg.eval_limit:
        evals = {k: v[:cfg.eval_limit] for k, v in evals.items()}
    if not train and not cfg.eval_only:
        raise SystemExit(f"error: {cfg.train_data}: no training questions")
    retriever = make_retriever(cfg, world, device)
    return world, train, evals, retriever


# ---------------------------------------------------------------- the schedule and the data stream


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


def stream_offset(cfg: TrainConfig, rnd: int, phase: str, step: int) -> int:
    """Where a unit's questions start in the stream: the GRPO steps take its first num_rounds x grpo_steps x
    batch_size questions, in order; the OPSD phases take theirs beyond all of those, so the two never share a
    position (the same question meets both only when the stream has wrapped into a new epoch)."""
    if phase == "grpo":
        return (rnd * cfg.grpo_steps + step) * cfg.batch_size
    return (cfg.num_rounds * cfg.grpo_steps + rnd) * cfg.batch_size + rnd * cfg.opsd_questions


def questions_of_rank(items, rank: int, world_size: int):
    """Whole questions per rank, so a GRPO group never straddles processes."""
    return items[rank::world_size]


def unit_seed(cfg: TrainConfig, unit: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + unit) * 1009 + rank


# ---------------------------------------------------------------- evaluation (the benchmark runner's core)


def evaluate_sets(model, tokenizer, eval_sets: dict, retriever, cfg: RolloutConfig, *, rank=0, world_size=1,
                  predictions_dir=None, progress=False) -> dict:
    """Greedy episodes on each eval set; {name: {"em", "f1", "searches", "n"}}. Ranks split the questions."""
    results = {}
    for name, examples in eval_sets.items():
        mine = examples[rank::world_size]
        episodes = []
        size = cfg.rollout_batch_size or max(len(mine), 1)  # greedy: one episode per question
        for start in tqdm(range(0, len(mine), size), desc=f"eval {name}", disable=not progress, leave=False):
            episodes += rollout(model, tokenizer, mine[start:start + size], retriever, cfg)
        if world_size > 1:
            gathered = [None] * world_size
            dist.all_gather_object(gathered, episodes)
            episodes = [e for part in gathered for e in part]
        results[name] = evaluate.score_episodes(episodes)
        if predictions_dir is not None and rank == 0:
            evaluate.write_predictions(Path(predictions_dir) / f"{name.replace('/', '_')}.jsonl", episodes)
    return results


# ---------------------------------------------------------------- plumbing: checkpoints, logs, progress


def save_checkpoint(run_dir: Path, model, tokenizer, optimizer, state: dict) -> None:
    """Atomic: written to checkpoint.tmp, then swapped in; a kill at any moment leaves one whole checkpoint. Every
    process calls it. checkpoint/dcp holds the weights and AdamW state, sharded (torch.distributed.checkpoint: it
    resumes on any number of processes); beside it, the full weights as a transformers model (`save_pretrained`,
    gathered on rank 0: `from_pretrained` loads them anywhere), the tokenizer, and trainer_state.pt (position in the
    schedule, RNG states, the run's config)."""
    tmp, final, old = run_dir / "checkpoint.tmp", run_dir / "checkpoint", run_dir / "checkpoint.old"
    main_process = not parallel.distributed() or dist.get_rank() == 0
    if main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    parallel.save_sharded(tmp / "dcp", model, optimizer)
    full = parallel.full_state_dict(model) if parallel.is_sharded(model) else None
    if main_process:
        # one safetensors file; a sharded model exports the full weights gathered on rank 0
        model.save_pretrained(tmp, max_shard_size="1000GB", **({"state_dict": full} if full is not None else {}))
        tokenizer.save_pretrained(tmp)
        (tmp / "run_config.json").write_text(json.dumps(state["config"], indent=2))  # what --model CKPT inherits
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        torch.save({"rng": rng, **state}, tmp / "trainer_state.pt")  # written last: its presence marks a whole one
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier()


def model_fingerprint(model) -> str:
    """A hash of the starting model's weights (names, shapes, sums): a resumed run must start from the same model,
    or its reference (a copy of the start) would silently be another (an edited testbed, an updated hub model)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            sums = float(p.double().sum()), float(p.double().abs().sum())
            h.update(f"{name}{tuple(p.shape)}{sums[0]:.12e}{sums[1]:.12e}".encode())
    return h.hexdigest()[:16]


def barrier() -> None:
    if parallel.distributed():
        dist.barrier()


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in ("checkpoint", "checkpoint.old"):  # .old survives only a kill between the two renames
        if (run_dir / name / "trainer_state.pt").exists():
            return run_dir / name
    return None


def restore_checkpoint(ckpt: Path, policy, optimizer) -> dict:
    """Weights, AdamW and RNG states from a checkpoint (written by any number of processes) -> its trainer state
    (next unit, metrics lines, results). Every key of this model must be in it: a checkpoint of another model is
    refused, naming it."""
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if not (ckpt / "dcp").is_dir():
        raise SystemExit(f"error: {ckpt}: no dcp/ folder (a checkpoint of an older version of this code)")
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        parallel.load_sharded(ckpt / "dcp", policy, optimizer)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's errors are long; one line, the cause
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        cause = next((line for line in reversed(lines) if "Error: " in line), lines[0])  # the last raise's message
        raise SystemExit(f"error: {ckpt}: checkpoint does not match the model ({cause[:300]})")
    random.setstate(state["rng"]["python"]), np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state


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


class Progress:
    """A tqdm bar on a terminal; one plain line per unit when the output goes to a file (CI logs, nohup), where a
    bar's carriage returns would run everything together into one line."""

    SHOWN = {"reward": "reward/mean", "searches": "rollout/searches_per_episode", "kl": "grpo/kl",
             "opsd_kl": "opsd/kl_after", "pairs": "opsd/pairs"}

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.total, self.done = enabled, total, initial
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="search-e1", disable=not (enabled and self.tty),
                        dynamic_ncols=True)

    def start(self, label: str) -> None:
        self.bar.set_description(label)
        self.label = label

    def finish(self, metrics: dict, eval_key: str | None) -> None:
        self.done += 1
        shown = {**self.SHOWN, **({"em": eval_key} if eval_key else {})}
        values = {name: f"{metrics[k]:.3f}" for name, k in shown.items() if k in metrics}
        self.bar.set_postfix(values)
        self.bar.update(1)
        if self.enabled and not self.tty:
            print(f"[{self.done}/{self.total}] {self.label}  " + "  ".join(f"{k} {v}" for k, v in values.items())
                  + f"  ({metrics.get('time/unit_s', 0.0):.1f} s)", flush=True)

    def close(self) -> None:
        self.bar.close()


def episode_metrics(episodes, prefix="rollout") -> dict:
    """Rollout statistics of this process's episodes (train.py averages them over processes)."""
    n = max(len(episodes), 1)
    reward = {"reward/mean": sum(e.reward for e in episodes) / n} if prefix == "rollout" else {
        f"{prefix}/reward_mean": sum(e.reward for e in episodes) / n}
    return reward | {
        f"{prefix}/searches_per_episode": sum(e.num_searches for e in episodes) / n,
        f"{prefix}/invalid_per_episode": sum(e.num_invalid for e in episodes) / n,
        f"{prefix}/response_tokens": sum(len(e.response_ids) for e in episodes) / n,
        f"{prefix}/truncated_fraction": sum(e.is_truncated for e in episodes) / n,
    }


def unit_label(cfg: TrainConfig, rnd: int, phase: str, step: int) -> str:
    if rnd < 0:
        return "start eval"
    return f"round {rnd + 1}/{cfg.num_rounds} " + (f"grpo {step + 1}/{cfg.grpo_steps}" if phase == "grpo" else phase)


def make_run_dir(cfg: TrainConfig, main_process: bool, world_size: int) -> Path:
    """Rank 0 names the run folder (a timestamp) and checks it; every rank gets the same folder or the same error."""
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
    return run_dir


# ---------------------------------------------------------------- main


def main(argv=None) -> dict:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the loop (the loop says where its last checkpoint is): no traceback
        print("\ninterrupted before training started", file=sys.stderr)
        raise SystemExit(130)


def _main(argv=None) -> dict:
    # PLUMBING: configuration, processes, devices -----------------------------------------------------------
    cfg = parse_config(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    check_config(cfg, world_size)
    if cfg.dry_run:  # the memory plan from the model's config, then stop
        device = "cuda" if torch.cuda.is_available() else "cpu"
        shape = memory.model_shape(model_config(cfg))
        print(memory.format_plan(cfg, shape, memory_budget(cfg, device), world_size, f" ({cfg.model})"))
        return {}
    if cfg.resume and (Path(cfg.resume) / "results.json").exists():
        print(f"{cfg.resume} is complete (results.json is there): nothing to resume", file=sys.stderr)
        return json.loads((Path(cfg.resume) / "results.json").read_text())
    sharded = (world_size > 1 or cfg.cpu_offload) and not cfg.eval_only  # FSDP2 (evaluation needs no sharding)
    if world_size > 1 or sharded:
        # CPU bookkeeping tensors (metrics, counts) go over gloo beside NCCL; one process sharding its state to the
        # CPU (--cpu-offload) is a process group of one.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if world_size > 1:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, init_method=f"file://{tempfile.mkdtemp()}/store", rank=0, world_size=1)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    main_process = rank == 0
    import transformers

    transformers.utils.logging.disable_progress_bar()  # ours is the only progress bar
    say = tqdm.write if main_process else (lambda *a, **k: None)

    # PLUMBING: load everything that can fail before the run folder exists -----------------------------------
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    world, train_examples, eval_sets, retriever = load_data(cfg, device)
    policy, tokenizer = load_model(cfg, world, "cpu" if sharded else device)  # (sharded: only shards go to the GPU)
    budget = memory_budget(cfg, device)
    plan = memory.format_plan(cfg, memory.model_shape(policy.config), budget, world_size)
    say(plan if budget else plan.splitlines()[-1].strip().replace("peak", "memory plan: peak", 1) +
        " (python train.py --dry-run ... for the table)")
    if cfg.eval_only:
        return run_eval_only(cfg, policy, tokenizer, eval_sets, retriever, device, rank, world_size, say)
    start = model_fingerprint(policy)
    frozen_dtype = torch.bfloat16 if cfg.bf16 else None  # of the reference and the decoding copy
    ref_model = parallel.frozen_copy(policy, frozen_dtype) if cfg.beta > 0 else None
    decoder = None  # one process: rollouts decode with the policy itself (or a bf16 copy made per rollout)
    if sharded:  # PLUMBING: FSDP2 over the processes; rollouts decode with one unsharded copy, refreshed each time
        decoder = parallel.frozen_copy(policy, frozen_dtype, matmuls_only=False).to(device)
        ref_model = parallel.shard(ref_model, bf16=False, cpu_offload=cfg.cpu_offload) if ref_model else None
        policy = parallel.shard(policy, bf16=cfg.bf16, cpu_offload=cfg.cpu_offload)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def decoding_model():
        """The weights rollouts decode with, as they are now (parallel.for_decoding / parallel.refresh)."""
        if decoder is None:
            return parallel.for_decoding(policy, cfg.bf16)
        parallel.refresh(decoder, policy)
        return decoder

    run_dir = make_run_dir(cfg, main_process, world_size)
    next_unit, keep_lines, results = 0, 0, {}
    ckpt = find_checkpoint(run_dir) if cfg.resume else None
    if ckpt is not None:
        saved_start = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False).get("start")
        if saved_start not in (None, start):
            raise SystemExit(f"error: --resume {run_dir}: the model {cfg.model!r} loads with other weights than the "
                             "run started from (an edited testbed, an updated hub model): its reference would differ")
        state = restore_checkpoint(ckpt, policy, optimizer)
        next_unit, keep_lines, results = state["next_unit"], state["metrics_lines"], state["results"]
    log = MetricsLog(run_dir / "metrics.jsonl", keep_lines if cfg.resume else None) if main_process else None

    say("config: " + json.dumps(asdict(cfg)))
    say(f"run folder: {run_dir}  processes: {world_size}  device: {device}  "
        f"parameters: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M")
    units = schedule(cfg)
    # What one process does of a global step: its share of each GRPO mini-batch.
    rank_cfg = dataclasses.replace(cfg, mini_batch_size=cfg.mini_batch_size and cfg.mini_batch_size // world_size)
    progress = Progress(len(units), next_unit, enabled=main_process)
    eval_key = "eval/" + next(iter(eval_sets)) + "/em"
    saved_unit = next_unit if ckpt is not None else None  # the unit the last checkpoint resumes at

    def checkpoint(next_index: int):
        save_checkpoint(run_dir, policy, tokenizer, optimizer, {
            "next_unit": next_index, "metrics_lines": log.lines if main_process else 0, "results": results,
            "data_cursor": sum(1 for r, p, _ in units[:next_index] if p == "grpo") * cfg.batch_size,
            "config": asdict(cfg), "world_size": world_size, "start": start,
        })

    try:
        for index in range(next_unit, len(units)):
            rnd, phase, step = units[index]
            progress.start(unit_label(cfg, rnd, phase, step))
            t0 = time.time()
            seed = unit_seed(cfg, index - cfg.eval_at_start, rank)  # the same with or without the baseline unit
            policy.train()  # rollouts switch to eval mode and back; gradient checkpointing needs train()

            # ALGO: one unit of the schedule ---------------------------------------------------------------
            with parallel.autocast(cfg.bf16, device):  # bf16 compute under --bf16, fp32 master weights
                if phase in ("grpo", "opsd"):
                    # 1. rollout: G samples per question of this rank's shard; the reward (exact match) is set here
                    n = cfg.batch_size if phase == "grpo" else cfg.opsd_questions
                    questions = draw_questions(train_examples, n, cfg.seed, stream_offset(cfg, rnd, phase, step))
                    with torch.no_grad():
                        episodes = rollout(decoding_model(), tokenizer, questions_of_rank(questions, rank, world_size),
                                           retriever, rollout_config(cfg, seed=seed))
                    if phase == "grpo":
                        # 2-5. group advantages, old/ref log-probs, the clipped policy update
                        metrics = parallel.all_mean(episode_metrics(episodes))
                        metrics |= grpo.grpo_step(policy, ref_model, optimizer, episodes, rank_cfg)
                    else:
                        # 2-6. sibling pairs, the frozen teacher, the distillation steps, KL before/after
                        metrics = parallel.all_mean(episode_metrics(episodes, prefix="opsd_rollout"))
                        metrics |= opsd.opsd_phase(policy, episodes, tokenizer, cfg, seed=seed, retriever=retriever,
                                                   rollout_cfg=rollout_config(cfg, seed=seed), frozen=decoder)
                else:
                    # evaluation: greedy episodes on every eval set
                    policy.eval()
                    results = evaluate_sets(decoding_model(), tokenizer, eval_sets, retriever,
                                            rollout_config(cfg, seed=0, greedy=True), rank=rank, world_size=world_size)
                    metrics = {f"eval/{name}/{k}": v for name, row in results.items() for k, v in row.items()}

            # PLUMBING: log, progress, checkpoint ---------------------------------------------------------
            metrics = {k: float(v) for k, v in metrics.items()}
            metrics["time/unit_s"] = time.time() - t0
            if main_process:
                log.write({"round": rnd, "phase": phase, "step": step, "unit": index, **metrics})
                if phase == "eval":
                    title = f"round {rnd + 1} evaluation" if rnd >= 0 else "evaluation of the starting model"
                    tqdm.write(evaluate.format_table(results, title=title))
            if phase == "grpo" and cfg.save_rollouts:
                save_rollouts(run_dir / "rollouts" / f"unit{index:05d}-rank{rank}.jsonl", episodes)
            progress.finish(metrics, eval_key)
            # (the baseline evaluation is cheap to redo: no checkpoint of the unchanged model)
            if rnd >= 0 and (phase != "grpo" or (step + 1) % cfg.save_every == 0) or index == len(units) - 1:
                checkpoint(index + 1)
                saved_unit = index + 1
    except KeyboardInterrupt:
        progress.close()
        if main_process:
            where = (f"the last checkpoint is {run_dir / 'checkpoint'} (it continues at unit {saved_unit + 1} of "
                     f"{len(units)})" if saved_unit is not None else "no checkpoint was written yet (it starts over)")
            print(f"\ninterrupted: {where}; continue with: python train.py --resume {run_dir}", file=sys.stderr)
        raise SystemExit(130) from None
    progress.close()

    if main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))  # its presence marks a complete run
        say(f"done: {run_dir}")
    if parallel.distributed():
        dist.destroy_process_group()
    return results


def run_eval_only(cfg, policy, tokenizer, eval_sets, retriever, device, rank, world_size, say) -> dict:
    """The benchmark runner: greedy episodes, the paper's table, RUN/predictions/*.jsonl (re-scorable with
    `python evaluate.py score`) and RUN/results.json."""
    run_dir = make_run_dir(cfg, rank == 0, world_size)
    say("config: " + json.dumps(asdict(cfg)))
    sets = ", ".join(f"{k} ({len(v)})" for k, v in eval_sets.items())
    say(f"evaluating {cfg.model} on {sets}; run folder: {run_dir}")
    with parallel.autocast(cfg.bf16, device):
        results = evaluate_sets(parallel.for_decoding(policy, cfg.bf16), tokenizer, eval_sets, retriever,
                                rollout_config(cfg, seed=0, greedy=True), rank=rank, world_size=world_size,
                                predictions_dir=run_dir / "predictions", progress=rank == 0 and sys.stderr.isatty())
    if rank == 0:
        say(evaluate.format_table(results, title=f"{cfg.model}: exact match (greedy)"))
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        say(f"done: {run_dir}")
    if world_size > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
