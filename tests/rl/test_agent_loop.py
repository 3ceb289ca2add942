"""The agent loop on scripted turns: the token sequence is exactly the chat template's rendering of the
conversation, the loss mask covers exactly the assistant's tokens (checked token by token against a
hand-built conversation), and failing or hanging tools come back to the model as error messages."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agent_fakes import ScriptedBackend, char_tokenizer

from rlserve.rl.agent.lookup import Corpus, lookup_tool
from rlserve.rl.agent.loop import AgentLoop, AgentOptions
from rlserve.rl.agent.render import TurnRenderer
from rlserve.rl.agent.spawner import python_tool
from rlserve.rl.agent.tools import AgentTool
from rlserve.sampling import SamplingParams

CALC = '<tool_call>{"name": "python", "arguments": {"code": "1234 * 5678"}}</tool_call>'
LOOKUP = '<tool_call>{"name": "lookup", "arguments": {"query": "capital of France"}}</tool_call>'
FLAKY = '<tool_call>{"name": "flaky", "arguments": {}}</tool_call>'
HANG = '<tool_call>{"name": "hang", "arguments": {}}</tool_call>'
ANSWER = "The product is \\boxed{7006652}."
CORPUS = Corpus([{"title": "France", "text": "Paris is the capital of France."},
                 {"title": "Peru", "text": "Lima is the capital of Peru."}])


async def _flaky() -> str:
    raise RuntimeError("the service is down")


async def _hang() -> str:
    await asyncio.sleep(3600)
    return "never"


def _tools() -> list[AgentTool]:
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    return [python_tool(), lookup_tool(CORPUS, k=1), AgentTool("flaky", "fails", schema, _flaky),
            AgentTool("hang", "never returns", schema, _hang)]


@pytest.fixture(scope="module")
def smol_tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model_dir)


def _run(tok: Any, texts: list[str], prompt: list[dict[str, str]], end_of_turn: int, **options: Any):
    backend = ScriptedBackend(tok, texts, end_of_turn)
    opts = AgentOptions(**{"max_turns": 6, "max_tokens": 4096, "tool_timeout_s": 0.5} | options)
    loop = AgentLoop(backend, TurnRenderer(tok), _tools(), SamplingParams(temperature=1.0), opts)
    prompt_ids = tok.encode(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)
    return asyncio.run(loop.run_sample(prompt_ids, seed=7)), backend, prompt_ids


def _hand_built(tok: Any, messages: list[dict[str, str]], close: str) -> tuple[list[int], list[int], str]:
    """The whole conversation tokenised at once, and its mask from character offsets: a token is the
    model's when it lies inside an assistant message's content or its end-of-turn token."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True))
            assert text[start:start + len(m["content"])] == m["content"]
            spans.append((start, start + len(m["content"]) + len(close)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(a <= s and e <= b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask, text


def _check_against_hand_built(tok: Any, sample: Any, prompt: list[dict[str, str]], turns: list[str],
                              results: list[str], close: str) -> None:
    messages = list(prompt)
    for k, t in enumerate(turns):
        messages.append({"role": "assistant", "content": t})
        if k < len(results):
            messages.append({"role": "tool", "content": results[k]})
    ids, mask, text = _hand_built(tok, messages, close)
    n = len(sample.token_ids)
    # the sample ends on the model's end-of-turn token; the template's trailing separator is not ours
    assert sample.token_ids == ids[:n]
    assert tok.decode(ids[n:]) == tok.apply_chat_template(messages, tokenize=False)[len(tok.decode(ids[:n])):]
    for i, (got, want) in enumerate(zip(sample.loss_mask, mask[:n])):
        assert got == want, (i, tok.decode(sample.token_ids[i:i + 1]), got, want)
    assert sum(sample.loss_mask) == sum(len(tok.encode(t, add_special_tokens=False)) + 1 for t in turns)


def test_mask_covers_exactly_the_generated_tokens_smollm2_template(smol_tokenizer):
    tok = smol_tokenizer
    prompt = [{"role": "user", "content": "What is 1234 * 5678?"}]
    turns = [CALC, LOOKUP, FLAKY, ANSWER]
    sample, backend, prompt_ids = _run(tok, turns, prompt, tok.convert_tokens_to_ids("<|im_end|>"))
    assert sample.status == "finished" and sample.turns == 4 and sample.tool_calls == 3
    assert sample.tool_errors == 1                     # the flaky service's exception
    results = ["7006652", "[1] France: Paris is the capital of France.",
               "Error: RuntimeError: the service is down"]
    _check_against_hand_built(tok, sample, prompt, turns, results, "<|im_end|>")
    # per-token engine logprobs and weight versions sit on the generated tokens only
    assert all((lp == -0.5) == bool(m) and (v == "v1") == bool(m)
               for lp, v, m in zip(sample.logprobs, sample.weight_versions, sample.loss_mask))
    # each turn was asked with the conversation so far, token for token, and its own seed
    for k, (ids, params) in enumerate(backend.calls):
        assert sample.token_ids[:len(ids)] == ids and params.seed == 7 + k
        assert params.logprobs == 0 and params.logprobs_mode == "tempered"
    assert backend.calls[0][0] == prompt_ids


def test_mask_on_a_llama_like_template_with_a_character_tokenizer():
    tok = char_tokenizer()
    prompt = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "12 * 3?"}]
    turns = [CALC, CALC, LOOKUP, "36"]
    sample, _, _ = _run(tok, turns, prompt, tok.convert_tokens_to_ids("<|eot|>"))
    assert sample.status == "finished" and sample.turns == 4
    results = ["7006652", "7006652", "[1] France: Paris is the capital of France."]
    _check_against_hand_built(tok, sample, prompt, turns, results, "<|eot|>")
    assert "<|start|>ipython<|end|>" in tok.decode(sample.response_ids)


def test_a_hanging_tool_times_out_and_the_model_sees_the_error(smol_tokenizer):
    tok = smol_tokenizer
    sample, backend, _ = _run(tok, [HANG, ANSWER], [{"role": "user", "content": "go"}],
                              tok.convert_tokens_to_ids("<|im_end|>"), tool_timeout_s=0.2)
    assert sample.status == "finished" and sample.turns == 2
    seen = tok.decode(backend.calls[1][0])   # what the second turn was given
    assert "Error: tool 'hang' timed out after 0.2 s" in seen
    assert sample.tool_calls == 1 and sample.tool_errors == 1


def test_unknown_tool_bad_arguments_and_limits(smol_tokenizer):
    tok = smol_tokenizer
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    bad_args = '<tool_call>{"name": "python", "arguments": {"source": "1"}}</tool_call>'
    sample, backend, _ = _run(tok, [bad_args, ANSWER], [{"role": "user", "content": "go"}], eot)
    assert sample.status == "finished" and "Error: TypeError" in tok.decode(backend.calls[1][0])
    assert sample.tool_errors == 1
    # max_turns of tool calls and no answer: truncated, the last call is not run
    sample, backend, _ = _run(tok, [CALC] * 3, [{"role": "user", "content": "go"}], eot, max_turns=3)
    assert sample.status == "truncated" and sample.turns == 3 and sample.tool_calls == 2
    assert sample.tool_errors == 0
    assert sample.token_ids[-1] == eot and sample.loss_mask[-1] == 1
    # the token budget stops a sample whose next tool result would not fit
    sample, _, _ = _run(tok, [CALC, ANSWER], [{"role": "user", "content": "go"}], eot, max_tokens=40)
    assert sample.status == "truncated" and sample.turns == 1 and sample.response_length <= 40


def test_markdown_parser_reads_python_blocks_as_calls():
    from rlserve.rl.agent.loop import tool_parser
    from rlserve.tool_parsing import ToolCall
    parse = tool_parser(_tools(), "markdown")
    assert parse("Let me compute.\n```python\nprint(12 * 3)\n```\n") == [ToolCall("python", {"code": "print(12 * 3)\n"})]
    assert parse("The answer is \\boxed{36}.") == []
    assert tool_parser(_tools(), "qwen")(CALC) == [ToolCall("python", {"code": "1234 * 5678"})]
