"""Flattened buckets and same-host tensor handles (shared memory across a real process boundary)."""
from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist
from weight_sync_workers import make_pairs, shm_reader

from rlserve.weight_sync import (
    deserialize_named_tensors,
    flatten_bucket,
    plan_buckets,
    serialize_flattened_bucket,
    serialize_named_tensors,
    unflatten_bucket,
)
from rlserve.weight_sync.tensors import bucket_layout, parse_dtype


def _storage_range(t: torch.Tensor) -> tuple[int, int]:
    start = t.untyped_storage().data_ptr()
    return start, start + t.untyped_storage().nbytes()


@pytest.mark.parametrize("alignment", [1, 16])
def test_flatten_unflatten_round_trip_with_mixed_dtypes(alignment: int) -> None:
    pairs = make_pairs(0)
    buffer, meta = flatten_bucket(pairs, alignment=alignment)
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1
    assert [m.name for m in meta] == [n for n, _ in pairs]
    assert all(m.offset % alignment == 0 for m in meta)
    assert meta[-1].offset + meta[-1].nbytes == buffer.numel()
    out = unflatten_bucket(buffer, meta)
    for (name, t), (out_name, o) in zip(pairs, out):
        assert out_name == name and o.dtype == t.dtype and o.shape == t.shape and torch.equal(o, t)


def test_unflatten_gives_views_where_aligned() -> None:
    pairs = make_pairs(0)
    buffer, meta = flatten_bucket(pairs, alignment=16)
    lo, hi = _storage_range(buffer)
    for _, t in unflatten_bucket(buffer, meta):
        assert lo <= t.data_ptr() < hi
    # The plain concatenation puts down_proj (float32) at byte 86, after 3 bf16 values: that one
    # cannot be a float32 view and comes back as a copy with the right values.
    buffer, meta = flatten_bucket(pairs)
    down = meta[2]
    assert down.offset % 4 != 0
    out = dict(unflatten_bucket(buffer, meta))
    assert not (lo <= out[down.name].data_ptr() < hi)
    assert torch.equal(out[down.name], pairs[2][1])


def test_layout_is_derived_from_names_dtypes_shapes_alone() -> None:
    pairs = make_pairs(0)
    _, meta = flatten_bucket(pairs)
    layout, total = bucket_layout([n for n, _ in pairs], [str(t.dtype) for _, t in pairs], [list(t.shape) for _, t in pairs])
    assert layout == meta and total == sum(t.numel() * t.element_size() for _, t in pairs)


def test_bad_metadata_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_dtype("float33")
    with pytest.raises(ValueError):
        bucket_layout(["a"], ["float32", "float32"], [[1]])
    with pytest.raises(ValueError):
        bucket_layout(["a"], ["float32"], [[-1]])
    buffer, meta = flatten_bucket(make_pairs(0))
    with pytest.raises(ValueError):
        unflatten_bucket(buffer[:10], meta)


def test_plan_buckets_is_greedy_in_order() -> None:
    assert plan_buckets([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
    assert plan_buckets([4, 4, 4], None) == [[0, 1, 2]]
    assert plan_buckets([], 8) == []


def _read_in_child(data: str, load_format: str | None) -> tuple[bool, list[bool], bool]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=shm_reader, args=(data, load_format, results))
    proc.start()
    try:
        out = results.get(timeout=120)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0
    return out


def test_shared_memory_round_trip_across_processes_copies_nothing_through_the_string() -> None:
    big = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    pairs = make_pairs(1) + [("big", big)]
    data = serialize_named_tensors(pairs)
    assert isinstance(data, str) and len(data) < 16_384  # handles, not 4 MiB of data
    equal, shared, child_initialised = _read_in_child(data, None)
    assert equal and all(shared) and not child_initialised
    # The child wrote into its mapping: the producer's own tensor changed, so nothing was copied.
    assert big[:3].tolist() == [-7.0, -7.0, -7.0]
    assert not dist.is_initialized()


def test_flattened_bucket_round_trip_across_processes() -> None:
    pairs = make_pairs(1) + [("big", torch.arange(1 << 20, dtype=torch.float32))]
    data = serialize_flattened_bucket(pairs)
    assert len(data) < 16_384
    equal, shared, _ = _read_in_child(data, "flattened_bucket")
    # Tensors at aligned offsets are views of the shared bucket; the misaligned ones were copied.
    assert equal and shared[0]


def test_same_process_round_trip_shares_storage() -> None:
    t = torch.randn(4, 4)
    [(name, back)] = deserialize_named_tensors(serialize_named_tensors([("w", t)]))
    assert name == "w" and torch.equal(back, t) and back.data_ptr() == t.data_ptr()
