"""A torch.distributed group for weight updates, separate from everything else in both processes.

The trainer is rank 0 and hosts the group's TCPStore; the engine joins at rank ``rank_offset``. The
group is a gloo (CPU tensors) or NCCL (CUDA tensors) backend built directly on that store under a
``PrefixStore`` named after the group, so the process-wide default group is never initialised or
touched: a trainer that has its own torch.distributed world and an engine that has none can both join.

Both ends of a rendezvous block until the other arrives (or the timeout passes), so the trainer runs
`WeightSender.init_group` while its ``/init_weights_update_group`` call is in flight, and
`WeightSender.broadcast` while its ``/update_weights_from_distributed`` call is in flight.

Wire format of one update (the route carries names, dtypes, shapes, load_format and bucket_bytes):
- load_format None: one broadcast per tensor, in the announced order.
- load_format "flattened_bucket": the tensors, in the announced order, are cut into buckets by
  `plan_buckets` (greedy: a bucket closes when the next tensor would take it past bucket_bytes; a
  tensor larger than bucket_bytes is a bucket of its own), and each bucket is one uint8 broadcast laid
  out by `bucket_layout` (plain concatenation). Both sides derive the same buckets from the route's
  fields, so no per-bucket metadata crosses the wire. bucket_bytes None means one bucket for the whole
  call, which is exactly SGLang's behaviour, so an SGLang trainer works unchanged.
Every collective has the group's timeout (60 s by default): a peer that dies or stalls mid-update makes
the other side raise `WeightSyncError` instead of hanging. A group that failed is unusable; destroy it
(or, on the engine side, join a new one under its name, which replaces it).
Over NCCL a timed-out collective is also seen by NCCL's watchdog, which by default tears the process
down (TORCH_NCCL_ASYNC_ERROR_HANDLING); an engine that must outlive a dead trainer sets it to 0.
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rlserve.weight_sync.tensors import (
    NamedTensors,
    bucket_layout,
    dtype_name,
    flatten_bucket,
    nbytes_of,
    parse_dtype,
    unflatten_bucket,
)

DEFAULT_GROUP_NAME = "weight_update_group"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_BUCKET_BYTES = 512 << 20
LOAD_FORMATS = (None, "flattened_bucket")


class WeightSyncError(RuntimeError):
    """A collective of the weight-update group failed (peer gone, timeout, rendezvous failure)."""


@dataclass
class WeightUpdateGroup:
    """One side's membership of a weight-update group."""

    name: str
    rank: int
    world_size: int
    backend: str
    timeout: timedelta
    store: Any  # torch.distributed.TCPStore; kept alive as long as the group
    pg: Any  # ProcessGroupGloo / ProcessGroupNCCL
    failed: bool = field(default=False)

    @property
    def device(self) -> torch.device:
        """Where this group's collectives want their tensors."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast `tensor` from rank 0 (in place on the other ranks); raises WeightSyncError."""
        if self.failed:
            raise WeightSyncError(f"weight update group {self.name!r} failed earlier; destroy and re-create it")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = self.timeout
        try:
            self.pg.broadcast([tensor], opts).wait(self.timeout)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses with the peer's fate
            self.failed = True
            raise WeightSyncError(f"broadcast in group {self.name!r} failed: {exc}") from exc

    def close(self) -> None:
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:  # a failed group may refuse a clean shutdown; dropping it is enough
                pass
        self.pg = None
        self.store = None


def _gloo_device(master_address: str) -> Any:
    """Gloo's network device on the local address that routes to the master.

    Gloo's default device binds to whatever the machine's hostname resolves to, which on many hosts
    is an address the peer cannot reach (or 127.0.1.1). GLOO_SOCKET_IFNAME still wins when set.
    """
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_default_device()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((socket.gethostbyname(master_address), 9))  # UDP connect sends nothing
            local = probe.getsockname()[0]
    except OSError:
        return dist.ProcessGroupGloo.create_default_device()
    return dist.ProcessGroupGloo.create_device(hostname=local)


