"""Structured output through the offline API: every sample parses and validates."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from lark import Lark
from structured_schemas import EBNF, REGEXES, SCHEMAS

from rlserve import LLM, SamplingParams
from rlserve.engine.grammar import GrammarSpec


@pytest.fixture(scope="module")
def llm(default_model_dir) -> LLM:
    return LLM()


def chat(llm: LLM, text: str) -> str:
    return llm.apply_chat_template([{"role": "user", "content": text}])


def test_json_schemas_always_validate(llm):
    names = list(SCHEMAS)
    prompts, params = [], []
    for i, name in enumerate(names):
        for j in range(1):
            prompts.append(chat(llm, f"Give me an example JSON value ({name})."))
            params.append(SamplingParams(temperature=1.0, seed=100 * i + j, max_tokens=200,
                                         json_schema=SCHEMAS[name]))
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, _sp, name in zip(outs, params, names):
        c = out.outputs[0]
        assert c.finish_reason == "stop", (name, c.text)
        jsonschema.validate(json.loads(c.text), SCHEMAS[name])


def test_json_schema_as_string_and_json_object(llm):
    p = chat(llm, "Describe a cat as JSON.")
    out = llm.generate([p, p], [SamplingParams(temperature=1.0, seed=1, max_tokens=200,
                                               json_schema=json.dumps(SCHEMAS["flat_object"])),
                                SamplingParams(temperature=0.7, seed=2, max_tokens=300, json_object=True)],
                       use_tqdm=False)
    jsonschema.validate(json.loads(out[0].outputs[0].text), SCHEMAS["flat_object"])
    if out[1].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(out[1].outputs[0].text), (dict, list))


def test_regex_and_ebnf_fully_match(llm):
    prompts = [chat(llm, "Answer in the required format.")] * (len(REGEXES) * 3 + 6)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, regex=r)
              for i, r in enumerate(r for r in REGEXES for _ in range(3))]
    params += [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=60, ebnf=EBNF) for i in range(6)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    parser = Lark(EBNF_LARK, start="root")
    for out, sp in zip(outs, params):
        text = out.outputs[0].text
        if sp.regex is not None:
            assert out.outputs[0].finish_reason == "stop"
            assert re.fullmatch(sp.regex, text), (sp.regex, text)
        elif out.outputs[0].finish_reason == "stop":
            parser.parse(text)   # raises on a string outside the grammar


EBNF_LARK = r'''
root: expr
expr: term (("+" | "-") term)*
term: DIGIT | "(" expr ")"
DIGIT: /[0-9]/
'''


def test_constrained_rows_do_not_change_unconstrained_ones(llm):
    plain = [chat(llm, q) for q in ("What is the capital of Italy?", "Name three fruits.", "Say hi.")]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    alone = [o.outputs[0].token_ids for o in llm.generate(plain, greedy, use_tqdm=False)]
    mixed_prompts = plain + [chat(llm, "JSON please")] * 3
    mixed_params = [greedy] * 3 + [SamplingParams(temperature=1.0, seed=k, max_tokens=100,
                                                  json_schema=SCHEMAS["enum"]) for k in range(3)]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone


def test_n_samples_and_retraction_keep_grammar_state(default_model_dir):
    llm = LLM(max_total_tokens=600)   # small pool: samples get retracted and recomputed mid-JSON
    p = llm.apply_chat_template([{"role": "user", "content": "List some tags as JSON."}])
    sp = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=120, json_schema=SCHEMAS["array_of_objects"])
    outs = llm.generate([p] * 3, sp, use_tqdm=False)
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.text), SCHEMAS["array_of_objects"])
    assert llm.engine.kv_leaked() == 0


@pytest.mark.parametrize("kw, words", [
    (dict(regex="(unclosed"), "regex"),
    (dict(ebnf="root ::= undefined_rule"), "ebnf"),
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}), "json_schema"),
])
def test_bad_grammar_rejected_clearly_and_engine_keeps_serving(llm, kw, words):
    with pytest.raises(ValueError, match=words):
        llm.generate(["hi"], SamplingParams(max_tokens=4, **kw), use_tqdm=False)
    ok = llm.generate(["hi"], SamplingParams(max_tokens=4, regex="[a-z]{4}"), use_tqdm=False)[0]
    assert re.fullmatch("[a-z]{4}", ok.outputs[0].text)


def test_one_constraint_at_a_time():
    with pytest.raises(ValueError, match="one structured-output constraint"):
        SamplingParams(regex="a", ebnf="root ::= \"a\"")
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams(json_schema="{nope")


def test_overlapped_scheduling_keeps_grammars_exact(default_model_dir):
    """Overlapped decode launches step N+1 before the host has seen step N; constrained rows then sample
    only after their grammar accepted token N. Seeded results must equal the synchronous engine's."""
    prompts, params = [], []
    for i, name in enumerate(["flat_object", "enum", "array_of_objects"]):
        prompts += [f"<|im_start|>user\nJSON ({name}) please<|im_end|>\n<|im_start|>assistant\n"] * 2
        params += [SamplingParams(temperature=1.0, seed=10 * i + j, max_tokens=150, json_schema=SCHEMAS[name])
                   for j in range(2)]
    prompts += ["Count: 1, 2, 3,"] * 2
    params += [SamplingParams(temperature=0.8, seed=99 + j, max_tokens=40, ignore_eos=True) for j in range(2)]
    sync = LLM(overlap_schedule=False).generate(prompts, params, use_tqdm=False)
    over_llm = LLM(overlap_schedule=True)
    over = over_llm.generate(prompts, params, use_tqdm=False)
    assert over_llm.engine.status().counters.overlapped_steps > 20
    assert [o.outputs[0].token_ids for o in over] == [o.outputs[0].token_ids for o in sync]
    for out, sp in zip(over[:6], params[:6]):
        jsonschema.validate(json.loads(out.outputs[0].text), sp.json_schema)
    assert over_llm.engine.kv_leaked() == 0



