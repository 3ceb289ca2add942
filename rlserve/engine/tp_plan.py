"""Rank 0's side of a tensor-parallel engine: starting the worker ranks, and telling them each step.

Rank 0 runs the whole engine (scheduler, KV bookkeeping, sampling); ranks 1.. hold their pieces of the
model and of the KV pool and run only forwards (engine/tp_worker.py). Before each forward, rank 0
broadcasts its plan: a small header (pickled) and the batch's tensors. The workers keep a copy of the
request-to-token table, which the plan keeps current: a prefill step sends each request's row up to its
new length (a prefix-cache hit or a retraction may have rewritten it), a decode step the one new slot
per request, which the workers write as rank 0 does. Weight updates send each full tensor once; every
rank keeps its piece. Releasing and resuming memory (engine/lifecycle.py) reach every rank the same way.
"""
from __future__ import annotations

import atexit
import logging
import pickle
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rlserve.config import EngineConfig, ModelConfig
from rlserve.distributed.group import TPGroup, destroy_tensor_parallel, device_for_rank, init_tensor_parallel
from rlserve.layers.attention.base import ForwardBatch
from rlserve.layers.parallel import Shard, even_shard, head_shard
from rlserve.net import free_port

log = logging.getLogger("rlserve")

FORWARD, WEIGHTS, READ, MEMORY, RESIDENT, STOP = "forward", "weights", "read", "memory", "resident", "stop"


def broadcast_header(tp: TPGroup, header: dict[str, Any] | None = None) -> dict[str, Any]:
    """Rank 0's header, on every rank."""
    box = [header]
    dist.broadcast_object_list(box, src=0, group=tp.plans)
    assert box[0] is not None
    return box[0]


def tensor_specs(tensors: Sequence[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def broadcast_tensors(tp: TPGroup, tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        dist.broadcast(t.contiguous(), src=0, group=tp.plans)


def receive_tensors(tp: TPGroup, specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
                    device: torch.device) -> list[torch.Tensor]:
    out = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    for t in out:
        dist.broadcast(t, src=0, group=tp.plans)
    return out


def batch_tensors(fb: ForwardBatch, rows: list[int]) -> list[torch.Tensor]:
    """What a worker needs of a batch: its flat tensors, the table entries (a prefill's rows up to
    each request's new length), and the shared prefixes of a cascade step."""
    tensors = [fb.input_ids, fb.positions, fb.out_cache_loc, fb.req_rows, fb.seq_lens, fb.extend_lens,
               fb.logits_indices]
    if not fb.is_decode:
        table = fb.req_to_token
        tensors.append(torch.cat([table[r, :n] for r, n in zip(rows, fb.seq_lens_cpu)]))
    sp = fb.shared_prefixes
    if sp is not None:
        tensors += [sp.members, sp.lengths, sp.rows, sp.starts]
    return tensors


def check_tensor_parallel(config: EngineConfig, cfg: ModelConfig) -> None:
    """Raise ValueError, before any process starts, for what cannot run split over the ranks asked for."""
    size = config.tensor_parallel_size
    if cfg.head is not None:
        raise ValueError("pooling models do not run under tensor parallelism; use tensor_parallel_size=1")
    if config.quantization is not None:
        raise ValueError("quantization does not run under tensor parallelism yet; use tensor_parallel_size=1")
    if config.device.startswith("cuda") and torch.cuda.device_count() < size + (torch.device(config.device).index or 0):
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs from {config.device} on; "
                         f"{torch.cuda.device_count()} visible")
    tp = TPGroup(0, size)
    head_shard(tp, cfg.num_heads, cfg.head_dim, 0, "query heads")
    head_shard(tp, cfg.num_kv_heads, cfg.head_dim, 0, "key/value heads")
    even_shard(tp, cfg.intermediate_size, 0, "intermediate size")


def gather_pieces(piece: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's piece of one parameter (rank order)."""
    pieces = [torch.empty_like(piece) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, piece.contiguous())
    return pieces


class Workers:
    """The worker ranks of rank 0's engine, as subprocesses; close() (also at exit) stops them."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        size, port = config.tensor_parallel_size, free_port()
        payload = pickle.dumps(config)
        self.procs = []
        for rank in range(1, size):
            proc = subprocess.Popen([sys.executable, "-m", "rlserve.engine.tp_worker", str(rank), str(size), str(port)],
                                    stdin=subprocess.PIPE)
            assert proc.stdin is not None
            proc.stdin.write(payload)
            proc.stdin.close()
            self.procs.append(proc)
        self.device = device_for_rank(device, 0)
        self.tp: TPGroup = init_tensor_parallel(0, size, port, self.device)
        self.closed = False
        atexit.register(self.close)

    def send_forward(self, fb: ForwardBatch, rows: list[int], spans: list[tuple[int, int]], sample: bool) -> None:
        """Before rank 0's own forward: the batch, and which logits it computes (the lm_head's gather is a
        collective, so every rank computes the same ones)."""
        tensors = batch_tensors(fb, rows)
        sp = fb.shared_prefixes
        broadcast_header(self.tp, {"op": FORWARD, "is_decode": fb.is_decode, "seq_lens": fb.seq_lens_cpu,
                          "extend_lens": fb.extend_lens_cpu, "rows": rows, "spans": spans, "sample": sample,
                          "shared": None if sp is None else (sp.num_groups, sp.max_members),
                          "specs": tensor_specs(tensors)})
        broadcast_tensors(self.tp, tensors)

    def send_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        """Full tensors (already checked by rank 0) to every worker, one at a time."""
        broadcast_header(self.tp, {"op": WEIGHTS, "names": [n for n, _ in pairs],
                                   "specs": tensor_specs([t for _, t in pairs])})
        for _, tensor in pairs:                  # one full tensor on the device at a time
            broadcast_tensors(self.tp, [tensor.to(self.device)])

    def read_weight(self, name: str, piece: torch.Tensor, shard: Shard) -> torch.Tensor:
        """The full tensor `name`, assembled from every rank's piece (this rank's is `piece`)."""
        broadcast_header(self.tp, {"op": READ, "name": name})
        pieces = gather_pieces(piece)
        size = self.tp.size
        # A piece replicated over several ranks (K/V heads) is taken from the first of them.
        by_index: dict[int, torch.Tensor] = {}
        for r, p in enumerate(pieces):
            by_index.setdefault(r if shard.count == size else r // (size // shard.count), p)
        return torch.cat([by_index[i] for i in range(shard.count)], shard.dim).narrow(shard.dim, 0, shard.full)

    def send_memory(self, action: str, tags: set[str]) -> None:
        """Release or resume ("release" / "resume") the memory `tags` on every worker, as rank 0 did."""
        broadcast_header(self.tp, {"op": MEMORY, "action": action, "tags": sorted(tags)})

    def resident_bytes(self) -> list[dict[str, int]]:
        """What each worker rank (1, 2, ...) holds on its device now: bytes of weights and of KV cache."""
        broadcast_header(self.tp, {"op": RESIDENT})
        held: list[dict[str, int] | None] = [None] * self.tp.size
        dist.all_gather_object(held, None, group=self.tp.plans)
        return [h for h in held[1:] if h is not None]

    def close(self) -> None:
        """Stop the workers and leave the group (another tensor-parallel engine may start after)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        try:
            broadcast_header(self.tp, {"op": STOP})
        except RuntimeError as e:                # a worker already gone
            log.warning("tensor-parallel workers did not take the stop: %s", e)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        destroy_tensor_parallel()
