"""Ray placement (cluster.backend: ray): the trainer's ranks and the rollout servers as Ray actors in one
placement group, on a local Ray cluster or an existing one (cluster.address, as ray.init takes it).

- colocated: one bundle per trainer rank; engine i shares bundle i with rank i (half its CPUs and GPUs
  each). The servers release their memory after every rollout and take it back around each weight push
  (rollout.server_offload, the servers' release/resume_memory_occupation routes), so trainer and engine
  share the device. One engine sits beside rank 0 and takes the configured weight sync (tensor: shared
  memory or CUDA IPC on that host); more engines receive weights through a gloo weight-update group
  (NCCL cannot put two ranks on one GPU).
- disaggregated: trainer bundles and engine bundles apart; weights through the distributed update path
  (a weight-update group, NCCL on CUDA by rollout.weight_sync_backend=auto, gloo on CPU).

An engine actor runs `python -m rlserve.server` on its node's address (the process rlserve serve runs)
and the trainer ranks reach it over HTTP, exactly as server mode reaches any server; rank 0 drives the
rollout and the pushes (rlserve/rl/fsdp_loop.py). The output directory must be one path every node
sees (the sharded checkpoints are written by every rank). Ray is imported only in this module.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlserve.config import EngineConfig
from rlserve.rl.config import RolloutSection, TrainConfig

log = logging.getLogger("rlserve")
READY_TIMEOUT_S = 600.0


@dataclass
class Layout:
    """The placement group's bundles and which bundle each actor takes, with its share of the bundle."""
    bundles: list[dict[str, float]]
    trainer_bundles: list[int]
    engine_bundles: list[int]
    trainer_share: list[float]           # of its bundle's CPUs and GPUs
    engine_share: list[float]

    @classmethod
    def plan(cls, ranks: int, engines: int, placement: str, cpus: float, gpus: float) -> Layout:
        bundle = {"CPU": cpus} | ({"GPU": gpus} if gpus > 0 else {})
        if placement == "colocated":
            if engines > ranks:
                raise ValueError(f"cluster.placement=colocated puts one engine beside a trainer rank: "
                                 f"cluster.engines ({engines}) must be ≤ trainer.ranks ({ranks})")
            return cls([dict(bundle) for _ in range(ranks)], list(range(ranks)), list(range(engines)),
                       [0.5 if r < engines else 1.0 for r in range(ranks)], [0.5] * engines)
        return cls([dict(bundle) for _ in range(ranks + engines)], list(range(ranks)),
                   list(range(ranks, ranks + engines)), [1.0] * ranks, [1.0] * engines)


def run_rollout(cfg: TrainConfig, urls: list[str]) -> RolloutSection:
    """The rollout section the trainer runs with: the placed servers' URLs, and what the layout needs."""
    r = dataclasses.replace(cfg.rollout, server_urls=urls, router_url="", dp=1)
    if cfg.cluster.placement == "colocated":
        r.server_offload = True
        if len(urls) > 1:
            r.weight_sync, r.weight_sync_backend = "distributed", "gloo"
    else:
        r.weight_sync = "distributed"
    return r


class EngineServer:
    """A Ray actor holding one rollout server process (and its engine process) on its node."""

    def __init__(self, engine: EngineConfig, log_path: str, admin_api_key: str) -> None:
        import ray

        from rlserve.config_args import engine_flags
        from rlserve.net import free_port
        from rlserve.router.procs import ManagedProcess

        host = ray.util.get_node_ip_address()
        port = free_port(host)
        self.url = f"http://{host}:{port}"
        cmd = [sys.executable, "-m", "rlserve.server", "--host", host, "--port", str(port), "--log-level", "warning",
               *engine_flags(engine)]
        # Off loopback a server refuses its admin routes (weights, memory, pause) without a key.
        env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"),
               "RLSERVE_ADMIN_API_KEY": admin_api_key}
        self.process = ManagedProcess("a rollout server", cmd, Path(log_path), env).start()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        from rlserve.client import Client
        from rlserve.rl.remote import wait_healthy

        with Client(self.url) as client:
            wait_healthy(self.process, client, timeout)
        return self.url

    def stop(self) -> None:
        self.process.stop(60.0)


