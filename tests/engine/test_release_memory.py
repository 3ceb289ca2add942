"""release_memory / resume_memory for colocated training: the KV pool's storage and the weights go away
and come back, the engine refuses to generate in between, and greedy outputs after resume are the same."""
from __future__ import annotations

import gc
import subprocess
import sys

import pytest
import torch

from rlserve import LLM, SamplingParams

PROMPTS = [[5, 17, 300, 42, 9000, 11], [7, 7, 7, 1200], [100 + i for i in range(30)]]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def pool_numel(llm: LLM) -> int:
    pool = llm.engine.kv_pool
    return sum(b.numel() for b in pool.k_buffers + pool.v_buffers)


@pytest.fixture
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("tiny-qwen3")), max_total_tokens=512)   # tied embeddings


@pytest.mark.parametrize("tags", [("kv_cache", "weights"), ("kv_cache",), ("weights",)])
def test_release_resume_keeps_greedy_outputs(llm, tags):
    engine = llm.engine
    before = greedy(llm)
    full = pool_numel(llm)
    params = list(engine.model.parameters())
    shapes = [p.shape for p in params]
    values = [p.detach().clone() for p in params]
    assert engine.status().kv_cached > 0          # the first run left prefixes in the cache

    engine.release_memory(list(tags))
    assert engine.released_memory() == set(tags)
    if "kv_cache" in tags:
        assert pool_numel(llm) == 0
        assert engine.status().kv_cached == 0     # its KV is gone, so is the prefix cache
    else:
        assert pool_numel(llm) == full
    if "weights" in tags:
        assert all(p.numel() == 0 for p in engine.model.parameters())
        # tied: the head is still the embedding's parameter
        assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight

    with pytest.raises(RuntimeError, match="memory is released"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert not engine.has_unfinished() and engine.kv_leaked() == 0   # the failed call left nothing behind

    engine.resume_memory(list(tags))
    assert engine.released_memory() == set()
    assert pool_numel(llm) == full
    after = list(engine.model.parameters())
    assert all(a is b for a, b in zip(after, params))       # same Parameter objects (optimizer state holds them)
    assert [p.shape for p in after] == shapes
    assert all(torch.equal(p, v) for p, v in zip(after, values))
    assert greedy(llm) == before
    assert engine.kv_leaked() == 0


def test_release_in_steps_and_idempotent(llm):
    engine = llm.engine
    before = greedy(llm)
    engine.release_memory(["weights"])
    engine.release_memory(["weights"])            # twice: no-op
    engine.release_memory(["kv_cache"])
    assert engine.released_memory() == {"kv_cache", "weights"}
    engine.resume_memory(["kv_cache"])
    assert pool_numel(llm) > 0
    with pytest.raises(RuntimeError, match=r"released \(weights\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine.resume_memory()
    engine.resume_memory()                        # nothing released: no-op
    assert greedy(llm) == before


def test_release_needs_an_idle_engine(llm):
    engine = llm.engine
    rid = engine.add_request(PROMPTS[0], GREEDY)
    engine.step()
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.release_memory()
    assert engine.released_memory() == set() and pool_numel(llm) > 0
    engine.abort(rid)
    engine.release_memory()
    assert engine.released_memory() == {"kv_cache", "weights"}


def test_llm_passthrough(llm):
    before = greedy(llm)
    llm.release_memory()
    assert llm.engine.released_memory() == {"kv_cache", "weights"}
    llm.resume_memory()
    assert greedy(llm) == before


def test_unknown_tag(llm):
    with pytest.raises(ValueError, match="memory tags"):
        llm.engine.release_memory(["optimizer"])
    with pytest.raises(ValueError, match="memory tags"):
        llm.engine.resume_memory([])
    llm.engine.release_memory("kv_cache")         # a single tag as a string
    assert llm.engine.released_memory() == {"kv_cache"}


def test_overlap_schedule_release(tiny_model_dir):
    """With overlapped decode a launch can be pending after the last request finished; release drains it."""
    llm = LLM(str(tiny_model_dir("tiny-qwen3")), max_total_tokens=512, overlap_schedule=True)
    before = greedy(llm)
    llm.engine.release_memory()
    llm.engine.resume_memory()
    assert greedy(llm) == before


def allocate_in_another_process(nbytes: int) -> bool:
    """Whether a fresh process can hold `nbytes` of device memory at once."""
    code = f"import torch; x = torch.empty({nbytes}, dtype=torch.uint8, device='cuda'); x.fill_(1); print('held')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return done.returncode == 0 and "held" in done.stdout


def _has_memory_saver() -> bool:
    try:
        import torch_memory_saver  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("saver", ["off", "on"])
def test_gpu_release_returns_memory_and_graphs_still_match(saver):
    if saver == "on" and not _has_memory_saver():
        pytest.skip("torch-memory-saver is not installed")
    # Engines of earlier tests in this process may still sit in reference cycles; were the collector to
    # free them mid-test, their memory would count as freed here.
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM("qwen3-0.6b", dtype="bfloat16", attention_backend="triton", cuda_graph=True,
              max_total_tokens=200_000, cuda_graph_max_bs=32, memory_saver=saver)
    engine = llm.engine
    assert engine.memory_saver.enabled == (saver == "on")
    graphs = engine.runner.graphs
    assert graphs is not None
    before = greedy(llm)
    pool_bytes = sum(b.numel() * b.element_size() for b in engine.kv_pool.k_buffers + engine.kv_pool.v_buffers)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]

    # Released memory goes back to the device (what the driver reports free, whichever allocator holds it).
    engine.release_memory(["kv_cache"])
    freed_kv = torch.cuda.mem_get_info()[0] - free0
    assert pool_bytes <= freed_kv < pool_bytes * 1.1 + (256 << 20)   # the pool (and, saver off, the graphs' pool)
    engine.release_memory(["weights"])
    freed_all = torch.cuda.mem_get_info()[0] - free0
    assert freed_all - freed_kv >= weight_bytes * 0.98

    # Another process can take 90% of it on top of what was free before the release.
    free_now = torch.cuda.mem_get_info()[0]
    released = pool_bytes + weight_bytes
    assert allocate_in_another_process(free_now - released // 10)
    engine.resume_memory()
    assert engine.runner.graphs is not None
    if saver == "on":
        assert engine.runner.graphs is graphs     # the same graphs, valid at the same addresses
    # Resuming takes the memory back. The figure is device-wide, so other frees in this process during the
    # cycle (blocks the allocator cached) lower it; with the saver it read 99.0% of the bytes on an H100.
    assert free_now - torch.cuda.mem_get_info()[0] >= (pool_bytes + weight_bytes) * 0.98
    assert greedy(llm) == before
    assert engine.kv_leaked() == 0

    # Cycles (one per RL step) don't strand memory: what stays held while released is the same.
    floors = []
    for _ in range(3):
        engine.release_memory()
        floors.append(torch.cuda.mem_get_info()[0])
        engine.resume_memory()
        assert greedy(llm) == before
    assert max(floors) - min(floors) < (4 << 20)
    # A weight update after resume lands at the weights' addresses (the graphs read them there).
    name, p = next(iter(engine.model.named_parameters()))
    ptr = p.data_ptr()
    engine.update_weights([(name, p.detach().clone())])
    assert p.data_ptr() == ptr and greedy(llm) == before


def test_memory_saver_on_needs_cuda(tiny_model_dir):
    with pytest.raises(ValueError, match="memory_saver=on needs a CUDA device"):
        LLM(str(tiny_model_dir("tiny-qwen3")), device="cpu", memory_saver="on")
