"""Device memory handed back and taken again at the same virtual addresses, through torch-memory-saver.

torch-memory-saver allocates tensors created inside a `region(tag)` through its own CUDA allocator
(CUDA's virtual memory API: a reserved address range, physical pages mapped into it). Pausing a tag
unmaps and frees the physical pages, so another process can allocate them, while the addresses stay
reserved; resuming maps fresh pages at the same addresses (and, for a region with a host backup, copies
the saved contents back). Tensors, the kernels' pointers and captured CUDA graphs all stay valid, so
the engine keeps its graphs across a release instead of capturing them again.

The engine puts its weights (with a host backup: resuming without an update brings the old weights
back) and its KV pool in regions of their own, tagged per engine so that two engines in one process
never pause each other's memory. Without the library (a CPU engine, a CPU-only install, or
`memory_saver=off`) `lifecycle.py` releases memory its own way.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from rlserve.config import Switch

_ENGINE_IDS = itertools.count()
# Tags of engines that are gone. The library keeps one memory pool per tag for the life of the process,
# with the blocks a dead engine freed still cached in it: a new engine takes a freed tag first, so that
# engines built one after another (tests, a trainer rebuilding its engine) reuse those blocks.
_FREE_IDS: list[int] = []


def _library(mode: Switch, device: torch.device) -> Any | None:
    """The library's process-wide saver, or None where the engine releases memory its own way."""
    if mode is Switch.OFF or device.type != "cuda":
        if mode is Switch.ON and device.type != "cuda":
            raise ValueError("memory_saver=on needs a CUDA device")
        return None
    try:
        from torch_memory_saver import torch_memory_saver
    except ImportError:
        if mode is Switch.ON:
            raise ValueError("memory_saver=on needs the torch-memory-saver package "
                             "(pip install 'rlserve[gpu]')") from None
        return None
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        # The library refuses to work beside expandable segments.
        if mode is Switch.ON:
            raise ValueError("memory_saver=on cannot work with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        return None
    if getattr(torch_memory_saver, "_impl", None) is None:
        # "torch" mode plugs the library's allocator into torch's memory pools inside this process; the
        # default ("preload") mode needs the library preloaded (LD_PRELOAD) before the process starts.
        torch_memory_saver.hook_mode = "torch"
    return torch_memory_saver


def _retire(lib: Any, paused: set[str], number: int) -> None:
    """An engine is gone: map its paused regions again (the blocks cached in their pools must be backed
    by memory before anyone reuses them), then free its tag."""
    for tag in list(paused):
        lib.resume(tag)
    _FREE_IDS.append(number)


class MemorySaver:
    """The engine's regions: `weights` (with a host backup) and `kv_cache`."""

    def __init__(self, mode: Switch, device: torch.device) -> None:
        self._lib = _library(mode, device)
        number = _FREE_IDS.pop() if _FREE_IDS else next(_ENGINE_IDS)
        self._prefix = f"rlserve-engine-{number}"
        self._paused: set[str] = set()
        weakref.finalize(self, _retire, self._lib, self._paused, number)

    @property
    def enabled(self) -> bool:
        return self._lib is not None

    def _tag(self, tag: str) -> str:
        return f"{self._prefix}-{tag}"

    @contextlib.contextmanager
    def region(self, tag: str) -> Iterator[None]:
        """Tensors created inside belong to `tag` (no-op when disabled)."""
        if self._lib is None:
            yield
            return
        with self._lib.region(tag=self._tag(tag), enable_cpu_backup=tag == "weights"):
            yield

    def pause(self, tag: str) -> None:
        assert self._lib is not None
        torch.cuda.synchronize()          # nothing may still read the pages about to go
        self._lib.pause(self._tag(tag))
        self._paused.add(self._tag(tag))

    def resume(self, tag: str) -> None:
        assert self._lib is not None
        self._lib.resume(self._tag(tag))
        self._paused.discard(self._tag(tag))
        torch.cuda.synchronize()


def move_weights_into(saver: MemorySaver, model: torch.nn.Module) -> None:
    """Stack the model's projections and give every parameter and buffer its storage inside the saver's
    `weights` region (a no-op move when disabled: the model is only stacked).

    The order avoids dead copies inside the region (its pool would keep their pages, and back them up on
    every pause): the stacked tensors are created there first, their layers' weights become views of
    them, and only then is each remaining tensor copied in once."""
    stack = getattr(model, "stack_projections", None)
    with saver.region("weights"), torch.no_grad():
        if stack is not None:
            stack()
        if not saver.enabled:
            return
        moved: set[int] = set()
        for module in model.modules():
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                # Views (the stacked layers' weights) already live in the region; a tied weight is one
                # tensor met twice.
                if tensor.device.type != "cuda" or tensor.data._base is not None or id(tensor) in moved:
                    continue
                tensor.data = tensor.data.clone()
                moved.add(id(tensor))
    torch.cuda.empty_cache()                  # the copies left behind go back to the device

