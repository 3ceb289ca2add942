"""Structured output: what the step loop calls (Constraints) and what it is built from."""
from __future__ import annotations

from rlserve.engine.grammar.constraints import Constraints, GrammarStatus, MaskTicket
from rlserve.engine.grammar.spec import GrammarSpec

__all__ = ["Constraints", "GrammarSpec", "GrammarStatus", "MaskTicket"]
