"""Engine.status() reports the engine's state as one typed value, and the lifecycle operations (weight
update, memory release, warm-up) refuse a busy engine with a clear error, leaving it as it was."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.engine.status import EngineStatus

PROMPTS = [[5, 17, 300, 42, 9000, 11], [7, 7, 7, 1200], [100 + i for i in range(30)], [3, 1, 4, 1, 5, 9, 2, 6]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("tiny-llama")), max_total_tokens=1024, max_running_requests=2)


def run_to_end(llm: LLM) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while llm.engine.has_unfinished() or llm.engine.in_flight:
        for o in llm.engine.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


def test_status_follows_requests_kv_and_counters(llm):
    engine = llm.engine
    idle = engine.status()
    assert isinstance(idle, EngineStatus)
    assert (idle.running, idle.waiting, idle.chunked, idle.retractions, idle.in_flight) == (0, 0, False, 0, False)
    assert idle.kv_total == 1024 and idle.kv_free == 1024 and idle.kv_cached == 0 and idle.kv_leaked == 0
    assert (idle.device, idle.dtype, idle.kv_dtype) == ("cpu", "float32", "float32")
    assert idle.max_model_len == engine.max_model_len and idle.released == () and idle.weight_version == "default"
    assert idle.counters == type(idle.counters)()      # nothing counted yet

    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, rid=f"r{i}")
    queued = engine.status()
    assert (queued.running, queued.waiting) == (0, len(PROMPTS))
    engine.step()                                      # one prefill step admits max_running_requests
    first = engine.status()
    assert (first.running, first.waiting) == (2, 2)
    assert first.counters.prefill_steps == 1 and first.counters.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    assert 0 < first.kv_free < first.kv_total and first.kv_leaked == 0
    assert first.kv_usage == pytest.approx(1 - first.kv_free / first.kv_total)

    outs = run_to_end(llm)
    done = engine.status()
    assert (done.running, done.waiting) == (0, 0) and len(outs) == len(PROMPTS)
    assert done.counters.prompt_tokens == sum(map(len, PROMPTS))
    assert done.counters.generation_tokens == GREEDY.max_tokens * len(PROMPTS)
    assert done.counters.decode_steps > 0 and done.kv_leaked == 0
    # Finished requests leave their KV in the prefix cache, which no running request holds.
    assert done.kv_cached > 0 and done.kv_evictable == done.kv_cached
    assert done.kv_free + done.kv_cached == done.kv_total
    assert engine.flush_cache() and engine.status().kv_free == done.kv_total


def test_status_is_a_snapshot(llm):
    status = llm.engine.status()
    with pytest.raises(dataclasses.FrozenInstanceError):
        status.running = 3                             # type: ignore[misc]
    status.counters.prompt_tokens += 100               # a copy: the engine's counters don't move
    assert llm.engine.status().counters.prompt_tokens == 0
    llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert status.counters.generation_tokens == 0 and llm.engine.status().counters.generation_tokens == 6


def test_weight_version_is_set_by_updates_that_name_one(llm):
    engine = llm.engine
    weights = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    assert engine.status().weight_version == "default"
    assert engine.update_weights(weights, weight_version="step-1") == len(weights)
    assert engine.status().weight_version == "step-1"
    engine.update_weights(weights)                     # no version given: the label stays
    assert engine.status().weight_version == "step-1"


def test_release_is_reported_by_status(llm):
    engine = llm.engine
    engine.release_memory(["kv_cache"])
    assert engine.status().released == ("kv_cache",)
    engine.release_memory(["weights"])
    assert engine.status().released == ("kv_cache", "weights")
    engine.resume_memory()
    assert engine.status().released == ()


@pytest.mark.parametrize("operation", ["update_weights", "release_memory", "warm_up"])
def test_lifecycle_refuses_a_busy_engine_and_leaves_it_healthy(tiny_model_dir, operation):
    model = str(tiny_model_dir("tiny-llama"))
    want = [o.outputs[0].token_ids for o in LLM(model).generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(model)
    engine = llm.engine
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, rid=str(i))
    engine.step()
    busy = engine.status()
    calls = {"update_weights": lambda: engine.update_weights([(n, t + 1) for n, t in before.items()], "new"),
             "release_memory": lambda: engine.release_memory(),
             "warm_up": lambda: engine.warm_up()}
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        calls[operation]()
    after = engine.status()
    assert (after.running, after.waiting, after.released, after.weight_version) == (
        busy.running, busy.waiting, (), "default")
    assert all(torch.equal(p, before[n]) for n, p in engine.model.named_parameters())
    outs = run_to_end(llm)
    assert [outs[str(i)] for i in range(len(PROMPTS))] == want
    assert engine.status().kv_leaked == 0


def test_update_weights_needs_the_weights_resident(llm):
    engine = llm.engine
    weights = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    engine.release_memory(["weights"])
    with pytest.raises(RuntimeError, match="weights resident"):
        engine.update_weights(weights, "v1")
    assert engine.status().weight_version == "default"
    engine.resume_memory(["weights"])
    engine.release_memory(["kv_cache"])                # released KV is fine: the update drops the cache anyway
    assert engine.update_weights(weights, "v1") == len(weights)
    engine.resume_memory()
    assert engine.status().weight_version == "v1"
    assert len(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == len(PROMPTS)


def test_lifecycle_reads_a_step_left_in_flight_first(tiny_model_dir):
    """With overlapped scheduling the last requests can finish while a launched step is still in flight;
    an update reads it first, so nothing runs on the device while the weights change."""
    llm = LLM(str(tiny_model_dir("tiny-llama")), overlap_schedule=True)
    engine = llm.engine
    in_flight = False
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, rid=str(i))
    while engine.has_unfinished():
        engine.step()
        in_flight = in_flight or engine.status().in_flight
    assert in_flight                                   # overlap really ran
    weights = [(n, p.detach().clone()) for n, p in engine.model.named_parameters()]
    engine.update_weights(weights, "v2")
    status = engine.status()
    assert not status.in_flight and status.kv_leaked == 0 and status.kv_cached == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_a_dropped_engine_is_freed_at_once_without_the_cyclic_collector(tiny_model_dir, overlap):
    # Its device memory (weights, KV pool) must go back when the last reference goes, not whenever the
    # cyclic collector next runs: a process that builds engines one after another would run out of it.
    # Overlapped steps and a constrained request cover the executor and the grammar package.
    import gc
    import weakref

    llm = LLM(str(tiny_model_dir("tiny-llama")), max_total_tokens=256, overlap_schedule=overlap)
    outs = llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=4, temperature=0.0),
                                              SamplingParams(max_tokens=4, regex="[ab]+")], use_tqdm=False)
    assert all(o.finished for o in outs)
    engine, pool, model = weakref.ref(llm.engine), weakref.ref(llm.engine.kv_pool), weakref.ref(llm.engine.model)
    gc.collect()
    gc.disable()
    try:
        del llm, outs
        assert engine() is None and pool() is None and model() is None
    finally:
        gc.enable()
