"""End to end: train.py by subprocess on the tiny model and the synthetic world (tier 3)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# A short schedule: one round of 2 GRPO steps, an OPSD phase and an evaluation.
SHORT = ["--num-rounds", "1", "--grpo-steps", "2", "--batch-size", "4", "--opsd-questions", "8",
         "--eval-limit", "12", "--save-every", "1"]


def run_train(args, tmp_path, env=None, check=True, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    where = [] if "--resume" in args else ["--output-dir", str(tmp_path)]  # a resumed run keeps its config
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *where, *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_short_run_writes_a_complete_run_folder(tmp_path):
    proc = run_train([*SHORT, "--run-name", "short"], tmp_path)
    run_dir = tmp_path / "short"
    rows = read_metrics(run_dir)
    assert [r["phase"] for r in rows] == ["eval", "grpo", "grpo", "opsd", "eval"]
    for r in rows:
        for k, v in r.items():
            assert k == "phase" or (isinstance(v, (int, float)) and math.isfinite(v)), (k, v)
    assert rows[0]["round"] == -1 and "eval/synthetic/em" in rows[0]  # the starting model's baseline
    rows = rows[1:]
    assert {"reward/mean", "grpo/loss", "grpo/kl", "rollout/searches_per_episode"} <= set(rows[0])
    # (the quick test model may find no correct sibling, hence no pairs and no OPSD optimizer step)
    assert {"opsd/kl_before", "opsd/kl_after", "opsd/pairs", "opsd/loss_tokens"} <= set(rows[2])
    assert 0.0 <= rows[3]["eval/synthetic/em"] <= 1.0
    assert json.loads((run_dir / "config.json").read_text())["grpo_steps"] == 2
    results = json.loads((run_dir / "results.json").read_text())
    assert results["synthetic"]["n"] == 12
    assert "EM" in proc.stdout + proc.stderr  # the evaluation table was printed
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # The picture of the run: a real PNG (matplotlib is a dev requirement).
    plot = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "plot", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert plot.returncode == 0, plot.stderr
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    run_train([*SHORT, "--run-name", "straight"], tmp_path)
    # Kill the second run after its first checkpoint, mid-schedule.
    cmd = [sys.executable, str(ROOT / "train.py"), "--output-dir", str(tmp_path), *SHORT, "--run-name", "killed"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    state = tmp_path / "killed" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    run_train(["--resume", str(tmp_path / "killed")], tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "killed"
    assert json.loads((resumed / "results.json").read_text()) == json.loads((straight / "results.json").read_text())
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(straight))


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    run_train([*SHORT, "--run-name", "a"], tmp_path)
    run_dir = tmp_path / "b"
    run_dir.mkdir()
    (run_dir / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    (run_dir / "metrics.jsonl").write_text('{"partial": 1}\n')
    run_train(["--resume", str(run_dir)], tmp_path)
    assert without_timing(read_metrics(run_dir)) == without_timing(read_metrics(tmp_path / "a"))


@pytest.mark.parametrize("args, env, message", [
    (["--train-data", "/nonexistent/train.jsonl", "--eval-data", "/nonexistent/test.jsonl", "--corpus",
      "/nonexistent/c.jsonl"], {}, "/nonexistent/train.jsonl"),
    (["--model", "no-such-org/no-such-model"], {}, "no-such-org/no-such-model"),
    (["--retriever", "http://127.0.0.1:9/retrieve"], {}, "127.0.0.1:9"),
    (["--batch-size", "5"], {"WORLD_SIZE": "2"}, "not divisible"),
    (["--loss-type", "bogus"], {}, "loss-type"),
])
def test_bad_input_ends_with_one_clear_error_and_no_complete_run(tmp_path, args, env, message):
    proc = run_train([*args, "--run-name", "bad"], tmp_path, env=env, check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_malformed_data_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "question": "q?", "golden_answers": ["a"]}\n{not json\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "0", "contents": "\\"T\\"\\ntext"}\n')
    proc = run_train(["--train-data", str(bad), "--eval-data", str(bad), "--corpus", str(corpus), "--run-name", "bad"],
                     tmp_path, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error:") and "bad.jsonl" in last and "2" in last, proc.stderr


def test_torchrun_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """Two gloo ranks each roll out half the questions; after one GRPO update their parameters equal those of
    one process updating on the union of both ranks' episodes."""
    import data
    import train

    # Questions whose gold answers are every name and year of the world (and the prompt's example answer, which
    # the barely trained test model likes to copy): an answer of the right form scores, a missing one does not,
    # so groups have mixed rewards and the update is not zero.
    world = data.make_world(**train.world_args(train.parse_config([])))
    paths = data.write_world(world, tmp_path / "world")
    golds = sorted({e.golden_answers[0] for e in world.train + world.test} | {"Beijing"})
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": e.id, "question": e.question, "golden_answers": golds}) + "\n"
                          for e in world.train[:8]))
    args = ["--num-rounds", "1", "--grpo-steps", "1", "--batch-size", "4", "--no-opsd", "--eval-limit", "4",
            "--train-data", str(qa), "--eval-data", str(qa), "--corpus", str(paths["corpus"]),
            "--save-rollouts", "--run-name", "ddp", "--output-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(ROOT / "train.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "ddp"

    import grpo
    import tiny
    from data import Example
    from rollout import Episode

    episodes = []
    for rank in (0, 1):
        for line in (run_dir / "rollouts" / f"unit00001-rank{rank}.jsonl").read_text().splitlines():
            row = json.loads(line)
            row["example"] = Example(**row["example"])
            row["group_id"] += 1000 * rank  # group ids are rank-local
            episodes.append(Episode(**row))
    assert len(episodes) == 4 * 5
    assert 0 < sum(e.reward for e in episodes) < len(episodes)
    cfg = train.parse_config(args)
    model, _ = tiny.load_tiny(data.make_world(**train.world_args(cfg)), train.world_args(cfg))
    ref = __import__("copy").deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    grpo.grpo_step(model, ref, optimizer, episodes, cfg)

    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint").state_dict()
    changed = 0
    for name, p in model.state_dict().items():
        torch.testing.assert_close(two[name], p, atol=1e-5, rtol=0, msg=name)
        changed += int(not torch.equal(p, ref.state_dict()[name]))
    assert changed > 0  # the update did something
