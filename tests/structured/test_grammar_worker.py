"""Grammar masks from the helper process: the same masks, the same tokens, and a clean fallback.

CPU tests; on a CUDA machine (`pytest tests/structured/test_grammar_worker.py`) they also cover the
path where the device waits for the helpers' answers before its mask copy and sampling."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import time

import jsonschema
import pytest
import torch
from structured_schemas import REGEXES, SCHEMAS

import rlserve.engine.grammar.helpers as helpers_module
from rlserve import LLM, SamplingParams
from rlserve.engine.grammar import GrammarSpec
from rlserve.engine.grammar.backend import GrammarBackend

NAMES = list(SCHEMAS)[:6]
REGEX = REGEXES[2]      # two capitalised words: a few tokens of free text


def _engine(helpers: int) -> LLM:
    # Overlapped steps are where the helpers work. Several engines live at once: a small share each of
    # a GPU's memory (a CPU ignores it).
    llm = LLM(overlap_schedule=True, gpu_memory_fraction=0.1, grammar_helpers=helpers)
    grammar = llm.engine.grammar
    grammar.start()                     # the compiler and helpers now, not with the first constraint
    assert grammar.status().helpers == helpers
    deadline = time.monotonic() + 120
    while helpers and not grammar.helpers_ready():   # until they have started the engine fills masks itself
        assert time.monotonic() < deadline, "the mask helper did not start"
        time.sleep(0.05)
    return llm


def _gone(pid: int) -> bool:
    """Whether the process has exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    while not _gone(pid):
        time.sleep(0.01)


@pytest.fixture(scope="module")
def engines(default_model_dir) -> dict[bool, LLM]:
    return {helper: _engine(2 if helper else 0) for helper in (True, False)}


@pytest.fixture(scope="module")
def backend(engines):
    """The grammar package's backend on its own (no engine loop): two helpers fill rows of its masks."""
    e = engines[False].engine
    b = GrammarBackend(e.tokenizer, e.model_config.vocab_size, sorted(e.eos_ids), helpers=2, helper_rows=64)
    deadline = time.monotonic() + 120
    while not b.helper_ready():
        assert b.helpers is not None and time.monotonic() < deadline, "the mask helpers did not start"
        time.sleep(0.05)
    yield b
    if b.helpers is not None:
        b.helpers.close()


def _batch(llm: LLM) -> tuple[list[str], list[SamplingParams]]:
    prompt = llm.apply_chat_template([{"role": "user", "content": "Give me an example as JSON."}])
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=64, json_schema=SCHEMAS[name])
              for i, name in enumerate(NAMES * 2)]
    params += [SamplingParams(temperature=1.0, seed=50 + i, max_tokens=40, regex=REGEX) for i in range(4)]
    params += [SamplingParams(temperature=0.7, seed=90 + i, max_tokens=24) for i in range(4)]
    return [prompt] * len(params), params


def _run(llm: LLM) -> list[tuple[list[int], str]]:
    # From an empty prefix cache each time: a cached prompt is prefilled by other kernels, whose
    # rounding (bf16 on a GPU) may tip a draw.
    llm.engine.flush_cache()
    outs = llm.generate(*_batch(llm), use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].text) for o in outs]


def test_helper_masks_give_the_same_tokens_as_masks_filled_in_the_engine(engines):
    with_helper, without = engines[True], engines[False]
    before = with_helper.engine.grammar.status()
    got, want = _run(with_helper), _run(without)
    after = with_helper.engine.grammar.status()
    assert after.helper_requests - before.helper_requests > 10, "the helper filled no masks"
    # On CUDA the sampling is queued behind the device's wait for the helpers' answers.
    assert after.queued_on_device - before.queued_on_device > (10 if torch.cuda.is_available() else -1)
    # Each helper reports the time it spent advancing its matchers and filling its rows.
    assert all(a1 > a0 and f1 > f0 for (a0, f0), (a1, f1) in zip(before.helper_busy_s, after.helper_busy_s))
    assert after.helpers == 2 and after.helpers_given_up == 0            # and never failed
    assert got == want
    for (_ids, reason, text), name in zip(got, NAMES * 2):
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    for _ids, reason, text in got[len(NAMES) * 2:len(NAMES) * 2 + 4]:
        if reason == "stop":
            assert re.fullmatch(REGEX, text), text
    assert sum(reason == "stop" for _, reason, _ in got[:len(NAMES) * 2]) >= len(NAMES)
    assert with_helper.engine.kv_leaked() == 0