class _CountingFiller:
    def __init__(self, real, name: str, calls: list[str]) -> None:
        self.real, self.name, self.calls = real, name, calls

    def batch_fill_next_token_bitmask(self, *args) -> None:
        self.calls.append(self.name)
        self.real.batch_fill_next_token_bitmask(*args)


def test_serial_and_parallel_mask_fills_agree_and_cost_picks_the_filler(llm):
    """Cheap rows are filled on one thread, costly ones on xgrammar's pool; both give the same masks."""
    import rlserve.engine.grammar.backend as grammar
    e = llm.engine
    backend = grammar.GrammarBackend(e.tokenizer, e.model_config.vocab_size, sorted(e.eos_ids))
    spec = GrammarSpec.from_params(SamplingParams(json_schema=SCHEMAS[next(iter(SCHEMAS))]))
    matchers = [backend.matcher(spec, backend.compile(spec))[0] for _ in range(4)]
    for m, prefix in zip(matchers, ['{', '{"']):
        assert m.accept_string(prefix)
    rows = list(range(len(matchers)))
    serial = torch.zeros_like(backend._host_bitmask(len(rows), llm.engine.device))
    backend._serial_filler.batch_fill_next_token_bitmask(matchers, serial, rows)
    parallel = torch.zeros_like(serial)
    backend._parallel_filler.batch_fill_next_token_bitmask(matchers, parallel, rows)
    assert torch.equal(serial, parallel) and serial.any()

    calls: list[str] = []
    real = backend._serial_filler, backend._parallel_filler
    backend._serial_filler = _CountingFiller(real[0], "serial", calls)
    backend._parallel_filler = _CountingFiller(real[1], "parallel", calls)
    try:
        backend._fills = 1                                   # the next fill is not a probing one
        backend._serial_row_s = 2 * grammar.PARALLEL_FILL_S / len(rows)
        costly = torch.zeros_like(serial)
        backend._fill(matchers, costly, rows)
        backend._serial_row_s = 0.0
        cheap = torch.zeros_like(serial)
        backend._fill(matchers, cheap, rows)
    finally:
        backend._serial_filler, backend._parallel_filler = real
    assert calls == ["parallel", "serial"]
    assert torch.equal(costly, serial) and torch.equal(cheap, serial)
