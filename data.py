"""QA records and loaders. (skeleton: being filled in, see issue 2)"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    id: str
    question: str
    golden_answers: list[str]
    source: str = ""
