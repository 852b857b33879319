"""Answer extraction and scoring (exact match is the reward and the metric), the results table, run plots.

    python evaluate.py score ../shared/data/searchr1_eval/*.jsonl    # rows with "final_response", "golden_answers"
    python evaluate.py plot runs/NAME                                # RUN/curves.png: reward, EM, searches, KL
    python train.py --eval-only --model runs/NAME/checkpoint         # the benchmark runner (greedy episodes)

The benchmark runner is `train.py --eval-only` (as Search-R1's evaluate.sh runs verl's trainer with val_only):
it needs model loading, retrieval and rollouts, which sit above this module, and sharing train.py's flags means a
checkpoint is evaluated with the settings it was trained with. This module stays at the bottom: rollout.py
scores each episode with `exact_match`, and nothing here imports the model code.

Scoring, as Search-R1 and FlashRAG define it:
  answer     = the text of the last complete <answer>...</answer> in the model's *response*, stripped
  normalise  = lowercase, drop ASCII punctuation, drop the words a/an/the, collapse white space  (SQuAD)
  EM         = 1 if normalise(answer) == normalise(gold) for any gold answer, else 0
  F1         = max over golds of token-level F1 of the normalised strings (SQuAD / HotpotQA, as in FlashRAG)
  SubEM      = 1 if normalise(gold) is a substring of normalise(answer) for any gold
A response without a complete answer scores 0 on all three.

Checked against FlashRAG: on every file of ../shared/data/searchr1_eval (Search-R1 outputs that FlashRAG scored
from their `pred` column), EM and F1 from `final_response` equal the file's `em` and `f1` columns item for item
(tests/test_evaluate.py). Deviations from FlashRAG, both unseen in those files:
  1. Text inside <information>...</information> is never read as an answer: retrieved passages are not the
     model's words (the same defect as reading the prompt's "<answer> Beijing </answer>" example).
  2. A gold answer that normalises to "" ("The The", "*", ")") is compared after lowercasing and collapsing
     white space only. FlashRAG would compare "" == "", so an empty or missing answer, or "the", scored 1.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from pathlib import Path

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INFORMATION_RE = re.compile(r"<information>.*?</information>", re.DOTALL)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(response: str) -> str | None:
    """The last complete <answer>...</answer> of the model's response, stripped; None if there is none.

    Pass the response only, never prompt + response: Search-R1's prompt contains "<answer> Beijing </answer>"
    as an example, and an extractor fed the prompt reads it whenever the model gives no answer of its own
    (Search-R1 works around this by requiring two matches). Retrieved <information> blocks are skipped too.
    A cut-off answer ("<answer> Paris </") is not complete and does not count.
    """
    matches = _ANSWER_RE.findall(_INFORMATION_RE.sub(" ", response))
    return matches[-1].strip() if matches else None


def _same(prediction: str, gold: str) -> bool:
    g = normalize_answer(gold)
    if not g:  # a gold made only of articles/punctuation: see deviation 2 in the module docstring
        return " ".join(prediction.lower().split()) == " ".join(gold.lower().split())
    return normalize_answer(prediction) == g


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer (the reward), else 0.0."""
    if prediction is None:
        return 0.0
    return float(any(_same(prediction, g) for g in golden_answers))


def subem(prediction: str | None, golden_answers: list[str]) -> float:
    """1.0 if any normalised gold answer is a substring of the normalised prediction, else 0.0."""
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(_same(prediction, g) if not normalize_answer(g) else normalize_answer(g) in p
                     for g in golden_answers))


