"""The sharded trainer's ranks as plain processes on this machine (cluster.backend: local).

Under torchrun (RANK and WORLD_SIZE set) this process is one rank and runs the loop as such. Otherwise
the calling process becomes rank 0 (it keeps the reward function, prompts and held-out samples it was
given, which need not be picklable) and ranks 1 … N−1 are spawned with torch.multiprocessing; with CUDA
devices rank r uses device r. Gloo on CPU, NCCL on CUDA (trainer.backend).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlserve.net import free_port
from rlserve.rl.config import TrainConfig

# A rank that died mid-collective closes its gloo sockets and fails the others at once; this bounds the
# wait on a rank that hangs instead.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def _backend(cfg: TrainConfig) -> str:
    if cfg.trainer.backend != "auto":
        return cfg.trainer.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_rank(cfg: TrainConfig, rank: int, world: int, address: str, port: int) -> None:
    """Join the trainer's default process group as `rank`."""
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if torch.cuda.is_available():
        os.environ.setdefault("LOCAL_RANK", str(rank % torch.cuda.device_count()))
    dist.init_process_group(_backend(cfg), rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)


def _rank_main(rank: int, cfg: TrainConfig, world: int, port: int) -> None:
    from rlserve.rl.fsdp_loop import train_sharded
    init_rank(cfg, rank, world, "127.0.0.1", port)
    try:
        train_sharded(cfg)
        dist.barrier()            # rank 0 tears down (and ends the store it hosts) only after this
    finally:
        dist.destroy_process_group()


def train_local(cfg: TrainConfig, reward_fn: Any = None, prompts: Any = None, held_out: Any = None
                ) -> list[dict[str, Any]]:
    from rlserve.rl.fsdp_loop import check_sharded_config, train_sharded

    check_sharded_config(cfg)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # torchrun started this rank
        return train_sharded(cfg, reward_fn, prompts, held_out)
    world = cfg.trainer.ranks
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, cfg, world, port), name=f"rlserve-trainer-rank{r}")
             for r in range(1, world)]
    for p in procs:
        p.start()
    try:
        init_rank(cfg, 0, world, "127.0.0.1", port)
        try:
            history = train_sharded(cfg, reward_fn, prompts, held_out)
            # Every rank done, then the others gone, before this rank ends the process group, which hosts
            # the store: a rank once aborted in its own teardown ("terminate called without an active
            # exception", exit -6) when rank 0 had torn down first.
            dist.barrier()
            for p in procs:
                p.join()
        finally:
            dist.destroy_process_group()
        failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"trainer ranks failed: {failed}")
        return history
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(10)
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            os.environ.pop(key, None)
