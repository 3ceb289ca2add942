"""Named tensors across a process boundary on one host, and flattened byte buckets.

`serialize_named_tensors` turns (name, tensor) pairs into a short ASCII string that carries handles,
never tensor data: CPU tensors are moved into shared memory (``Tensor.share_memory_``, which swaps the
producer's storage for a shared one in place, values unchanged) and travel as file descriptors handed
over by the sending process; CUDA tensors travel as CUDA IPC handles. Both come from
``torch.multiprocessing.reductions`` - the same machinery multiprocessing queues use - pickled and
base64-encoded so the string fits in a JSON field.

The producer must keep its tensors alive (and unmodified) until the receiving side has copied them,
and the sending process must stay alive until the string is deserialized: a CPU handle is fetched from
it over a local socket. A string can be deserialized once.

CUDA handles name a device by index, and the index depends on CUDA_VISIBLE_DEVICES in each process.
The sender therefore records the device's UUID and the receiver maps it to its own index.

A flattened bucket is one uint8 tensor holding several tensors' bytes back to back, described by
`BucketEntry` metadata. The default layout (``alignment=1``) is a plain concatenation in the given
order, which is what SGLang's flattened buckets are, so either side can talk to the other.
"""

from __future__ import annotations

import base64
import functools
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.multiprocessing  # noqa: F401  (registers the tensor/storage reductions with ForkingPickler)
from torch.multiprocessing.reductions import reduce_tensor, storage_from_cache

try:
    from multiprocessing.reduction import ForkingPickler
except ImportError:  # pragma: no cover - CPython always has it
    ForkingPickler = pickle.Pickler  # type: ignore[assignment,misc]

NamedTensors = list[tuple[str, torch.Tensor]]

# Positions in the arguments of torch.multiprocessing.reductions.rebuild_cuda_tensor.
_CUDA_STORAGE_CLS_ARG = 4
_CUDA_DEVICE_ARG = 6
_CUDA_HANDLE_ARG = 7
_CUDA_OFFSET_BYTES_ARG = 9
_CUDA_EVENT_HANDLE_ARG = 13
_CUDA_EVENT_SYNC_ARG = 14
_FORMAT_VERSION = 1


# --- dtype names -------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling SGLang clients send and `parse_dtype` reads."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from 'bfloat16', 'torch.bfloat16' or a dtype; ValueError for anything else."""
    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise ValueError(f"dtype must be a string such as 'bfloat16', got {value!r}")
    attr = getattr(torch, value.removeprefix("torch."), None)
    if not isinstance(attr, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return attr


def nbytes_of(dtype: torch.dtype, shape: tuple[int, ...] | list[int]) -> int:
    numel = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise ValueError(f"shape must be non-negative integers, got {list(shape)}")
        numel *= dim
    return numel * _element_size(dtype)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --- shared memory / IPC serialization --------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    rebuild: Callable[..., torch.Tensor]
    args: tuple[Any, ...]
    device_uuid: str | None  # CUDA only: the device the IPC handle belongs to


# Both are asked once per tensor of a push (hundreds) and cannot change within a process: cached.
@functools.cache
def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


@functools.cache
def _local_cuda_index(uuid: str) -> int:
    """This process's index of the CUDA device with `uuid` (indices differ under CUDA_VISIBLE_DEVICES)."""
    if not torch.cuda.is_available():
        raise ValueError("received CUDA tensors but CUDA is not available in this process")
    for index in range(torch.cuda.device_count()):
        if _device_uuid(index) == uuid:
            return index
    raise ValueError(f"CUDA device {uuid} is not visible to this process (check CUDA_VISIBLE_DEVICES)")


def _dumps(obj: object) -> str:
    buf = io.BytesIO()
    # ForkingPickler knows torch's storage reductions (shared-memory file descriptors).
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _loads(data: str) -> Any:
    if not isinstance(data, str):
        raise ValueError("serialized tensors must be a base64 string")
    try:
        raw = base64.b64decode(data.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"serialized tensors are not valid base64: {exc}") from exc
    try:
        return pickle.loads(raw)
    except Exception as exc:  # UnpicklingError, EOFError, ...: the payload is not what a serializer made
        raise ValueError(f"serialized tensors cannot be read: {type(exc).__name__}: {exc}") from exc


def serialize_named_tensors(pairs: NamedTensors) -> str:
    """Handles to `pairs` as a base64 string; no tensor data is copied into it (see the module notes)."""
    entries: list[_Entry] = []
    for name, tensor in pairs:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(tensor).__name__}")
        tensor = tensor.detach()
        if tensor.is_cuda:
            rebuild, args = reduce_tensor(tensor)
            args = list(args)
            uuid = _device_uuid(int(args[_CUDA_DEVICE_ARG]))
            entries.append(_Entry(name, rebuild, tuple(args), uuid))
        elif tensor.device.type == "cpu":
            # share_memory_ is a no-op for storage that is already shared.
            rebuild, args = reduce_tensor(tensor.share_memory_())
            entries.append(_Entry(name, rebuild, tuple(args), None))
        else:
            raise ValueError(f"{name}: tensors on {tensor.device} cannot be shared between processes")
    return _dumps((_FORMAT_VERSION, entries))


