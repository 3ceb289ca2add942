"""Moving weights from a trainer process into an engine process: a separate torch.distributed group
(`group`) and same-host tensor handles through shared memory or CUDA IPC (`tensors`)."""

from __future__ import annotations

from rlserve.weight_sync.group import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_GROUP_NAME,
    DEFAULT_TIMEOUT_S,
    WeightSender,
    WeightSyncError,
    WeightUpdateGroup,
    destroy_weights_update_group,
    get_weights_update_group,
    init_weights_update_group,
    plan_buckets,
    receive_weights,
)
from rlserve.weight_sync.tensors import (
    BucketEntry,
    deserialize_named_tensors,
    deserialize_tensors,
    flatten_bucket,
    serialize_flattened_bucket,
    serialize_named_tensors,
    unflatten_bucket,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DEFAULT_GROUP_NAME",
    "DEFAULT_TIMEOUT_S",
    "BucketEntry",
    "WeightSender",
    "WeightSyncError",
    "WeightUpdateGroup",
    "deserialize_named_tensors",
    "deserialize_tensors",
    "destroy_weights_update_group",
    "flatten_bucket",
    "get_weights_update_group",
    "init_weights_update_group",
    "plan_buckets",
    "receive_weights",
    "serialize_flattened_bucket",
    "serialize_named_tensors",
    "unflatten_bucket",
]
