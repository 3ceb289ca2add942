"""Child-process bodies for the weight-sync tests (spawned, so they live in an importable module)."""
from __future__ import annotations

import os
import pickle
from typing import Any

import torch
import torch.distributed as dist


def make_pairs(seed: int) -> list[tuple[str, torch.Tensor]]:
    """Mixed dtypes, including an odd-length bf16 tensor so later offsets are not 4-byte aligned."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(5, 4, generator=g)),
        ("model.layers.0.input_layernorm.weight", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(4, 6, generator=g)),
        ("step", torch.randint(-(2**40), 2**40, (2,), generator=g, dtype=torch.int64)),
        ("lm_head.weight", torch.randn(2, 3, generator=g).to(torch.bfloat16)),
    ]


def receiver(port: int, announcements: list[dict[str, Any]], timeout_s: float, results: Any) -> None:
    """Engine side: join as rank 1 and receive each announced update; report what arrived."""
    from rlserve.weight_sync import destroy_weights_update_group, init_weights_update_group, receive_weights

    try:
        group = init_weights_update_group("127.0.0.1", port, 1, 2, "test_group", "gloo", timeout_s=timeout_s)
        received = []
        for ann in announcements:
            pairs = receive_weights(
                group, ann["names"], ann["dtypes"], ann["shapes"], ann["load_format"], "cpu", ann.get("bucket_bytes")
            )
            received.append(pairs)
        destroy_weights_update_group("test_group")
        # Plain pickle copies the data: shared-memory handles would die with this process.
        results.put(("ok", pickle.dumps(received), dist.is_initialized()))
    except BaseException as exc:  # report, never hang the parent
        results.put(("error", repr(exc), dist.is_initialized()))


def dying_sender(port: int, timeout_s: float) -> None:
    """Trainer side that sends the first tensor of a per-tensor update and then dies."""
    from rlserve.weight_sync import WeightSender

    sender = WeightSender("127.0.0.1", port, 2, "test_group", "gloo", timeout_s=timeout_s)
    sender.init_group()
    sender.broadcast(make_pairs(0)[:1], load_format=None)
    os._exit(3)


def stalling_sender(port: int, timeout_s: float, release: Any) -> None:
    """Trainer side that joins the group and then never broadcasts until told to go."""
    from rlserve.weight_sync import WeightSender

    sender = WeightSender("127.0.0.1", port, 2, "test_group", "gloo", timeout_s=timeout_s)
    sender.init_group()
    release.wait(120)
    os._exit(0)


def shm_reader(data: str, load_format: str | None, results: Any) -> None:
    """Map serialized tensors, check them against make_pairs, then write into them in place."""
    from rlserve.weight_sync import deserialize_tensors

    pairs = deserialize_tensors(data, load_format)
    expected = make_pairs(1) + [("big", torch.arange(1 << 20, dtype=torch.float32))]
    equal = [
        name == exp_name and t.dtype == e.dtype and torch.equal(t, e)
        for (name, t), (exp_name, e) in zip(pairs, expected)
    ]
    shared = [t.is_shared() for _, t in pairs]
    # Writes land in the producer's memory only if nothing was copied on the way.
    pairs[-1][1][:3] = -7.0
    results.put((len(pairs) == len(expected) and all(equal), shared, dist.is_initialized()))