def _new_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str, backend: str, timeout_s: float
) -> WeightUpdateGroup:
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if world_size < 2:
        raise ValueError(f"world_size must be at least 2 (trainer + engine), got {world_size}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(
            master_address, int(master_port), world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
        prefixed = dist.PrefixStore(group_name, store)
        pg: Any
        if backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]  # torch's stubs omit it
            opts._timeout = timeout
            opts._devices = [_gloo_device(master_address)]
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
        else:
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = timeout
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, nccl_opts)
    except Exception as exc:
        raise WeightSyncError(
            f"could not form weight update group {group_name!r} at {master_address}:{master_port} "
            f"as rank {rank}/{world_size}: {exc}"
        ) from exc
    return WeightUpdateGroup(group_name, rank, world_size, backend, timeout, store, pg)


# --- engine side ---------------------------------------------------------------------------------------

_GROUPS: dict[str, WeightUpdateGroup] = {}
_GROUPS_LOCK = threading.Lock()


def init_weights_update_group(
    master_address: str,
    master_port: int,
    rank_offset: int,
    world_size: int,
    group_name: str = DEFAULT_GROUP_NAME,
    backend: str = "nccl",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> WeightUpdateGroup:
    """Join the trainer's group as rank `rank_offset` (blocks until every rank has joined). A group of
    the same name that failed (its peer died or stalled) is dropped first: a restarted trainer can join
    again under the name it knows; a working one must be destroyed first."""
    if rank_offset < 1:
        raise ValueError(f"rank_offset must be >= 1 (rank 0 is the trainer), got {rank_offset}")
    with _GROUPS_LOCK:
        stale = _GROUPS.get(group_name)
        if stale is not None and not stale.failed:
            raise ValueError(f"weight update group {group_name!r} already exists; destroy it first")
        _GROUPS.pop(group_name, None)
    if stale is not None:
        stale.close()
    group = _new_group(master_address, master_port, rank_offset, world_size, group_name, backend, timeout_s)
    with _GROUPS_LOCK:
        _GROUPS[group_name] = group
    return group


def get_weights_update_group(group_name: str) -> WeightUpdateGroup:
    with _GROUPS_LOCK:
        group = _GROUPS.get(group_name)
    if group is None:
        raise ValueError(f"no weight update group {group_name!r}; call init_weights_update_group first")
    return group


def destroy_weights_update_group(group_name: str) -> None:
    with _GROUPS_LOCK:
        group = _GROUPS.pop(group_name, None)
    if group is None:
        raise ValueError(f"no weight update group {group_name!r}")
    group.close()


def plan_buckets(nbytes: list[int], bucket_bytes: int | None) -> list[list[int]]:
    """Indices of the tensors in each bucket, in order (see the module notes)."""
    if bucket_bytes is None:
        return [list(range(len(nbytes)))] if nbytes else []
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, n in enumerate(nbytes):
        if current and size + n > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += n
    if current:
        buckets.append(current)
    return buckets


def _check_announcement(
    names: list[str], dtypes: list[Any], shapes: list[Any], load_format: str | None
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be None or 'flattened_bucket', got {load_format!r}")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    specs = []
    for name, dtype, shape in zip(names, dtypes, shapes):
        torch_dtype = parse_dtype(dtype)
        shape_t = tuple(shape)
        nbytes_of(torch_dtype, shape_t)  # validates the shape
        specs.append((str(name), torch_dtype, shape_t))
    return specs


def receive_weights(
    group: WeightUpdateGroup,
    names: list[str],
    dtypes: list[Any],
    shapes: list[Any],
    load_format: str | None = None,
    device: str | torch.device | None = None,
    bucket_bytes: int | None = None,
) -> NamedTensors:
    """Receive one announced update from rank 0; ValueError for bad metadata, WeightSyncError for failures.

    Tensors land on the group's device and are moved to `device` when that differs. Flattened buckets
    come back as views into the received buffers.
    """
    specs = _check_announcement(names, dtypes, shapes, load_format)
    target = torch.device(device) if device is not None else group.device
    out: NamedTensors = []
    if load_format is None:
        for name, dtype, shape in specs:
            tensor = torch.empty(shape, dtype=dtype, device=group.device)
            group.broadcast(tensor)
            out.append((name, tensor))
    else:
        sizes = [nbytes_of(dtype, shape) for _, dtype, shape in specs]
        for indices in plan_buckets(sizes, bucket_bytes):
            chosen = [specs[i] for i in indices]
            layout, total = bucket_layout([s[0] for s in chosen], [s[1] for s in chosen], [s[2] for s in chosen])
            buffer = torch.empty(total, dtype=torch.uint8, device=group.device)
            group.broadcast(buffer)
            out.extend(unflatten_bucket(buffer, layout))
    if target != group.device:
        out = [(name, tensor.to(target)) for name, tensor in out]
    return out


# --- trainer side --------------------------------------------------------------------------------------


class WeightSender:
    """Rank 0 of a weight-update group: owns the store, broadcasts in the order it announces."""

    def __init__(
        self,
        master_address: str,
        master_port: int,
        world_size: int = 2,
        group_name: str = DEFAULT_GROUP_NAME,
        backend: str = "nccl",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.master_address = master_address
        self.master_port = int(master_port)
        self.world_size = world_size
        self.group_name = group_name
        self.backend = backend
        self.timeout_s = timeout_s
        self.group: WeightUpdateGroup | None = None

    def init_request(self, rank_offset: int = 1) -> dict[str, Any]:
        """Fields of the /init_weights_update_group call for the engine at `rank_offset`."""
        return {
            "master_address": self.master_address,
            "master_port": self.master_port,
            "rank_offset": rank_offset,
            "world_size": self.world_size,
            "group_name": self.group_name,
            "backend": self.backend,
        }

    def init_group(self) -> None:
        """Create the store and join as rank 0; blocks until all engines have joined."""
        if self.group is not None:
            raise ValueError(f"weight update group {self.group_name!r} is already initialised")
        self.group = _new_group(
            self.master_address, self.master_port, 0, self.world_size, self.group_name, self.backend, self.timeout_s
        )

    def describe(
        self,
        pairs: NamedTensors,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        load_format: str | None = "flattened_bucket",
    ) -> dict[str, Any]:
        """Fields of the /update_weights_from_distributed call announcing `pairs` (sends nothing)."""
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be None or 'flattened_bucket', got {load_format!r}")
        request: dict[str, Any] = {
            "names": [name for name, _ in pairs],
            "dtypes": [dtype_name(t.dtype) for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs],
            "group_name": self.group_name,
            "load_format": load_format,
        }
        if load_format == "flattened_bucket":
            request["bucket_bytes"] = bucket_bytes
        return request

    def broadcast(
        self,
        pairs: NamedTensors,
        bucket_bytes: int | None = DEFAULT_BUCKET_BYTES,
        load_format: str | None = "flattened_bucket",
    ) -> dict[str, Any]:
        """Send `pairs` as `describe` announces them; returns that announcement."""
        request = self.describe(pairs, bucket_bytes, load_format)
        if self.group is None:
            raise ValueError("call init_group before broadcast")
        group = self.group
        tensors = [t.detach().to(group.device) for _, t in pairs]
        if load_format is None:
            for tensor in tensors:
                group.broadcast(tensor.contiguous())
            return request
        sizes = [t.numel() * t.element_size() for t in tensors]
        for indices in plan_buckets(sizes, bucket_bytes):
            buffer, _ = flatten_bucket([(pairs[i][0], tensors[i]) for i in indices])
            group.broadcast(buffer)
        return request

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