def test_helper_mask_equals_the_engines_fill_token_by_token(backend):
    spec = GrammarSpec.from_params(SamplingParams(json_schema=SCHEMAS[NAMES[0]]))
    compiled = backend.compile(spec)
    backend.helper_share = 0.5       # the engine fills some rows too (two helpers take all by default)
    try:
        pairs = [backend.matcher(spec, compiled) for _ in range(7)]
    finally:
        backend.helper_share = 1.0
    gen = torch.Generator().manual_seed(0)
    for step in range(30):
        live = [(m, k) for m, k in pairs if not m.is_terminated()]
        if not live:
            break
        keys = [k for _, k in live] + [None]       # and one unconstrained row
        assert backend.request_masks(keys)
        if step == 0:           # both sides fill rows: the helpers every other matcher, the engine the rest
            assert None in keys[:-1] and {k % 2 for k in keys if k is not None} == {0, 1}
        rows = [m for m, _ in live] + [None]
        helper = backend.requested_masks(rows, keys, torch.device("cpu")).clone()   # their rows and ours
        here = backend.device_masks(rows, torch.device("cpu"))
        assert torch.equal(helper, here), step
        assert bool((helper[-1] == -1).all())
        # a random allowed token per row, accepted on both sides
        logits = torch.randn(len(live), backend.vocab_size, generator=gen)
        backend.apply_bitmask(logits, here[:-1].clone())
        for (m, k), token in zip(live, logits.argmax(-1).tolist()):
            backend.accepted(k, token)
            assert m.accept_token(token)
    for _, k in pairs:
        backend.release(k)


def test_the_engine_fills_masks_itself_when_the_helper_dies(engines, caplog):
    llm = _engine(1)
    want = _run(engines[False])
    _kill(llm.engine.grammar.status().helper_pids[0])
    with caplog.at_level(logging.WARNING, logger="rlserve"):
        got = _run(llm)
    assert got == want
    status = llm.engine.grammar.status()
    assert status.helpers == 0 and status.helpers_given_up == 1
    assert any("mask helper stopped" in r.message for r in caplog.records)
    assert llm.engine.kv_leaked() == 0


def test_helper_share_sets_how_many_matchers_the_helper_owns(backend):
    default = backend.helper_share
    assert default == 1.0                   # two helpers take every matcher
    try:
        for share, owned in ((0.5, 150), (2 / 3, 200), (1 / 3, 100), (1.0, 300)):
            backend.helper_share = share
            assert sum(backend._share_to_helpers(n) for n in range(300)) == owned
    finally:
        backend.helper_share = default


def test_the_engine_catches_its_matchers_up_when_the_helper_dies_mid_run(engines, caplog):
    """The engine's copies of the helper's matchers take their tokens only when read; a helper lost
    in the middle of a batch leaves them behind, and the engine's own fills must catch them up."""
    llm = _engine(2)
    want = _run(engines[False])
    grammar, step, steps, lagging = llm.engine.grammar, llm.engine.step, [0], []
    pid = grammar.status().helper_pids[1]

    def step_then_kill(*args, **kwargs):
        steps[0] += 1
        if steps[0] == 12:
            lagging.extend(grammar.status().lagging)
            _kill(pid)      # one of two
        return step(*args, **kwargs)

    llm.engine.step = step_then_kill
    with caplog.at_level(logging.WARNING, logger="rlserve"):
        got = _run(llm)
    assert lagging, "no matcher was behind its helper copy when the helper died"
    assert got == want
    assert grammar.status().helpers == 0
    assert any("mask helper stopped" in r.message for r in caplog.records)
    assert llm.engine.kv_leaked() == 0


