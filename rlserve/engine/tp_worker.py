"""A worker rank of a tensor-parallel engine (ranks 1..N-1; rank 0 runs the engine: engine/tp_plan.py).

`python -m rlserve.engine.tp_worker RANK SIZE PORT` with the pickled EngineConfig on stdin. It builds its
piece of the model and of the KV pool exactly as rank 0 builds its own, then runs rank 0's plans until
told to stop: each forward with the batch rank 0 scheduled (the same collectives in the same order),
each weight update from the full tensors rank 0 sends, each release and resume of its memory.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rlserve.config import EngineConfig, Switch
from rlserve.distributed.group import TPGroup, destroy_tensor_parallel, device_for_rank, init_tensor_parallel
from rlserve.engine.build import RankParts, build_rank, pick_device
from rlserve.engine.lifecycle import free_device_caches, weights_from_host, weights_to_host
from rlserve.engine.memory_saver import MemorySaver
from rlserve.engine.tp_plan import (
    FORWARD,
    MEMORY,
    READ,
    RESIDENT,
    STOP,
    WEIGHTS,
    broadcast_header,
    gather_pieces,
    receive_tensors,
)
from rlserve.layers import parallel
from rlserve.layers.attention.base import ForwardBatch, SharedPrefixes


@torch.inference_mode()
def run_forward(rank: RankParts, tp: TPGroup, plan: dict, device: torch.device) -> None:
    ids, pos, loc, rows, seq, ext, logit_rows, *rest = receive_tensors(tp, plan["specs"], device)
    table = rank.table.table
    if plan["is_decode"]:
        table[rows, pos] = loc                    # decode writes at position == kv_len, as rank 0 did
    else:
        entries, *rest = rest
        at = 0
        for row, n in zip(plan["rows"], plan["seq_lens"]):
            table[row, :n] = entries[at:at + n]
            at += n
    shared = None
    if plan["shared"] is not None:
        members, lengths, group_rows, starts = rest
        shared = SharedPrefixes(members, lengths, group_rows, starts, *plan["shared"])
    fb = ForwardBatch(input_ids=ids, positions=pos, out_cache_loc=loc, req_rows=rows, seq_lens=seq,
                      extend_lens=ext, seq_lens_cpu=plan["seq_lens"], extend_lens_cpu=plan["extend_lens"],
                      is_decode=plan["is_decode"], logits_indices=logit_rows, req_to_token=table,
                      shared_prefixes=shared)
    model = rank.model
    model.attn_backend.prepare(fb)  # type: ignore[union-attr]  # build_rank attached it
    hidden = model(fb.input_ids, fb.positions, fb)
    # The logits rank 0 computes, in its order: each one gathers the vocabulary across the ranks.
    if plan["sample"]:
        model.compute_logits(hidden[fb.logits_indices], float32=False)
    for start, n in plan["spans"]:
        model.compute_logits(hidden[start:start + n])


@torch.no_grad()
def run_weight_update(rank: RankParts, tp: TPGroup, plan: dict, device: torch.device) -> None:
    params = dict(rank.model.named_parameters(remove_duplicate=False))
    shards = parallel.parameter_shards(rank.model)
    for name, spec in zip(plan["names"], plan["specs"]):
        (tensor,) = receive_tensors(tp, [spec], device)
        params[name].copy_(parallel.local_piece(shards, name, tensor))


@dataclass
class Released:
    """What this rank has released, and its weights' host copies while they are away."""
    tags: set[str] = field(default_factory=set)
    host_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)


def run_memory(rank: RankParts, plan: dict, released: Released, device: torch.device) -> None:
    """Release or resume the tags rank 0 did (lifecycle.py without a memory saver: no CUDA graphs run here,
    so addresses may change). Repeating either is a no-op, as on rank 0."""
    tags = set(plan["tags"])
    if plan["action"] == "release":
        if "kv_cache" in tags - released.tags:
            rank.kv_pool.set_resident(False)
        if "weights" in tags - released.tags:
            released.host_weights = weights_to_host(rank.model)
        released.tags |= tags
        free_device_caches(device)
        return
    if "weights" in tags & released.tags:
        weights_from_host(rank.model, released.host_weights, device)
        released.host_weights = []
    if "kv_cache" in tags & released.tags:
        rank.kv_pool.set_resident(True)             # zeroed, as rank 0's
    released.tags -= tags


def resident_bytes(rank: RankParts, tp: TPGroup) -> None:
    """This rank's share of Workers.resident_bytes."""
    pool = rank.kv_pool
    kv = [*pool.k_buffers, *pool.v_buffers, *(pool.k_scales or []), *(pool.v_scales or [])]
    held = {"weights": sum(p.numel() * p.element_size() for p in rank.model.parameters()),
            "kv_cache": sum(t.numel() * t.element_size() for t in kv)}
    dist.all_gather_object([None] * tp.size, held, group=tp.plans)


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process when rank 0's process is gone: a worker blocked in a collective (NCCL's especially)
    may never learn of it otherwise."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="tp-parent-watch").start()


def main(rank_index: int, size: int, port: int, config: EngineConfig) -> None:
    exit_with_parent()
    device = device_for_rank(pick_device(config.device), rank_index)
    tp = init_tensor_parallel(rank_index, size, port, device)
    try:
        rank = build_rank(config, device, MemorySaver(Switch.OFF, device), tp)
        released = Released()
        while True:
            plan = broadcast_header(tp)
            if plan["op"] == FORWARD:
                run_forward(rank, tp, plan, device)
            elif plan["op"] == WEIGHTS:
                run_weight_update(rank, tp, plan, device)
            elif plan["op"] == READ:
                gather_pieces(dict(rank.model.named_parameters(remove_duplicate=False))[plan["name"]].detach())
            elif plan["op"] == MEMORY:
                run_memory(rank, plan, released, device)
            elif plan["op"] == RESIDENT:
                resident_bytes(rank, tp)
            elif plan["op"] == STOP:
                return
            else:
                raise RuntimeError(f"unknown plan {plan['op']!r}")
    finally:
        destroy_tensor_parallel()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pickle.loads(sys.stdin.buffer.read()))
