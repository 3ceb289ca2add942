"""pause_generation / continue_generation under several running requests: each mode does what it says to
the requests there, new requests wait while paused, the tokens after continue are those of an
uninterrupted run, and no KV leaks."""
from __future__ import annotations

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.outputs import RequestOutput

PROMPTS = [[5, 17, 300, 42, 9000, 11], [7, 7, 7, 1200], [100 + i for i in range(30)], [3, 1, 4, 1, 5, 9, 2, 6],
           [11, 12, 13], [900, 800, 700, 600, 500]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_p=0.95, seed=100 + i, max_tokens=12, ignore_eos=True)


def make(tiny_model_dir, overlap: bool) -> LLM:
    # Four rows for six prompts: some requests run while others wait.
    return LLM(str(tiny_model_dir("tiny-llama")), max_total_tokens=1024, max_running_requests=4,
               overlap_schedule=overlap)


def params_for(i: int, sampling: str) -> SamplingParams:
    return GREEDY if sampling == "greedy" else seeded(i)


def add_all(llm: LLM, sampling: str, prefix: str = "r") -> None:
    for i, p in enumerate(PROMPTS):
        llm.engine.add_request(p, params_for(i, sampling), rid=f"{prefix}{i}")


def collect(outs: list[RequestOutput], done: dict[str, RequestOutput]) -> None:
    for o in outs:
        if o.finished:
            assert o.request_id not in done, "a request finished twice"
            done[o.request_id] = o


def run_to_end(llm: LLM, done: dict[str, RequestOutput]) -> None:
    while llm.engine.has_unfinished() or llm.engine.in_flight:
        collect(llm.engine.step(), done)


def reference(tiny_model_dir, sampling: str) -> dict[str, list[int]]:
    llm = make(tiny_model_dir, overlap=False)
    add_all(llm, sampling)
    done: dict[str, RequestOutput] = {}
    run_to_end(llm, done)
    return {rid: o.outputs[0].token_ids for rid, o in done.items()}


def steps(llm: LLM, n: int, done: dict[str, RequestOutput]) -> None:
    for _ in range(n):
        collect(llm.engine.step(), done)


def assert_no_leak(llm: LLM) -> None:
    status = llm.engine.status()
    assert status.kv_leaked == 0
    assert status.kv_free + status.kv_evictable == status.kv_total   # no request holds KV
    assert llm.engine.flush_cache() and llm.engine.status().kv_free == status.kv_total


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_ends_every_request_and_frees_their_kv(tiny_model_dir, overlap):
    llm = make(tiny_model_dir, overlap)
    engine = llm.engine
    add_all(llm, "greedy")
    done: dict[str, RequestOutput] = {}
    steps(llm, 4, done)
    running = engine.status().running
    assert running == 4 and engine.status().waiting == 2
    unfinished = len(PROMPTS) - len(done)
    assert engine.pause_generation("abort") == unfinished
    assert engine.paused and engine.status().paused == "abort" and not engine.in_flight
    assert engine.has_unfinished()                   # the aborted requests' final outputs are still to come
    collect(engine.step(), done)                     # emitted by the next step, although paused
    assert sorted(done) == sorted(f"r{i}" for i in range(len(PROMPTS)))
    aborted = [o for o in done.values() if o.outputs[0].finish_reason == "abort"]
    assert len(aborted) == unfinished
    assert any(o.outputs[0].token_ids for o in aborted)   # running ones had tokens, which they keep
    assert not engine.has_unfinished() and engine.step() == []
    status = engine.status()
    assert (status.running, status.waiting) == (0, 0)
    assert_no_leak(llm)
    engine.continue_generation()
    assert not engine.paused and engine.status().paused is None


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("overlap", [False, True])
def test_retract_and_continue_give_the_uninterrupted_tokens(tiny_model_dir, overlap, sampling):
    want = reference(tiny_model_dir, sampling)
    llm = make(tiny_model_dir, overlap)
    engine = llm.engine
    add_all(llm, sampling)
    done: dict[str, RequestOutput] = {}
    steps(llm, 5, done)
    before = engine.status()
    assert before.running > 0
    assert engine.pause_generation("retract") == before.running
    status = engine.status()
    assert (status.running, status.waiting) == (0, len(PROMPTS) - len(done)) and not status.in_flight
    assert status.retractions == before.retractions   # not a memory-pressure retraction
    assert_no_leak(llm)                                # retracted requests hold no KV while paused
    steps(llm, 3, done)                                # paused: nothing runs
    assert engine.status().waiting == len(PROMPTS) - len(done) and engine.status().running == 0
    engine.continue_generation()
    run_to_end(llm, done)
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == want
    assert all(o.outputs[0].finish_reason == "length" for o in done.values())
    assert_no_leak(llm)