class TrainerRank:
    """A Ray actor running one rank of the sharded training loop."""

    def address(self) -> tuple[str, int]:
        """Where rank 0 hosts the trainer's process-group store."""
        import ray

        from rlserve.net import free_port
        host = ray.util.get_node_ip_address()
        return host, free_port(host)

    def run(self, cfg: TrainConfig, rank: int, world: int, address: str, port: int, rollout: RolloutSection,
            admin_api_key: str, reward_fn: Any = None, prompts: Any = None, held_out: Any = None) -> list[dict[str, Any]]:
        import torch.distributed as dist

        from rlserve.rl.cluster.local import init_rank
        from rlserve.rl.fsdp_loop import train_sharded
        os.environ["RLSERVE_ADMIN_API_KEY"] = admin_api_key     # RemoteRollout reads it there
        if callable(prompts):        # a stream holding a live generator does not pickle; its factory does
            prompts = prompts()
        init_rank(cfg, rank, world, address, port)
        try:
            return train_sharded(cfg, reward_fn, prompts, held_out, rollout=rollout)
        finally:
            dist.destroy_process_group()


class RayPlacement:
    """`with RayPlacement(cfg) as placement: placement.train(...)`: the placement group and the engine
    actors live for the block (placement.urls are the servers'); train() places the trainer ranks."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.pg: Any = None
        self.engines: list[Any] = []
        self.urls: list[str] = []
        self.started_ray = False
        # The servers' admin key: the environment's, else one made for this run.
        self.admin_api_key = os.environ.get("RLSERVE_ADMIN_API_KEY") or secrets.token_urlsafe(24)

    def __enter__(self) -> RayPlacement:
        import ray
        from ray.util.placement_group import placement_group

        c = self.cfg.cluster
        if not ray.is_initialized():
            if c.address:
                ray.init(address=c.address, logging_level=logging.WARNING)
            else:
                ray.init(num_cpus=c.num_cpus or None, include_dashboard=False, logging_level=logging.WARNING)
            self.started_ray = True
        try:
            gpus = c.gpus_per_bundle if c.gpus_per_bundle >= 0 else \
                (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
            self.gpus = gpus
            self.layout = Layout.plan(self.cfg.trainer.ranks, c.engines, c.placement, c.cpus_per_bundle, gpus)
            self.pg = placement_group(self.layout.bundles, strategy="PACK")
            ray.get(self.pg.ready(), timeout=READY_TIMEOUT_S)
            out = Path(self.cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            engine = self.cfg.model.engine.with_options(seed=self.cfg.seed)
            if gpus > 0 and engine.device == "auto":
                engine = engine.with_options(device="cuda")      # the actor's one visible GPU
            actor: Any = ray.remote(EngineServer)   # Ray's handle types do not follow .options(...).remote
            self.engines = [actor.options(**self._resources(b, share)).remote(engine, str(out / f"engine-{i}.log"),
                                                                              self.admin_api_key)
                            for i, (b, share) in enumerate(zip(self.layout.engine_bundles, self.layout.engine_share))]
            self.urls = ray.get([e.wait_ready.remote() for e in self.engines])
        except BaseException:
            self.__exit__()
            raise
        return self

    def _resources(self, bundle: int, share: float) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": self.cfg.cluster.cpus_per_bundle * share, "num_gpus": self.gpus * share,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundle)}

    def train(self, reward_fn: Any = None, prompts: Any = None, held_out: Any = None) -> list[dict[str, Any]]:
        """Place the trainer ranks, run the loop on them against the placed servers; rank 0's history.
        The arguments travel to rank 0's actor: `prompts` may be a callable that builds the stream there."""
        import ray

        ranks = self.cfg.trainer.ranks
        actor: Any = ray.remote(TrainerRank)
        trainers = [actor.options(**self._resources(b, share)).remote()
                    for b, share in zip(self.layout.trainer_bundles, self.layout.trainer_share)]
        try:
            address, port = ray.get(trainers[0].address.remote())
            rollout = run_rollout(self.cfg, self.urls)
            runs = [t.run.remote(self.cfg, r, ranks, address, port, rollout, self.admin_api_key,
                                 *((reward_fn, prompts, held_out) if r == 0 else ()))
                    for r, t in enumerate(trainers)]
            return list(ray.get(runs)[0])
        finally:
            for t in trainers:
                ray.kill(t)

    def __exit__(self, *exc: Any) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            for e in self.engines:
                try:
                    ray.get(e.stop.remote(), timeout=120)
                except Exception as err:         # best effort: the block's own error matters more
                    log.warning("could not stop a rollout server actor: %s", err)
                ray.kill(e)
            if self.pg is not None:
                remove_placement_group(self.pg)
        finally:
            self.engines, self.pg = [], None
            if self.started_ray:
                ray.shutdown()
                self.started_ray = False


def train_ray(cfg: TrainConfig, reward_fn: Any = None, prompts: Any = None, held_out: Any = None
              ) -> list[dict[str, Any]]:
    from rlserve.rl.fsdp_loop import check_sharded_config
    check_sharded_config(cfg)
    with RayPlacement(cfg) as placement:
        return placement.train(reward_fn, prompts, held_out)
