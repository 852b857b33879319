"""Retrieval for the search agent. (skeleton: being filled in, see issue 2)"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Passage:
    id: str
    title: str
    text: str
    score: float = 0.0


def parse_corpus_row(row: dict) -> Passage:
    """Search-R1 corpus row {"id", "contents"}: the title is the first line, quotes kept as in the corpus."""
    title, _, text = row["contents"].partition("\n")
    return Passage(id=str(row["id"]), title=title, text=text)


def format_passages(passages: list[Passage]) -> str:
    """Search-R1's `_passages2string`: one `Doc i(Title: t) text` line per passage."""
    return "".join(f"Doc {i}(Title: {p.title}) {p.text}\n" for i, p in enumerate(passages, start=1))
