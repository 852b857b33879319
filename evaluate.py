"""Answer extraction and scoring (exact match is the reward and the metric), and the command line.

    python evaluate.py score ../shared/data/searchr1_eval/*.jsonl    # rows with "final_response", "golden_answers"

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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score model outputs (jsonl rows with a response and golden_answers)")
    p.add_argument("files", nargs="+", help="jsonl files, e.g. Search-R1/FlashRAG evaluation outputs")
    p.add_argument("--field", default="final_response", help="the row field holding the model's response")
    p.set_defaults(func=cmd_score)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