@pytest.mark.parametrize("overlap", [False, True])
def test_in_place_keeps_everything_and_continues_with_the_same_tokens(tiny_model_dir, overlap):
    want = reference(tiny_model_dir, "greedy")
    llm = make(tiny_model_dir, overlap)
    engine = llm.engine
    add_all(llm, "greedy")
    done: dict[str, RequestOutput] = {}
    steps(llm, 4, done)
    assert engine.pause_generation("in_place") == 4
    held = engine.status()
    assert held.running == 4 and not held.in_flight
    lengths = {rid: [len(r.output_ids) for r in g.reqs] for rid, g in engine.groups.items()}
    for _ in range(3):
        collect(engine.step(), done)
    assert {rid: [len(r.output_ids) for r in g.reqs] for rid, g in engine.groups.items()} == lengths
    after = engine.status()
    assert (after.running, after.waiting, after.kv_free) == (held.running, held.waiting, held.kv_free)
    engine.continue_generation()
    run_to_end(llm, done)
    assert {rid: o.outputs[0].token_ids for rid, o in done.items()} == want
    assert_no_leak(llm)


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
def test_new_requests_wait_while_paused_then_run(tiny_model_dir, mode):
    want = reference(tiny_model_dir, "greedy")
    llm = make(tiny_model_dir, overlap=True)
    engine = llm.engine
    for i in range(3):
        engine.add_request(PROMPTS[i], GREEDY, rid=f"r{i}")
    done: dict[str, RequestOutput] = {}
    steps(llm, 2, done)
    engine.pause_generation(mode)
    for i in range(3, len(PROMPTS)):
        engine.add_request(PROMPTS[i], GREEDY, rid=f"r{i}")
    steps(llm, 4, done)
    assert not any(f"r{i}" in done for i in range(3, len(PROMPTS)))
    assert engine.status().waiting >= len(PROMPTS) - 3
    engine.continue_generation()
    run_to_end(llm, done)
    assert sorted(done) == sorted(want)
    for rid, o in done.items():
        if mode != "abort" or int(rid[1:]) >= 3:
            assert o.outputs[0].token_ids == want[rid], rid
        else:
            assert o.outputs[0].finish_reason in ("abort", "length")
    assert_no_leak(llm)


def test_pause_validates_its_mode_and_continue_is_idempotent(tiny_model_dir):
    llm = make(tiny_model_dir, overlap=False)
    with pytest.raises(ValueError, match="pause mode"):
        llm.engine.pause_generation("later")
    assert not llm.engine.paused
    llm.engine.continue_generation()                 # not paused: a no-op
    assert llm.engine.pause_generation("in_place") == 0
    assert llm.engine.pause_generation("abort") == 0  # pausing again applies the new mode
    assert llm.engine.status().paused == "abort"
    llm.engine.continue_generation()
    assert len(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)) == 2


def test_retract_then_update_then_continue_recomputes_with_the_new_weights(tiny_model_dir):
    """The RL cycle: pause (retract), push weights, continue. The retracted requests' KV is dropped with
    the prefix cache and recomputed; the update leaves no KV computed with the old weights behind."""
    llm = make(tiny_model_dir, overlap=True)
    engine = llm.engine
    add_all(llm, "greedy")
    done: dict[str, RequestOutput] = {}
    steps(llm, 4, done)
    engine.pause_generation("retract")
    new = [(n, p.detach() * 1.01) for n, p in engine.model.named_parameters()]
    assert engine.update_weights(new, weight_version="v2") == len(new)
    status = engine.status()
    assert status.kv_cached == 0 and status.kv_free == status.kv_total and status.weight_version == "v2"
    engine.continue_generation()
    run_to_end(llm, done)
    assert len(done) == len(PROMPTS) and all(len(o.outputs[0].token_ids) == 12 for o in done.values())
    assert_no_leak(llm)
    assert all(torch.equal(p, t) for (_, p), (_, t) in zip(engine.model.named_parameters(), new))
