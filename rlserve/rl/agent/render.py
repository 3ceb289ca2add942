"""Turn separators and tool results as token ids, appended to a conversation's ids without ever
re-tokenising the conversation.

The chat template is rendered twice around a probe conversation ending in an assistant message: the
difference between "… assistant" and "… assistant, tool results, generation prompt" is the text that
follows an assistant turn in this template. What the template puts right after the assistant's content
(e.g. "<|im_end|>\\n") closes the turn: the engine stops at the end-of-turn token, so only the rest of it
("\\n") is added. Only that new segment is tokenised; it begins right after a special token, where
tokenisation of the whole conversation would split too (a test checks both on the default template).
"""
from __future__ import annotations

from typing import Any

_MARK = "\x00ASSISTANT\x00"
_PROBE: list[dict[str, Any]] = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]


class TurnRenderer:
    def __init__(self, tokenizer: Any, tool_role: str = "tool") -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("agentic rollouts need a tokenizer with a chat template")
        self.tokenizer = tokenizer
        self.tool_role = tool_role
        base = self._render([*_PROBE, {"role": "assistant", "content": _MARK}], False)
        self._base = base
        # the template's text after an assistant message's content, e.g. "<|im_end|>\n"
        self.turn_close = base[base.rindex(_MARK) + len(_MARK):]

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt))

    def _after_assistant(self, messages: list[dict[str, Any]]) -> str:
        """The template's text for `messages` following an assistant turn, generation prompt included."""
        full = self._render([*_PROBE, {"role": "assistant", "content": _MARK}, *messages], True)
        if not full.startswith(self._base):
            raise ValueError("the chat template renders earlier messages differently once more follow; "
                             "turns cannot be appended token by token with it")
        return full[len(self._base):]

    def closing_text(self, last_token_text: str) -> str:
        """What closes the assistant turn after the engine stopped: the template's turn_close minus the
        stop token the model already generated (all of it when the turn did not end on it)."""
        if last_token_text and self.turn_close.startswith(last_token_text):
            return self.turn_close[len(last_token_text):]
        return self.turn_close

    def tool_results(self, results: list[str], last_token_text: str) -> list[int]:
        """Token ids to append after an assistant turn: its closing separator, the tool messages and the
        next assistant header."""
        text = self.closing_text(last_token_text) + self._after_assistant(
            [{"role": self.tool_role, "content": r} for r in results])
        return self.encode(text)

    def user_message(self, content: str, last_token_text: str) -> list[int]:
        text = self.closing_text(last_token_text) + self._after_assistant([{"role": "user", "content": content}])
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))
