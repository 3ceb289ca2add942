"""CUDA IPC weight handles across two processes: a held mapping is reused and still sees the producer's
latest writes (the receiver waits on the producer's event itself when torch does not)."""
from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu


def _consumer(inbox: Any, outbox: Any, keep_s: float) -> None:
    from torch.multiprocessing.reductions import shared_cache

    from rlserve.weight_sync.tensors import IpcMappingCache, deserialize_tensors

    cache = IpcMappingCache(keep_s=keep_s)
    while (data := inbox.get()) is not None:
        before = len(shared_cache)
        pairs = deserialize_tensors(data)
        opened = len(shared_cache) - before
        values = [t.float().sum().item() for _, t in pairs]
        torch.cuda.synchronize()
        cache.hold(pairs)
        outbox.put((values, opened, cache.held))


@pytest.mark.parametrize("keep_s", [60.0, 0.0])
def test_held_mappings_are_reused_and_see_new_writes(keep_s: float) -> None:
    from rlserve.client import _serialize

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_consumer, args=(inbox, outbox, keep_s), daemon=True)
    proc.start()
    try:
        weights = [(f"w{i}", torch.full((1024, 257), float(i), device="cuda", dtype=torch.bfloat16))
                   for i in range(6)]
        seen = []
        for push in range(3):
            for _, t in weights:
                # A big kernel queue right before sharing: the consumer must wait for it.
                for _ in range(20):
                    t.add_(1.0)
            inbox.put(_serialize(weights, None))
            values, opened, held = outbox.get(timeout=120)
            expected = [t.float().sum().item() for _, t in weights]
            assert values == expected, f"push {push}: the consumer read stale values"
            seen.append((opened, held))
        if keep_s > 0:
            assert seen[0][1] == len(weights)
            assert all(opened == 0 for opened, _ in seen[1:]), seen     # no handle opened again
        else:
            assert all(held == 0 for _, held in seen)
    finally:
        inbox.put(None)
        proc.join(60)
