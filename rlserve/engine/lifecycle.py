"""What happens to an engine between generations: memory release and resume, warm-up (weight updates:
weights.py).

Each operation needs an idle engine (no request unfinished; an overlapped step still in flight is read
first; weight updates also take a paused one) and says what it leaves behind. They reach the engine only through `LifecycleHost`, the part of
Engine they use; none of them runs inside the step loop.

Colocated RL: between rollouts the trainer takes back the memory the engine holds. On CUDA with
torch-memory-saver installed (memory_saver.py) the weights and the KV pool live in regions whose physical
pages are unmapped on release and mapped again, at the same addresses, on resume (the weights from a host
backup): tensors and captured CUDA graphs stay valid, nothing is captured again. Otherwise the engine
does it its own way: releasing the KV cache frees the pool's storage; releasing the weights moves each
parameter's data to pinned host memory (param.data swap, so modules, parameters and optimizer state
keep their identity). Both change device addresses, and captured CUDA graphs bake addresses in: release
drops the graphs (their private memory pool goes too) and resume captures them again once KV and
weights are both back.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol

import torch

from rlserve.config import EngineConfig, ModelConfig
from rlserve.engine.memory_saver import MemorySaver
from rlserve.engine.pause import settle
from rlserve.engine.runner import ModelRunner
from rlserve.engine.status import EngineStatus
from rlserve.engine.stops import Group
from rlserve.kv_pool import KVPool
from rlserve.models.llama import LlamaForCausalLM
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams

if TYPE_CHECKING:
    from rlserve.engine.tp_plan import Workers

MEMORY_TAGS = ("kv_cache", "weights")
Weights = torch.nn.Module | Iterable[tuple[str, torch.Tensor]]


@dataclass
class ReleasedRunner:
    """Stands in for the engine's runner while memory is released (no forward can reach freed buffers
    or stale CUDA graphs) and keeps what resume_memory needs."""
    runner: ModelRunner                     # the real runner, set aside
    tags: set[str]
    graph_max_bs: int | None                # CUDA graphs to capture again on resume (None: there were none)
    host_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    graphs = None                           # reads like a runner without CUDA graphs

    def error(self) -> RuntimeError:
        return RuntimeError(f"the engine's memory is released ({', '.join(sorted(self.tags))}); "
                            f"call resume_memory() before generating")

    def forward(self, *args: object, **kwargs: object) -> NoReturn:
        raise self.error()


class LifecycleHost(Protocol):
    """The part of Engine the lifecycle operations use."""
    config: EngineConfig
    device: torch.device
    model: LlamaForCausalLM
    model_config: ModelConfig
    max_model_len: int
    kv_pool: KVPool
    pad_row: int
    runner: ModelRunner | ReleasedRunner
    weight_version: str
    groups: dict[str, Group]
    pause_mode: str | None
    pending_outputs: dict[str, RequestOutput]
    memory_saver: MemorySaver

    @property
    def in_flight(self) -> bool: ...
    def has_unfinished(self) -> bool: ...
    def step(self) -> list[RequestOutput]: ...
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, rid: str | None = None,
                    prompt: str | None = None) -> str: ...
    def flush_cache(self) -> bool: ...
    def status(self) -> EngineStatus: ...


def require_idle(engine: LifecycleHost, operation: str, paused_ok: bool = False) -> None:
    """Raise unless no request is unfinished (or, with paused_ok, generation is paused); then read an
    overlapped step left in flight, so that nothing runs on the device. Outputs that reading produces
    wait for the next step() (aborted requests' final outputs do not count as unfinished here)."""
    if engine.groups and not (paused_ok and engine.pause_mode is not None):
        raise RuntimeError(f"{operation} needs an idle engine: finish or abort running requests first"
                           + (" (or pause generation)" if paused_ok else ""))
    settle(engine)


def tp_workers(engine: LifecycleHost) -> Workers | None:
    """The worker ranks of a tensor-parallel engine (None at one rank)."""
    runner = engine.runner
    return (runner.runner if isinstance(runner, ReleasedRunner) else runner).tp_workers


def released(engine: LifecycleHost) -> set[str]:
    """The memory tags released now (empty while the engine can generate)."""
    return set(engine.runner.tags) if isinstance(engine.runner, ReleasedRunner) else set()


def check_resident(engine: LifecycleHost) -> None:
    if isinstance(engine.runner, ReleasedRunner):
        raise engine.runner.error()


def memory_tags(tags: str | Iterable[str]) -> set[str]:
    wanted = {tags} if isinstance(tags, str) else set(tags)
    unknown = wanted - set(MEMORY_TAGS)
    if unknown or not wanted:
        raise ValueError(f"memory tags must be among {', '.join(MEMORY_TAGS)}; got {sorted(wanted)}")
    return wanted


def release_memory(engine: LifecycleHost, tags: str | Iterable[str] = MEMORY_TAGS) -> None:
    """Free the KV pool ("kv_cache") and/or move the weights to host memory ("weights").

    Needs: an idle engine. Releasing a tag twice is a no-op.
    Leaves, with the memory saver: the tags' pages unmapped (the weights backed up on the host), every
    address and CUDA graph kept. Without it: CUDA graphs dropped; for "kv_cache" the pool's storage freed;
    for "weights" each parameter empty (its data in pinned host memory; the stacked projections dropped).
    Either way "kv_cache" empties the prefix cache. Under tensor parallelism every worker rank releases
    the same tags its own way (it holds no CUDA graphs).
    Generating raises until resume_memory brings every tag back."""
    wanted = memory_tags(tags)
    require_idle(engine, "release_memory")
    saver = engine.memory_saver
    if not isinstance(engine.runner, ReleasedRunner):
        runner = engine.runner
        graphs = runner.graphs
        if not saver.enabled:             # graphs read the buffers about to move: capture them again later
            runner.graphs = None
        max_bs = None if saver.enabled or graphs is None else graphs.max_bs
        engine.runner = ReleasedRunner(runner, set(), max_bs)
    state = engine.runner
    if "kv_cache" in wanted - state.tags:
        if not engine.flush_cache():
            raise RuntimeError("the prefix cache is still in use; cannot release the KV cache")
        if saver.enabled:
            saver.pause("kv_cache")
        else:
            engine.kv_pool.set_resident(False)
        state.tags.add("kv_cache")
    if "weights" in wanted - state.tags:
        if saver.enabled:
            saver.pause("weights")        # backed up on the host by the library
        else:
            state.host_weights = weights_to_host(engine.model)
        state.tags.add("weights")
    if not saver.enabled:
        free_device_caches(engine.device)
    workers = tp_workers(engine)
    if workers is not None:               # rank 0 has released: nothing above can fail any more
        workers.send_memory("release", wanted)


def weights_to_host(model: LlamaForCausalLM) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """Move each parameter's data to (pinned) host memory and leave the parameter empty; returns what
    weights_from_host puts back."""
    host = [(p, _to_host(p.data)) for p in model.parameters()]
    model.unstack_projections()           # the stacked q/k/v and gate/up tensors own their storage
    for p in model.parameters():          # tied weights are one parameter, listed once
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    return host


def weights_from_host(model: LlamaForCausalLM, host: list[tuple[torch.nn.Parameter, torch.Tensor]],
                      device: torch.device) -> None:
    """The same Parameter objects get their old values back, stacked again."""
    for p, data in host:
        p.data = data.to(device, non_blocking=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)    # the pinned copies must land before they're freed
    model.stack_projections()             # the copies above gave each weight its own storage


def free_device_caches(device: torch.device) -> None:
    if device.type == "cuda":
        # cuBLAS keeps a workspace per stream it ran on, and each capture runs on a new side stream:
        # without clearing, every release/resume cycle would strand one workspace (32 MiB on H100).
        torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()          # hand the freed blocks back for other processes as well


def resume_memory(engine: LifecycleHost, tags: str | Iterable[str] = MEMORY_TAGS) -> None:
    """Bring released memory back. Resuming what isn't released is a no-op.

    Leaves: for "weights" the same Parameter objects holding their old values (stacked again); for
    "kv_cache" a pool of the same shapes, zeroed, and an empty prefix cache. Once nothing is released,
    the real runner is back (its CUDA graphs kept by the memory saver, else captured again) and
    generation works as before. Under tensor parallelism every worker rank resumes the same tags."""
    wanted = memory_tags(tags)
    state = engine.runner
    if not isinstance(state, ReleasedRunner):
        return
    workers = tp_workers(engine)
    if workers is not None:
        workers.send_memory("resume", wanted)
    saver = engine.memory_saver
    if "weights" in wanted & state.tags:
        if saver.enabled:
            saver.resume("weights")                 # the same addresses, the old values
        else:
            weights_from_host(engine.model, state.host_weights, engine.device)
            state.host_weights = []
        state.tags.discard("weights")
    if "kv_cache" in wanted & state.tags:
        if saver.enabled:
            saver.resume("kv_cache")
            engine.kv_pool.zero_()                  # fresh pages: zeroed, as a pool allocated anew
        else:
            engine.kv_pool.set_resident(True)
        state.tags.discard("kv_cache")
    if not state.tags:
        engine.runner = state.runner
        if state.graph_max_bs is not None:
            state.runner.capture_cuda_graphs(engine.pad_row, state.graph_max_bs)


def _to_host(data: torch.Tensor) -> torch.Tensor:
    if data.device.type == "cpu":
        return data                       # a CPU engine's weights are host memory already
    host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
    host.copy_(data)
    return host


def warm_up(engine: LifecycleHost, chunk: int) -> None:
    """Run one prefill of each power-of-two size up to the prefill chunk (one of them after a cached
    prefix), greedy and sampled, each with a decode step, then read any step left in flight and drop the
    prefix cache. The engine then resets its loop state (Engine.warm_up), so nothing of this is seen.

    Needs: an idle engine with its memory resident. chunk: the scheduler's prefill budget a step.

    CUDA loads a kernel the first time a process runs it, and cuBLAS picks a different GEMM kernel for
    each range of token counts; CUDA graph capture covers only the decode batches. Without this, the
    offline benchmark's first run was 1-2 s slower than the next: the prefill kernels are paid for at start.
    """
    require_idle(engine, "warm_up")
    check_resident(engine)
    rng = random.Random(engine.config.seed)
    vocab = min(engine.model_config.vocab_size, 10_000)
    longest = min(chunk, engine.max_model_len - 2, engine.status().kv_free // 2)
    sizes = [n for n in (1 << i for i in range(4, 20)) if n <= longest][::-1]
    first: list[int] = []
    for i, n in enumerate(sizes):
        prompt = [rng.randrange(vocab) for _ in range(n)]
        if i == 1 and engine.config.cache.enable_radix_cache:   # an extend over a cached prefix
            prompt = first[:n // 2] + prompt[n // 2:]
        first = first or prompt
        engine.add_request(prompt, SamplingParams(max_tokens=2, ignore_eos=True, temperature=i % 2 * 0.7),
                           rid=f"warm-up-{i}")
        while engine.has_unfinished():
            engine.step()
    require_idle(engine, "warm_up")
    engine.flush_cache()
