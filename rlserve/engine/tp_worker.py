"""A worker rank of a tensor-parallel engine (ranks 1..N-1; rank 0 runs the engine: engine/tp_plan.py).

`python -m rlserve.engine.tp_worker RANK SIZE PORT` with the pickled EngineConfig on stdin. It builds its
piece of the model and of the KV pool exactly as rank 0 builds its own, then runs rank 0's plans until
told to stop: each forward with the batch rank 0 scheduled (the same collectives in the same order),
each weight update from the full tensors rank 0 sends.
"""
from __future__ import annotations

import os
import pickle
import sys
import threading
import time

import torch

from rlserve.config import EngineConfig, Switch
from rlserve.distributed.group import TPGroup, destroy_tensor_parallel, device_for_rank, init_tensor_parallel
from rlserve.engine.build import RankParts, build_rank, pick_device
from rlserve.engine.memory_saver import MemorySaver
from rlserve.engine.tp_plan import FORWARD, READ, STOP, WEIGHTS, broadcast_header, gather_pieces, receive_tensors
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
        while True:
            plan = broadcast_header(tp)
            if plan["op"] == FORWARD:
                run_forward(rank, tp, plan, device)
            elif plan["op"] == WEIGHTS:
                run_weight_update(rank, tp, plan, device)
            elif plan["op"] == READ:
                gather_pieces(dict(rank.model.named_parameters(remove_duplicate=False))[plan["name"]].detach())
            elif plan["op"] == STOP:
                return
            else:
                raise RuntimeError(f"unknown plan {plan['op']!r}")
    finally:
        destroy_tensor_parallel()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), pickle.loads(sys.stdin.buffer.read()))
