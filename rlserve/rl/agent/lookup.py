"""A lookup tool over a local corpus: passages from a JSONL file (one {"title", "text"} object a line)
or a list of dicts, ranked by keyword overlap with the query (BM25), top-k returned."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from rlserve.rl.agent.tools import AgentTool

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Corpus:
    def __init__(self, passages: list[dict[str, Any]], k1: float = 1.2, b: float = 0.75) -> None:
        if not passages:
            raise ValueError("the corpus is empty")
        self.passages = passages
        self.k1, self.b = k1, b
        self._terms = [Counter(_words(f"{p.get('title', '')} {p.get('text', '')}")) for p in passages]
        self._avg_len = sum(sum(t.values()) for t in self._terms) / len(passages)
        df = Counter(w for t in self._terms for w in t)
        n = len(passages)
        self._idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Corpus:
        lines = Path(path).read_text().splitlines()
        return cls([json.loads(line) for line in lines if line.strip()])

    def search(self, query: str, k: int = 3) -> list[dict[str, Any]]:
        """The k best passages by BM25; passages sharing no word with the query are left out."""
        q = set(_words(query))
        scored = []
        for i, terms in enumerate(self._terms):
            length = sum(terms.values())
            s = sum(self._idf[w] * terms[w] * (self.k1 + 1)
                    / (terms[w] + self.k1 * (1 - self.b + self.b * length / self._avg_len))
                    for w in q if w in terms)
            if s > 0:
                scored.append((-s, i))
        return [self.passages[i] for _, i in sorted(scored)[:k]]


def lookup_tool(corpus: Corpus, k: int = 3) -> AgentTool:
    async def lookup(query: str) -> str:
        hits = corpus.search(query, k)
        if not hits:
            return "No passage matches the query."
        return "\n\n".join(f"[{i + 1}] {h.get('title', '')}: {h.get('text', '')}".strip()
                           for i, h in enumerate(hits))
    return AgentTool("lookup", f"Search a local text collection; returns the {k} best matching passages.",
                     {"type": "object", "properties": {"query": {"type": "string", "description": "keywords"}},
                      "required": ["query"]}, lookup)
