"""Grammar masks from the helper process: the same masks, the same tokens, and a clean fallback.

CPU tests; on a CUDA machine (`pytest tests/structured/test_grammar_worker.py`) they also cover the
path where the device waits for the helpers' answers before its mask copy and sampling."""
from __future__ import annotations

import json
import logging
import re
import time

import jsonschema
import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.engine.grammar import GrammarSpec
from structured_schemas import REGEXES, SCHEMAS

NAMES = list(SCHEMAS)[:6]
REGEX = REGEXES[2]      # two capitalised words: a few tokens of free text


def _engine(helpers: int) -> LLM:
    # Overlapped steps are where the helpers work. Several engines live at once: a small share each of
    # a GPU's memory (a CPU ignores it).
    llm = LLM(overlap_schedule=True, gpu_memory_fraction=0.1)
    llm.engine.grammar_helpers = helpers
    llm.engine._compile_grammar(SamplingParams(json_object=True))      # creates the grammar backend
    worker = llm.engine._grammar.helpers
    assert (worker is not None) == (helpers > 0)
    deadline = time.monotonic() + 120
    while helpers and not worker.ready():          # until they have started the engine fills masks itself
        assert time.monotonic() < deadline, "the mask helper did not start"
        time.sleep(0.05)
    return llm


@pytest.fixture(scope="module")
def engines(default_model_dir) -> dict[bool, LLM]:
    return {helper: _engine(2 if helper else 0) for helper in (True, False)}


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


def test_helper_masks_give_the_same_tokens_as_masks_filled_in_the_engine(engines, monkeypatch):
    with_helper, without = engines[True], engines[False]
    worker = with_helper.engine._grammar.helpers
    before, busy_before = worker.requests, worker.busy()
    backend, queued = with_helper.engine._grammar, []
    queue = backend.masks_on_device_when_answered
    monkeypatch.setattr(backend, "masks_on_device_when_answered",
                        lambda *a: queued.append(queue(*a)) or queued[-1])
    got, want = _run(with_helper), _run(without)
    assert worker.requests - before > 10, "the helper filled no masks"
    # On CUDA the sampling is queued behind the device's wait for the helpers' answers.
    assert sum(q is not None for q in queued) > (10 if torch.cuda.is_available() else -1)
    # Each helper reports the time it spent advancing its matchers and filling its rows.
    assert all(a1 > a0 and f1 > f0 for (a0, f0), (a1, f1) in zip(busy_before, worker.busy()))
    assert with_helper.engine._grammar.helpers is worker            # and never failed
    assert got == want
    for (ids, reason, text), name in zip(got, NAMES * 2):
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMAS[name])
    for ids, reason, text in got[len(NAMES) * 2:len(NAMES) * 2 + 4]:
        if reason == "stop":
            assert re.fullmatch(REGEX, text), text
    assert sum(reason == "stop" for _, reason, _ in got[:len(NAMES) * 2]) >= len(NAMES)
    assert with_helper.engine.kv_leaked() == 0


def test_helper_mask_equals_the_engines_fill_token_by_token(engines):
    backend = engines[True].engine._grammar
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
    llm.engine._grammar.helpers._helpers[0].proc.kill()
    with caplog.at_level(logging.WARNING, logger="rlserve"):
        got = _run(llm)
    assert got == want
    assert llm.engine._grammar.helpers is None
    assert any("mask helper stopped" in r.message for r in caplog.records)
    assert llm.engine.kv_leaked() == 0


def test_helper_share_sets_how_many_matchers_the_helper_owns(engines):
    backend = engines[True].engine._grammar
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
    helpers, step, steps, lagging = llm.engine._grammar.helpers, llm.engine.step, [0], []

    def step_then_kill(*args, **kwargs):
        steps[0] += 1
        if steps[0] == 12:
            lagging.extend(r for r in llm.engine.scheduler.running if r.grammar_lag)
            helpers._helpers[1].proc.kill()      # one of two
            helpers._helpers[1].proc.wait()
        return step(*args, **kwargs)

    llm.engine.step = step_then_kill
    with caplog.at_level(logging.WARNING, logger="rlserve"):
        got = _run(llm)
    assert lagging, "no matcher was behind its helper copy when the helper died"
    assert got == want
    assert llm.engine._grammar.helpers is None
    assert any("mask helper stopped" in r.message for r in caplog.records)
    assert llm.engine.kv_leaked() == 0


