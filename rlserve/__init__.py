"""rlserve: a readable LLM inference engine, server, router and RL stack sharing one model definition."""
from __future__ import annotations

from rlserve.outputs import CompletionOutput, RequestOutput
from rlserve.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # LLM pulls in the model stack; import it only when asked for.
    if name == "LLM":
        from rlserve.llm import LLM
        return LLM
    raise AttributeError(name)