def test_a_stuck_helper_is_given_up_and_the_engine_fills_its_rows(engines, monkeypatch):
    """A helper that stops reading and answering (here: SIGSTOP) is given up after the timeout: neither
    a send into its full socket nor the wait for its answer blocks the engine. It is killed, and the
    engine fills every mask itself from then on, with the same tokens."""
    monkeypatch.setattr(helpers_module, "RESULT_TIMEOUT_S", 1.0)
    llm = _engine(2)
    stuck = llm.engine.grammar.status().helper_pids[1]
    os.kill(stuck, signal.SIGSTOP)
    try:
        got = _run(llm)
    finally:
        if not _gone(stuck):
            os.kill(stuck, signal.SIGCONT)
    status = llm.engine.grammar.status()
    assert status.helpers == 0 and status.helpers_given_up == 1     # given up once, for good
    assert _gone(stuck)                                             # killed, not left behind
    assert got == _run(engines[False])
    assert llm.engine.kv_leaked() == 0


def test_helpers_that_also_answer_through_the_socket_give_the_same_tokens(engines, monkeypatch):
    """Where another process may see stores out of order (ARM), a helper also sends a message once its
    rows and answer slot are written, and the engine waits for that: the same tokens as the engine's
    own fills."""
    monkeypatch.setenv("RLSERVE_GRAMMAR_HELPER_NOTIFY", "1")        # read by the helper processes
    monkeypatch.setattr(helpers_module, "STORES_IN_ORDER", False)
    llm = _engine(2)
    before = llm.engine.grammar.status().helper_requests
    assert _run(llm) == _run(engines[False])
    status = llm.engine.grammar.status()
    assert status.helper_requests - before > 10 and status.helpers == 2 and status.helpers_given_up == 0
    assert all(fill > 0 for _, fill in status.helper_busy_s)


@pytest.mark.timeout(600)
def test_a_matcher_that_disagrees_with_its_helper_copy_aborts_only_its_request(engines):
    """Catching up (here: its helpers stopped mid-run), the engine's matcher rejects a token its helper
    copy took (a stop token in the middle of the JSON): that request ends "abort" and is returned;
    the others finish as usual."""
    llm = _engine(2)
    grammar, eos = llm.engine.grammar, sorted(llm.engine.eos_ids)
    pid, step, steps, broken = grammar.status().helper_pids[0], llm.engine.step, [0], []

    def step_and_break_one(*args, **kwargs):
        steps[0] += 1
        if not broken and steps[0] >= 8:
            lagging = grammar.status().lagging
            if lagging:
                # The fault, injected where no API reaches: a stop token among the tokens its matcher lags by.
                row = next(row for req, row in grammar._rows.items() if req.rid == lagging[0])
                row.lag.append(eos[0])
                broken.append(lagging[0])
                _kill(pid)
        return step(*args, **kwargs)

    llm.engine.step = step_and_break_one
    prompts, params = _batch(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert broken, "no matcher lagged behind its helper copy"
    by_id = {o.request_id: o.outputs[0] for o in outs}
    assert by_id[broken[0]].finish_reason == "abort"
    assert sum(o.outputs[0].finish_reason == "abort" for o in outs) == 1
    assert not llm.engine.has_unfinished() and llm.engine.kv_leaked() == 0


def test_a_mask_allows_a_stop_token_only_where_taking_it_completes_the_grammar(engines, backend):
    """The engine ends a helper-filled row at a sampled stop token without asking its own (lagging)
    matcher: that relies on the mask letting stop tokens through only where the grammar can end."""
    outs = [o for o in _run(engines[False])[:len(NAMES) * 2] if o[1] == "stop"]
    assert outs
    checked = 0
    for (ids, _, _), name in zip(outs[:4], NAMES):
        compiled = backend.compile(GrammarSpec.from_params(SamplingParams(json_schema=SCHEMAS[name])))
        for i in range(len(ids)):
            walker = backend.xgr.GrammarMatcher(compiled)
            if not all(walker.accept_token(t) for t in ids[:i]):
                break               # (a run for another schema; its prefix left this grammar)
            mask = backend.device_masks([walker], torch.device("cpu"))[0]
            for stop in sorted(backend.stop_ids):
                allowed = bool((int(mask[stop // 32]) >> (stop % 32)) & 1)
                probe = backend.xgr.GrammarMatcher(compiled)
                assert all(probe.accept_token(t) for t in ids[:i])
                assert probe.accept_token(stop) == allowed
                assert probe.is_terminated() == allowed
                checked += allowed
    assert checked >= 1
