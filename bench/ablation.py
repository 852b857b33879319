"""GRPO only vs GRPO <-> OPSD (the Search-E1 schedule) on the built-in testbed: tiny model, synthetic world.

    python bench/ablation.py [--seeds 0,1,2] [--out runs/ablation]

Both arms start from the same warm-started tiny model, use the same seeds and roll out the same number of
episodes: the GRPO-only arm spends the OPSD phase's rollouts on extra GRPO steps instead. Prints mean +- std over
seeds of the final test exact match and searches per episode (the last evaluation of each run).
"""
import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train  # noqa: E402


def run(out: Path, name: str, seed: int, extra: list[str]) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    if not (run_dir / "results.json").exists():
        if run_dir.exists():  # an unfinished run: continue it
            cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir)]
        else:
            cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--output-dir", str(out),
                   "--run-name", run_dir.name, *extra]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    results = json.loads((run_dir / "results.json").read_text())
    row = next(iter(results.values()))  # the synthetic test split
    return {"em": row["em"], "searches": row["searches"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = train.parse_config([])  # the default run, tiny model
    extra_steps = cfg.opsd_questions // cfg.batch_size  # OPSD-phase rollouts, spent on GRPO instead
    arms = {
        "grpo_only": ["--no-opsd", "--grpo-steps", str(cfg.grpo_steps + extra_steps)],
        "grpo_opsd": [],
    }
    out = Path(args.out)
    table = {arm: [run(out, arm, seed, extra) for seed in seeds] for arm, extra in arms.items()}
    print(f"{'arm':<12}{'seeds':>6}{'test EM':>18}{'searches/episode':>20}")
    for arm, rows in table.items():
        cells = []
        for key in ("em", "searches"):
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        print(f"{arm:<12}{len(rows):>6}{cells[0]:>18}{cells[1]:>20}")
    print("per seed: " + json.dumps(table))


if __name__ == "__main__":
    main()
