"""The decode-attention micro-benchmark's byte count, which its bandwidth figures divide by."""
from __future__ import annotations

import torch

from benchmarks.attention import _bytes_per_token
from rlserve.kv_pool import FP8_DTYPE, KVPool


def test_bytes_per_token_counts_k_and_v_and_fp8_scales():
    bf16 = KVPool(1, 4, 8, 128, torch.bfloat16, "cpu")
    fp8 = KVPool(1, 4, 8, 128, FP8_DTYPE, "cpu")
    assert _bytes_per_token(bf16) == 2 * 8 * 128 * 2          # K and V, 2 bytes a value
    assert _bytes_per_token(fp8) == 2 * 8 * (128 + 4)         # 1 byte a value, a float32 scale a head
    # The same as the pool's own storage for one slot.
    one_slot = sum(buf[0].numel() * buf.element_size() for buf in (fp8.k_buffers[0], fp8.v_buffers[0]))
    one_slot += sum(sc[0].numel() * sc.element_size() for sc in (fp8.k_scales[0], fp8.v_scales[0]))
    assert _bytes_per_token(fp8) == one_slot
