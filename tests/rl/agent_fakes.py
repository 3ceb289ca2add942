"""Test doubles for the agent loop: a scripted backend whose turns are fixed texts, and a tiny
character-level tokenizer with a Llama-3-like chat template (tool results under role "ipython")."""
from __future__ import annotations

from typing import Any

from rlserve.rl.agent.backend import Turn
from rlserve.sampling import SamplingParams


class ScriptedBackend:
    """Turn k of a sample is texts[k] encoded, then the end-of-turn token; every logprob is -0.5."""

    def __init__(self, tokenizer: Any, texts: list[str], end_of_turn: int, version: str = "v1") -> None:
        self.tok, self.texts, self.eot, self.version = tokenizer, texts, end_of_turn, version
        self.calls: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Turn:
        text = self.texts[len(self.calls)]
        self.calls.append((list(prompt_ids), params))
        ids = [*self.tok.encode(text, add_special_tokens=False), self.eot]
        return Turn(ids, [-0.5] * len(ids), [self.version] * len(ids), text, "stop")


LLAMA_LIKE_TEMPLATE = (
    "{% for m in messages %}{% set role = 'ipython' if m['role'] == 'tool' else m['role'] %}"
    "<|start|>{{ role }}<|end|>\n\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|end|>\n\n{% endif %}")


def char_tokenizer(chat_template: str = LLAMA_LIKE_TEMPLATE) -> Any:
    """One token per printable ASCII character and newline, plus <|start|>, <|end|>, <|eot|>."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    chars = ["\n", *(chr(c) for c in range(32, 127))]
    vocab = {c: i for i, c in enumerate(chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>", "<|eot|>"]})
    tok.chat_template = chat_template
    return tok
