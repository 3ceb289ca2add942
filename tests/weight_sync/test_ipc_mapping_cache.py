"""IpcMappingCache's bookkeeping (the CUDA side runs in tests/gpu/test_gpu_ipc.py)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from rlserve.weight_sync.tensors import IpcMappingCache


@dataclass
class FakeCuda:
    """Stands for a CUDA tensor: only what the cache reads of one."""
    storage: object
    is_cuda: bool = True

    def untyped_storage(self) -> object:
        return self.storage


def test_holds_only_the_last_updates_cuda_storages_and_expires_them() -> None:
    cache = IpcMappingCache(keep_s=10.0)
    cache.hold([("a", FakeCuda("s1")), ("b", FakeCuda("s2")), ("c", torch.zeros(2))])  # type: ignore[list-item]
    assert cache.held == 2                       # the CPU tensor is not held
    cache.hold([("a", FakeCuda("s3"))])          # type: ignore[list-item]
    assert cache.held == 1                       # the previous update's are let go
    cache.expire(now=cache._since + 5.0)
    assert cache.held == 1
    cache.expire(now=cache._since + 10.5)
    assert cache.held == 0
    cache.hold([("a", FakeCuda("s4"))])          # type: ignore[list-item]
    cache.drop()
    assert cache.held == 0


def test_zero_seconds_holds_nothing_and_the_setting_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLSERVE_IPC_KEEP_S", "0")
    cache = IpcMappingCache()
    cache.hold([("a", FakeCuda("s1"))])          # type: ignore[list-item]
    assert cache.keep_s == 0 and cache.held == 0
    monkeypatch.setenv("RLSERVE_IPC_KEEP_S", "soon")
    with pytest.raises(ValueError, match="RLSERVE_IPC_KEEP_S"):
        IpcMappingCache()
