"""Answer extraction and exact-match scoring. (skeleton: being filled in, see issue 2)"""
from __future__ import annotations

import re
import string

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop a/an/the, collapse white space."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def extract_answer(response: str) -> str | None:
    """The last complete <answer>...</answer> of the model's response (never pass the prompt)."""
    matches = _ANSWER_RE.findall(response)
    return matches[-1].strip() if matches else None


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golden_answers))
