"""The weight-update group between real processes over gloo: trainer (rank 0) and engine (rank 1)."""
from __future__ import annotations

import multiprocessing as mp
import pickle
from typing import Any

import pytest
import torch
import torch.distributed as dist
from weight_sync_workers import dying_sender, make_pairs, receiver, stalling_sender

from rlserve.net import free_port
from rlserve.weight_sync import (
    WeightSender,
    WeightSyncError,
    destroy_weights_update_group,
    init_weights_update_group,
    receive_weights,
)

CTX = mp.get_context("spawn")


def _assert_arrived(received: list[tuple[str, torch.Tensor]], sent: list[tuple[str, torch.Tensor]]) -> None:
    assert [n for n, _ in received] == [n for n, _ in sent]
    for (_, got), (_, want) in zip(received, sent):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_per_tensor_and_flattened_buckets_arrive_exactly() -> None:
    port = free_port()
    sender = WeightSender("127.0.0.1", port, 2, "test_group", "gloo", timeout_s=60)
    first, second = make_pairs(0), make_pairs(1)
    announcements = [
        sender.describe(first, load_format=None),
        sender.describe(second, bucket_bytes=100),  # several buckets, cut where both sides agree
        sender.describe(first, bucket_bytes=None),  # one bucket for the call, as SGLang sends it
    ]
    results = CTX.Queue()
    proc = CTX.Process(target=receiver, args=(port, announcements, 60.0, results))
    proc.start()
    try:
        sender.init_group()
        assert sender.broadcast(first, load_format=None) == announcements[0]
        assert sender.broadcast(second, bucket_bytes=100) == announcements[1]
        assert sender.broadcast(first, bucket_bytes=None) == announcements[2]
        status, received, child_initialised = results.get(timeout=120)
    finally:
        sender.close()
        proc.join(timeout=60)
    assert status == "ok", received
    received = pickle.loads(received)
    assert announcements[1]["load_format"] == "flattened_bucket" and announcements[1]["dtypes"][1] == "bfloat16"
    _assert_arrived(received[0], first)
    _assert_arrived(received[1], second)
    _assert_arrived(received[2], first)
    assert not child_initialised and not dist.is_initialized()


def _receive_from(target: Any, args: tuple[Any, ...], timeout_s: float) -> None:
    port = args[0]
    proc = CTX.Process(target=target, args=args)
    proc.start()
    try:
        group = init_weights_update_group("127.0.0.1", port, 1, 2, "test_group", "gloo", timeout_s=timeout_s)
        try:
            pairs = make_pairs(0)
            with pytest.raises(WeightSyncError):
                receive_weights(
                    group, [n for n, _ in pairs], [str(t.dtype) for _, t in pairs],
                    [list(t.shape) for _, t in pairs], None, "cpu",
                )
            # A failed group refuses further use rather than reading garbage.
            with pytest.raises(WeightSyncError):
                receive_weights(group, ["x"], ["float32"], [[1]], None, "cpu")
        finally:
            destroy_weights_update_group("test_group")
    finally:
        if len(args) > 2:
            args[2].set()
        proc.join(timeout=60)
    assert not dist.is_initialized()


def test_a_sender_that_dies_mid_update_makes_the_receiver_raise() -> None:
    _receive_from(dying_sender, (free_port(), 5.0), timeout_s=5.0)


def test_a_sender_that_stalls_makes_the_receiver_raise_after_the_timeout() -> None:
    _receive_from(stalling_sender, (free_port(), 30.0, CTX.Event()), timeout_s=2.0)


def test_group_registry_and_bad_requests() -> None:
    with pytest.raises(ValueError):
        destroy_weights_update_group("never_created")
    with pytest.raises(ValueError):
        init_weights_update_group("127.0.0.1", free_port(), 0, 2, "g", "gloo")  # rank 0 is the trainer's
    with pytest.raises(ValueError):
        init_weights_update_group("127.0.0.1", free_port(), 1, 2, "g", "mpi")
    sender = WeightSender("127.0.0.1", free_port(), 2, backend="gloo")
    with pytest.raises(ValueError):
        sender.describe(make_pairs(0), load_format="direct")
    with pytest.raises(ValueError):
        sender.broadcast(make_pairs(0))  # no group yet


def test_bad_announcements_fail_before_any_collective() -> None:
    # pg=None: touching the network would raise AttributeError, not the ValueError asserted here.
    from datetime import timedelta

    from rlserve.weight_sync import WeightUpdateGroup

    group = WeightUpdateGroup("g", 1, 2, "gloo", timedelta(seconds=1), None, None)
    for names, dtypes, shapes, fmt in [
        (["a"], ["float32", "int64"], [[1]], None),
        (["a"], ["float33"], [[1]], None),
        (["a"], ["float32"], [[2, -1]], "flattened_bucket"),
        (["a"], ["float32"], [[1]], "direct"),
    ]:
        with pytest.raises(ValueError):
            receive_weights(group, names, dtypes, shapes, fmt, "cpu")
