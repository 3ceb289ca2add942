"""The `trainer:` and `cluster:` sections of a training config (docs/cluster.md).

trainer: how many processes train the policy and how FSDP2 shards it over them.
cluster: where the trainer ranks and the rollout servers run: plain processes on this machine (local),
or Ray actors in a placement group (ray), colocated on the same bundles or disaggregated.
"""
from __future__ import annotations

from dataclasses import dataclass

CLUSTER_BACKENDS = ("local", "ray")
PLACEMENTS = ("colocated", "disaggregated")
PROCESS_GROUP_BACKENDS = ("auto", "gloo", "nccl")
PARAM_DTYPES = ("bfloat16", "float16", "float32")
MATMUL_PRECISIONS = ("highest", "high", "medium")     # torch.set_float32_matmul_precision's


@dataclass
class TrainerSection:
    # Trainer processes; > 1 (or fsdp: true) trains with the policy sharded by FSDP2 over them, rank 0
    # driving the rollout (server mode) and pushing the gathered weights.
    ranks: int = 1
    fsdp: bool = False
    mixed_precision: bool = False        # compute in param_dtype over float32 shards, reduce in float32
    param_dtype: str = "bfloat16"
    cpu_offload: bool = False            # shards, gradients and optimizer state in host memory
    backend: str = "auto"                # the ranks' process group: auto (nccl on CUDA, else gloo) | gloo | nccl
    # float32 matmuls of each trainer process (torch.set_float32_matmul_precision): highest keeps them
    # exact; high lets CUDA use TF32 tensor cores, several times faster for a float32 policy, at about
    # 1e-3 relative error per product. Process-wide: a colocated engine's float32 matmuls too; a rollout
    # server in its own process keeps its own.
    float32_matmul_precision: str = "highest"

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"trainer.ranks must be ≥ 1; got {self.ranks}")
        for key, value, allowed in (("backend", self.backend, PROCESS_GROUP_BACKENDS),
                                    ("param_dtype", self.param_dtype, PARAM_DTYPES),
                                    ("float32_matmul_precision", self.float32_matmul_precision,
                                     MATMUL_PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"config key 'trainer.{key}' must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def sharded(self) -> bool:
        return self.fsdp or self.ranks > 1


@dataclass
class ClusterSection:
    backend: str = "local"               # local: plain processes | ray: Ray actors in a placement group
    address: str = ""                    # ray: an existing cluster ("auto", "ray://host:10001"); empty: start one
    placement: str = "colocated"         # ray: colocated (engines share the trainer's bundles) | disaggregated
    engines: int = 1                     # ray: rollout servers placed as actors
    cpus_per_bundle: float = 1.0         # ray: CPUs of each bundle (each trainer rank, each disaggregated engine)
    gpus_per_bundle: float = -1.0        # ray: GPUs of each bundle; −1: 1 when this machine has CUDA, else 0
    num_cpus: int = 0                    # ray, local cluster: CPUs it offers (0: Ray counts them)

    def __post_init__(self) -> None:
        for key, value, allowed in (("backend", self.backend, CLUSTER_BACKENDS),
                                    ("placement", self.placement, PLACEMENTS)):
            if value not in allowed:
                raise ValueError(f"config key 'cluster.{key}' must be one of {', '.join(allowed)}; got {value!r}")
        if self.engines < 1:
            raise ValueError(f"cluster.engines must be ≥ 1; got {self.engines}")