def test_a_stuck_helper_is_given_up_and_the_engine_fills_its_rows(engines, monkeypatch):
    """A helper that stops reading and answering (here: SIGSTOP) is given up after the timeout: neither
    a send into its full socket nor the wait for its answer blocks the engine. It is killed, and the
    engine fills every mask itself from then on, with the same tokens."""
    import os
    import signal
    import rlserve.engine.grammar_worker as grammar_worker
    monkeypatch.setattr(grammar_worker, "RESULT_TIMEOUT_S", 1.0)
    llm = _engine(2)
    stuck = llm.engine._grammar.helpers._helpers[1].proc
    os.kill(stuck.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        got = _run(llm)
        took = time.monotonic() - start
    finally:
        if stuck.poll() is None:
            os.kill(stuck.pid, signal.SIGCONT)
    assert llm.engine._grammar.helpers is None
    assert stuck.poll() is not None                  # killed, not left behind
    assert took < 30
    assert got == _run(engines[False])


def test_helpers_that_also_answer_through_the_socket_give_the_same_tokens(engines, monkeypatch):
    """Where another process may see stores out of order (ARM), a helper also sends a message once its
    rows and answer slot are written, and the engine waits for that: the same tokens as the engine's
    own fills."""
    import rlserve.engine.grammar_worker as grammar_worker
    monkeypatch.setenv("RLSERVE_GRAMMAR_HELPER_NOTIFY", "1")        # read by the helper processes
    monkeypatch.setattr(grammar_worker, "STORES_IN_ORDER", False)
    llm = _engine(2)
    worker = llm.engine._grammar.helpers
    before = worker.requests
    assert _run(llm) == _run(engines[False])
    assert worker.requests - before > 10 and llm.engine._grammar.helpers is worker
    assert all(fill > 0 for _, fill in worker.busy())


@pytest.mark.timeout(600)
def test_a_matcher_that_disagrees_with_its_helper_copy_aborts_only_its_request(engines):
    """Catching up (here: its helpers stopped mid-run), the engine's matcher rejects a token its helper
    copy took (a stop token in the middle of the JSON): that request ends "abort" and is returned;
    the others finish as usual."""
    llm = _engine(2)
    eos = llm.engine._grammar.stop_ids
    helpers, step, steps, broken = llm.engine._grammar.helpers, llm.engine.step, [0], []

    def step_and_break_one(*args, **kwargs):
        steps[0] += 1
        if not broken and steps[0] >= 8:
            lagging = [r for r in llm.engine.scheduler.running if r.grammar_lag and not r.finished]
            if lagging:
                lagging[0].grammar_lag.append(min(eos))
                broken.append(lagging[0].group)
                helpers._helpers[0].proc.kill()
                helpers._helpers[0].proc.wait()
        return step(*args, **kwargs)

    llm.engine.step = step_and_break_one
    prompts, params = _batch(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert broken, "no matcher lagged behind its helper copy"
    by_id = {o.request_id: o.outputs[0] for o in outs}
    assert by_id[broken[0]].finish_reason == "abort"
    assert sum(o.outputs[0].finish_reason == "abort" for o in outs) == 1
    assert not llm.engine.has_unfinished() and llm.engine.kv_leaked() == 0


def test_a_mask_allows_a_stop_token_only_where_taking_it_completes_the_grammar(engines):
    """The engine ends a helper-filled row at a sampled stop token without asking its own (lagging)
    matcher: that relies on the mask letting stop tokens through only where the grammar can end."""
    backend = engines[True].engine._grammar
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
