"""CUDA IPC weight handles across two processes: each push reads the producer's latest writes, even with
a queue of kernels still writing when the handles are made (the receiver waits on the producer's event)."""
from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu


def _consumer(inbox: Any, outbox: Any) -> None:
    from rlserve.weight_sync.tensors import deserialize_tensors

    while (data := inbox.get()) is not None:
        pairs = deserialize_tensors(data)
        outbox.put([t.float().sum().item() for _, t in pairs])
        del pairs


def test_every_push_reads_the_producers_latest_writes() -> None:
    from rlserve.client import _serialize

    ctx = mp.get_context("spawn")
    inbox, outbox = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_consumer, args=(inbox, outbox), daemon=True)
    proc.start()
    try:
        weights = [(f"w{i}", torch.full((1024, 257), float(i), device="cuda", dtype=torch.bfloat16))
                   for i in range(6)]
        for push in range(3):
            for _, t in weights:
                # A big kernel queue right before sharing: the consumer must wait for it.
                for _ in range(20):
                    t.add_(1.0)
            inbox.put(_serialize(weights, None))
            values = outbox.get(timeout=120)
            expected = [t.float().sum().item() for _, t in weights]
            assert values == expected, f"push {push}: the consumer read stale values"
    finally:
        inbox.put(None)
        proc.join(60)
