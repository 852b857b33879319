"""Does OPSD do what the paper says? Four arms on the built-in testbed (tiny model, synthetic world), several seeds.

    python bench/ablation.py [--seeds 0,1,2,3,4] [--arms grpo_only,grpo_opsd,...] [--jobs 1] [--out runs/ablation]

Arms (each a `python train.py` run; all start from the same warm-started tiny model, use the same seeds, and roll
out the same number of training episodes):
  grpo_only     --no-opsd, each OPSD phase's rollouts (opsd_questions x G) spent on extra GRPO steps instead
  grpo_opsd     the default: GRPO -> OPSD per round (the paper's schedule)
  mismatched    --opsd-reference mismatched: the teacher reads a correct episode of another question (the control:
                what OPSD gains over it is what the reference's content gives)
  students_all  --opsd-students all: every sibling of the reference is a student
Per run, the final checkpoint is evaluated again (final_breakdown): greedily with the run's own settings (its exact
match is compared with the run's results.json), split by question type (one-hop, two-hop, year: data.World),
and sampled, to count redundant episodes (tiny.is_redundant: a query searched twice, or more searches than hops).
Prints one line per run as it finishes, then a table of means with 95% intervals across seeds (Student's t) and
paired differences against grpo_only, and writes OUT/ablation.json and OUT/ablation.png (each arm's evaluation
curves). Finished runs are reused; an unfinished one is resumed. About 3 minutes per run on 2 cores.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import data  # noqa: E402
import rollout  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402

TYPES = ("one_hop", "two_hop", "year")
# Two-sided 95% quantiles of Student's t by degrees of freedom, t(0.975, df) (beyond 30: the normal's 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
       21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def arms(cfg) -> dict[str, list[str]]:
    extra_steps = cfg.opsd_questions // cfg.batch_size  # the OPSD phase's rollouts, as GRPO steps
    return {
        "grpo_only": ["--no-opsd", "--grpo-steps", str(cfg.grpo_steps + extra_steps)],
        "grpo_opsd": [],
        "mismatched": ["--opsd-reference", "mismatched"],
        "students_all": ["--opsd-students", "all"],
    }


def final_breakdown(model, tokenizer, world, retriever, cfg) -> dict:
    """The final policy on the run's eval questions. Greedy (as the run's evaluation): exact match and searches,
    overall and per question type, and the fraction of redundant episodes (tiny.is_redundant). Sampled (G
    episodes per question at the run's temperature, one fixed seed): the same fraction and searches, since the
    greedy policy can hide what sampled rollouts, the ones GRPO and OPSD train on, still do."""
    examples = world.test[:cfg.eval_limit]
    episodes = rollout.rollout(model, tokenizer, examples, retriever, train.rollout_config(cfg, seed=0, greedy=True))
    out = {"em": statistics.mean(e.reward for e in episodes),
           "searches": statistics.mean(e.num_searches for e in episodes),
           "redundant": statistics.mean(tiny.is_redundant(e, world) for e in episodes)}
    for kind in TYPES:
        mine = [e for e in episodes if world.question_type(e.example) == kind]
        out[f"em_{kind}"] = statistics.mean(e.reward for e in mine)
        out[f"searches_{kind}"] = statistics.mean(e.num_searches for e in mine)
    sampled = rollout.rollout(model, tokenizer, examples, retriever, train.rollout_config(cfg, seed=0))
    out["sampled_em"] = statistics.mean(e.reward for e in sampled)
    out["sampled_searches"] = statistics.mean(e.num_searches for e in sampled)
    out["sampled_redundant"] = statistics.mean(tiny.is_redundant(e, world) for e in sampled)
    return out


def train_run(out: Path, arm: str, seed: int, extra: list[str], threads: int) -> Path:
    """One arm's `python train.py` for one seed (skipped if complete, resumed if unfinished), output to OUT/NAME.log."""
    run_dir = out / f"{arm}-seed{seed}"
    if not (run_dir / "results.json").exists():
        if run_dir.exists():  # an unfinished run: continue it
            cmd = [sys.executable, str(ROOT / "train.py"), "--resume", str(run_dir)]
        else:
            cmd = [sys.executable, str(ROOT / "train.py"), "--seed", str(seed), "--output-dir", str(out),
                   "--run-name", run_dir.name, *extra]
        with open(out / f"{run_dir.name}.log", "a") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return run_dir


def measure(run_dir: Path, world, retriever) -> dict:
    """A finished run: final_breakdown of its checkpoint, its evaluation curve, its OPSD phases' diagnostics."""
    cfg = train.parse_config(["--resume", str(run_dir)])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r["phase"] == "eval"]
    phases = [r for r in rows if r["phase"] == "opsd"]
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "checkpoint")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoint", dtype=torch.float32).eval()
    result = final_breakdown(model, tokenizer, world, retriever, cfg)
    final = json.loads((run_dir / "results.json").read_text())["synthetic"]["em"]
    if abs(result["em"] - final) > 1e-9:  # greedy decoding, same settings: only a float near-tie can differ
        print(f"note: {run_dir.name}: re-evaluated EM {result['em']:.3f}, the run's own {final:.3f}", flush=True)
    result["curve_em"] = [r["eval/synthetic/em"] for r in evals]  # the start, then after each round
    result["curve_searches"] = [r["eval/synthetic/searches"] for r in evals]
    result["minutes"] = sum(r["time/unit_s"] for r in rows) / 60
    for key in ("teacher_em", "student_em", "pairs", "kl_before", "kl_after", "reference_searches"):
        values = [r[f"opsd/{key}"] for r in phases if f"opsd/{key}" in r]
        if values:
            result[key] = statistics.mean(values)  # mean over the run's OPSD phases
    return result


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (Student's t) across seeds."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / len(values) ** 0.5


def cell(values: list[float]) -> str:
    mean, half = interval(values)
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"  # one seed: no interval


COLUMNS = [("EM", "em"), ("one-hop", "em_one_hop"), ("two-hop", "em_two_hop"), ("year", "em_year"),
           ("searches", "searches"), ("redundant", "redundant"), ("sampled: searches", "sampled_searches"),
           ("sampled: redundant", "sampled_redundant"), ("teacher EM", "teacher_em"), ("student EM", "student_em"),
           ("pairs", "pairs")]
PAIRED = ("em", "em_one_hop", "em_two_hop", "em_year", "searches", "redundant", "sampled_searches",
          "sampled_redundant")


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: mean ± 95% half-width per arm, then paired differences (same seed) against grpo_only."""
    lines = ["| arm | seeds | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for arm, rows in results.items():
        cells = [cell([r[k] for r in rows]) if all(k in r for r in rows) else "—" for _, k in COLUMNS]
        lines.append(f"| {arm} | {len(rows)} | " + " | ".join(cells) + " |")
    base = results.get("grpo_only")
    if base:
        for arm, rows in results.items():
            if arm == "grpo_only":
                continue
            n = min(len(rows), len(base))
            cells = [cell([rows[i][k] - base[i][k] for i in range(n)]) if k in PAIRED else "" for _, k in COLUMNS]
            lines.append(f"| {arm} − grpo_only (paired) | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("curve_em", "test exact match (greedy)"), ("curve_searches", "searches per episode (greedy)")]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(14, 4))
    for ax, (key, label) in zip(axes, panels):
        for arm, rows in results.items():
            points = [interval([r[key][i] for r in rows]) for i in range(min(len(r[key]) for r in rows))]
            xs = list(range(len(points)))
            ax.errorbar(xs, [m for m, _ in points], yerr=[h for _, h in points], marker="o", capsize=3, label=arm)
        ax.set_xticks(xs, ["start"] + [f"round {i}" for i in xs[1:]])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[-1]  # final exact match by question type
    width = 0.8 / len(results)
    for j, (arm, rows) in enumerate(results.items()):
        points = [interval([r[f"em_{kind}"] for r in rows]) for kind in TYPES]
        ax.bar([i + j * width for i in range(len(TYPES))], [m for m, _ in points], width,
               yerr=[h for _, h in points], capsize=2, label=arm)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(TYPES))], TYPES)
    ax.set_ylabel("final exact match by question type")
    ax.grid(alpha=0.3, axis="y")
    seeds = min(len(rows) for rows in results.values())
    fig.suptitle(f"bench/ablation.py: mean and 95% interval over {seeds} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--arms", default="grpo_only,grpo_opsd,mismatched,students_all")
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablation"))
    parser.add_argument("--jobs", type=int, default=1, help="train.py runs at once (each gets cores / jobs threads)")
    args = parser.parse_args()
    try:
        seeds = list(dict.fromkeys(int(s) for s in args.seeds.split(",")))  # a seed once: one run folder each
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, not {args.seeds!r}")
    if args.jobs < 1:
        parser.error(f"--jobs: at least 1, not {args.jobs}")
    cfg = train.parse_config([])  # the default run, tiny model
    known = arms(cfg)
    unknown = [name for name in args.arms.split(",") if name not in known]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    chosen = {name: extra for name, extra in known.items() if name in args.arms.split(",")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = data.make_world(**train.world_args(cfg))
    retriever = train.make_retriever(cfg, world)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)
    jobs = [(seed, arm) for seed in seeds for arm in chosen]  # seed-major: a partial result compares every arm
    t0, rows = time.time(), {}
    with ThreadPoolExecutor(args.jobs) as pool:  # each job is a train.py process; the threads only wait on them
        futures = {pool.submit(train_run, out, arm, seed, chosen[arm], threads): (seed, arm) for seed, arm in jobs}
        for future in as_completed(futures):
            seed, arm = futures[future]
            row = rows[seed, arm] = measure(future.result(), world, retriever)
            teacher = (f", teacher/student EM {row['teacher_em']:.3f}/{row['student_em']:.3f}"
                       if "teacher_em" in row else "")
            print(f"[{len(rows)}/{len(jobs)}, {(time.time() - t0) / 60:.1f} min] {arm} seed {seed}: EM "
                  f"{' -> '.join(f'{v:.3f}' for v in row['curve_em'])}, two-hop {row['em_two_hop']:.3f}, "
                  f"searches {row['searches']:.2f}, sampled redundant {row['sampled_redundant']:.2f}{teacher}",
                  flush=True)
    results = {arm: [rows[seed, arm] for seed in seeds] for arm in chosen}
    print(table(results))
    (out / "ablation.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "ablation.png")
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'}")


if __name__ == "__main__":
    main()