def f1(prediction: str | None, golden_answers: list[str]) -> float:
    """Token-level F1 of the normalised strings, max over gold answers (SQuAD; HotpotQA's yes/no rule as FlashRAG).

    A yes/no/noanswer prediction or gold scores 0 against anything but itself, so "yes" gets no credit
    for sharing a token with "yes, in 1990".
    """
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    best = 0.0
    for gold in golden_answers:
        g = normalize_answer(gold)
        if (p in ("yes", "no", "noanswer") or g in ("yes", "no", "noanswer")) and p != g:
            continue
        p_tokens, g_tokens = p.split(), g.split()
        num_same = sum((Counter(p_tokens) & Counter(g_tokens)).values())
        if num_same == 0:
            continue
        precision, recall = num_same / len(p_tokens), num_same / len(g_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


# ---------------------------------------------------------------- scoring files of model outputs


def score_file(path: str | Path, field: str = "final_response") -> dict:
    """Score every row's `field` against its golden_answers; compare with `em`/`f1` columns when present.

    Returns {"file", "n", "em", "f1", "subem", "em_agree", "f1_agree", "em_mismatches"} where the agreement
    entries are None when the rows have no such column, else the number of rows that agree.
    """
    path = Path(path)
    ems, f1s, subs, em_agree, f1_agree, mismatches = [], [], [], 0, 0, []
    has_em = has_f1 = True
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: bad JSON ({e.msg})") from None
            for key in (field, "golden_answers"):
                if key not in row:
                    raise ValueError(f"{path}:line {n}: missing field {key!r}")
            golds = row["golden_answers"]
            if not isinstance(golds, list) or not all(isinstance(g, str) for g in golds):
                raise ValueError(f"{path}:line {n}: field 'golden_answers' must be a list of strings")
            response = row[field]
            answer = extract_answer(response) if isinstance(response, str) else None
            em, f = exact_match(answer, golds), f1(answer, golds)
            ems.append(em)
            f1s.append(f)
            subs.append(subem(answer, golds))
            has_em = has_em and "em" in row
            has_f1 = has_f1 and "f1" in row
            if "em" in row:
                if float(row["em"]) == em:
                    em_agree += 1
                else:
                    mismatches.append(f"line {n}: ours {em} vs file {row['em']} (answer {answer!r:.60})")
            if "f1" in row and abs(float(row["f1"]) - f) < 1e-6:
                f1_agree += 1
    k = max(len(ems), 1)
    return {"file": str(path), "n": len(ems), "em": sum(ems) / k, "f1": sum(f1s) / k, "subem": sum(subs) / k,
            "em_agree": em_agree if has_em and ems else None, "f1_agree": f1_agree if has_f1 and ems else None,
            "em_mismatches": mismatches}


def format_score_table(results: list[dict]) -> str:
    width = max([len(Path(r["file"]).name) for r in results] + [4])
    lines = [f"{'file':<{width}}  {'n':>6}  {'EM':>6}  {'F1':>6}  {'SubEM':>6}  {'em agree':>11}  {'f1 agree':>11}"]
    for r in results:
        em_agree, f1_agree = ("-" if r[k] is None else f"{r[k]}/{r['n']}" for k in ("em_agree", "f1_agree"))
        lines.append(f"{Path(r['file']).name:<{width}}  {r['n']:>6}  {r['em']:>6.3f}  {r['f1']:>6.3f}  "
                     f"{r['subem']:>6.3f}  {em_agree:>11}  {f1_agree:>11}")
    if len(results) > 1:  # the mean of per-file means, as benchmark averages are reported
        avg = {k: sum(r[k] for r in results) / len(results) for k in ("em", "f1", "subem")}
        lines.append(f"{'average':<{width}}  {sum(r['n'] for r in results):>6}  {avg['em']:>6.3f}  "
                     f"{avg['f1']:>6.3f}  {avg['subem']:>6.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- benchmark results

# The paper's seven benchmarks, in its table's order, with the column names it prints.
BENCHMARKS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
              "2wiki": "2wiki", "musique": "Musique", "bamboogle": "Bamboogle"}


def score_episodes(episodes) -> dict:
    n = max(len(episodes), 1)
    return {
        "em": sum(e.reward for e in episodes) / n,
        "f1": sum(f1(e.answer, e.example.golden_answers) for e in episodes) / n,
        "searches": sum(e.num_searches for e in episodes) / n,
        "n": len(episodes),
    }


def write_predictions(path: Path, episodes) -> None:
    """FlashRAG-style rows, so `python evaluate.py score` re-scores them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for e in episodes:
            row = {"id": e.example.id, "question": e.example.question, "golden_answers": e.example.golden_answers,
                   "final_response": e.text, "pred": e.answer, "em": e.reward,
                   "f1": f1(e.answer, e.example.golden_answers), "num_searches": e.num_searches}
            f.write(json.dumps(row) + "\n")


def format_table(results: dict, title: str = "", f1_row: bool = True) -> str:
    """The paper's layout: one column per dataset, then the average; a row for EM (and F1)."""
    names = list(results)
    header = [BENCHMARKS.get(n, n) for n in names] + ["Avg."]
    rows = [("EM", "em")] + ([("F1", "f1")] if f1_row else []) + [("searches", "searches")]
    width = max(9, *(len(h) + 1 for h in header))
    lines = [title] if title else []
    lines.append(f"{'':<9}" + "".join(f"{h:>{width}}" for h in header))
    for label, key in rows:
        values = [results[n][key] for n in names]
        values.append(sum(values) / len(values) if values else float("nan"))
        lines.append(f"{label:<9}" + "".join(f"{v:>{width}.3f}" for v in values))
    lines.append(f"{'n':<9}" + "".join(f"{results[n]['n']:>{width}d}" for n in names))
    return "\n".join(lines)


# ---------------------------------------------------------------- picture of a run


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """PNG of reward, exact match, searches per episode, KL and the OPSD teacher diagnostic against the schedule,
    OPSD phases shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib (pip install matplotlib)")
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path}: no metrics.jsonl (not a run folder?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def series(key, phase):
        pts = [(r["unit"], r[key]) for r in rows if key in r and r["phase"] == phase]
        return [x for x, _ in pts], [y for _, y in pts]

    # (key, label, phase, how): "line" joins a phase's points along the schedule; "points" leaves each alone (one
    # per OPSD phase: joining phases would draw a trend nothing measured); ("before", key2) draws each OPSD phase
    # as one segment from key (its start) to key2 (its end).
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("/em")})
    panels = [
        ("reward (exact match of rollouts)", [("reward/mean", "GRPO rollouts", "grpo", "line"),
                                              ("opsd_rollout/reward_mean", "OPSD rollouts", "opsd", "points")]),
        ("eval exact match", [(k, k.split("/")[1], "eval", "line") for k in eval_keys]),
        ("searches per episode", [("rollout/searches_per_episode", "GRPO rollouts", "grpo", "line"),
                                  ("opsd_rollout/searches_per_episode", "OPSD rollouts", "opsd", "points")]),
        ("KL", [("grpo/kl", "GRPO: k3 KL to reference", "grpo", "line"),
                ("opsd/kl_before", "OPSD: KL(teacher||student), start -> end of phase", "opsd",
                 ("before", "opsd/kl_after"))]),
        ("OPSD: greedy EM on its questions", [("opsd/teacher_em", "teacher (reference in its prompt)", "opsd", "points"),
                                              ("opsd/student_em", "student (normal prompt)", "opsd", "points")]),
    ]
    panels = [p for p in panels if any(key in r for key, *_ in p[1] for r in rows)]  # (no diagnostic: no panel)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.5 * len(panels) + 0.5), sharex=True, squeeze=False)
    axes = axes[:, 0]  # (one panel too: a run stopped after its baseline evaluation)
    for ax, (ylabel, lines) in zip(axes, panels):
        for key, label, phase, how in lines:
            xs, ys = series(key, phase)
            if not xs:
                continue
            if how == "line":
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
            elif how == "points":
                ax.plot(xs, ys, ls="none", marker="D", markersize=5, label=label)
            else:
                ends = dict(zip(*series(how[1], phase)))
                color = None
                for x, y in zip(xs, ys):
                    seg = ax.plot([x - 0.3, x + 0.3], [y, ends.get(x, y)], marker="o", markersize=3, color=color,
                                  label=label if color is None else None)
                    color = seg[0].get_color()
        for r in rows:
            if r["phase"] == "opsd":
                ax.axvspan(r["unit"] - 0.5, r["unit"] + 0.5, color="tab:orange", alpha=0.15, lw=0)
            elif r["phase"] == "eval":
                ax.axvline(r["unit"], color="grey", ls=":", lw=1)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    axes[0].set_title(f"{Path(run_dir).name}: GRPO steps (white), OPSD phases (orange), evaluations (dotted)")
    axes[-1].set_xlabel("schedule position (GRPO step / OPSD phase / evaluation)")
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ---------------------------------------------------------------- command line


def cmd_score(args) -> int:
    try:
        results = [score_file(p, field=args.field) for p in args.files]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_score_table(results))
    for r in results:
        for m in r["em_mismatches"][:5]:
            print(f"em mismatch {Path(r['file']).name} {m}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        parser = argparse.ArgumentParser(prog="evaluate.py plot", description="PNG of a run's curves")
        parser.add_argument("run_dir")
        parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
        args = parser.parse_args(argv[1:])
        print(plot_run(Path(args.run_dir), args.out))
        return 0
    if argv[:1] == ["score"]:
        parser = argparse.ArgumentParser(prog="evaluate.py score", description="score model outputs (jsonl rows "
                                         "with a response and golden_answers)")
        parser.add_argument("files", nargs="+", help="jsonl files, e.g. Search-R1/FlashRAG evaluation outputs")
        parser.add_argument("--field", default="final_response", help="the row field holding the model's response")
        return cmd_score(parser.parse_args(argv[1:]))
    hint = " ".join(argv) if argv and argv[0].startswith("-") else "--model MODEL ..."
    print(f"error: evaluate.py scores files (`score`) and plots runs (`plot`); to evaluate a model on benchmarks, "
          f"run `python train.py --eval-only {hint}` (same flags as training)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