def deserialize_named_tensors(data: str) -> NamedTensors:
    """The tensors `serialize_named_tensors` described, mapped into this process (shared, not copied)."""
    version, entries = _loads(data)
    if version != _FORMAT_VERSION:
        raise ValueError(f"serialized tensors have format {version}, expected {_FORMAT_VERSION}")
    out: NamedTensors = []
    for entry in entries:
        args = list(entry.args)
        if entry.device_uuid is None:
            out.append((entry.name, entry.rebuild(*args)))
            continue
        args[_CUDA_DEVICE_ARG] = _local_cuda_index(entry.device_uuid)
        mapped = storage_from_cache(args[_CUDA_STORAGE_CLS_ARG],
                                    (args[_CUDA_HANDLE_ARG], args[_CUDA_OFFSET_BYTES_ARG])) is not None
        out.append((entry.name, entry.rebuild(*args)))
        if mapped and args[_CUDA_EVENT_SYNC_ARG]:
            # torch waits on the producer's event only when it opens a handle. A mapping still open (the
            # previous update's, not yet dropped: the server unmaps after answering) is reused without
            # that wait, so wait here: the copies that follow must see every write the producer queued.
            torch.cuda.Event.from_ipc_handle(args[_CUDA_DEVICE_ARG], args[_CUDA_EVENT_HANDLE_ARG]).wait()
    return out


# --- flattened buckets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketEntry:
    """Where one tensor sits in a flattened uint8 bucket."""

    name: str
    dtype: str  # dtype_name spelling
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the bucket
    nbytes: int


def bucket_layout(
    names: list[str],
    dtypes: list[str | torch.dtype],
    shapes: list[tuple[int, ...] | list[int]],
    alignment: int = 1,
) -> tuple[list[BucketEntry], int]:
    """Entries and total bytes of the bucket holding these tensors in this order.

    Every offset is rounded up to `alignment`; 1 gives SGLang's plain concatenation.
    """
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    if alignment < 1:
        raise ValueError(f"alignment must be >= 1, got {alignment}")
    entries: list[BucketEntry] = []
    offset = 0
    for name, dtype, shape in zip(names, dtypes, shapes):
        torch_dtype = parse_dtype(dtype)
        shape_t = tuple(shape)
        nbytes = nbytes_of(torch_dtype, shape_t)
        offset = -(-offset // alignment) * alignment
        entries.append(BucketEntry(name, dtype_name(torch_dtype), shape_t, offset, nbytes))
        offset += nbytes
    return entries, offset


def flatten_bucket(pairs: NamedTensors, alignment: int = 1) -> tuple[torch.Tensor, list[BucketEntry]]:
    """One uint8 tensor (on the tensors' device) with every tensor's bytes, and where each one is."""
    if not pairs:
        return torch.empty(0, dtype=torch.uint8), []
    devices = {tensor.device for _, tensor in pairs}
    if len(devices) != 1:
        raise ValueError(f"a bucket's tensors must share one device, got {sorted(map(str, devices))}")
    entries, total = bucket_layout(
        [name for name, _ in pairs], [t.dtype for _, t in pairs], [tuple(t.shape) for _, t in pairs], alignment
    )
    buffer = torch.empty(total, dtype=torch.uint8, device=devices.pop())
    # one torch._foreach_copy_ (a few launches on a GPU) rather than a copy_ per tensor
    dsts, srcs = [], []
    for entry, (_, tensor) in zip(entries, pairs):
        if entry.nbytes:
            dsts.append(buffer[entry.offset : entry.offset + entry.nbytes])
            srcs.append(tensor.detach().contiguous().reshape(-1).view(torch.uint8))
    if dsts:
        torch._foreach_copy_(dsts, srcs)
    return buffer, entries


def unflatten_bucket(buffer: torch.Tensor, metadata: list[BucketEntry]) -> NamedTensors:
    """(name, tensor) pairs that are views into `buffer`.

    A tensor whose offset is not a multiple of its element size cannot be a view (torch refuses
    misaligned dtype views); it is copied instead. That only happens with unaligned layouts holding,
    say, an odd number of bf16 values before a float32 tensor.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("a flattened bucket is a 1-D uint8 tensor")
    out: NamedTensors = []
    for entry in metadata:
        dtype = parse_dtype(entry.dtype)
        if entry.offset < 0 or entry.offset + entry.nbytes > buffer.numel():
            raise ValueError(f"{entry.name}: bytes [{entry.offset}, {entry.offset + entry.nbytes}) outside the bucket")
        if nbytes_of(dtype, entry.shape) != entry.nbytes:
            raise ValueError(f"{entry.name}: {entry.nbytes} bytes do not hold {entry.dtype}{list(entry.shape)}")
        raw = buffer[entry.offset : entry.offset + entry.nbytes]
        if (buffer.storage_offset() + entry.offset) % _element_size(dtype):
            raw = raw.clone()
        out.append((entry.name, raw.view(dtype).reshape(entry.shape)))
    return out


def serialize_flattened_bucket(pairs: NamedTensors) -> str:
    """`pairs` as one shared bucket plus its metadata (load_format="flattened_bucket")."""
    buffer, metadata = flatten_bucket([(name, t) for name, t in pairs])
    handles = serialize_named_tensors([("flattened_tensor", buffer)])
    return _dumps((_FORMAT_VERSION, handles, metadata))


def deserialize_tensors(data: str, load_format: str | None = None) -> NamedTensors:
    """Read what the producer serialized for `load_format` None / "direct" / "flattened_bucket"."""
    if load_format in (None, "direct"):
        return deserialize_named_tensors(data)
    if load_format != "flattened_bucket":
        raise ValueError(f"unknown load_format {load_format!r} (expected None, 'direct' or 'flattened_bucket')")
    version, handles, metadata = _loads(data)
    if version != _FORMAT_VERSION:
        raise ValueError(f"serialized bucket has format {version}, expected {_FORMAT_VERSION}")
    [(_, buffer)] = deserialize_named_tensors(handles)
    return unflatten_bucket(buffer, metadata)
