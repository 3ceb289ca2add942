"""The least time any engine could take for a workload on this hardware: weights and KV streamed from
HBM once a decode step, or the step's FLOPs at peak, whichever is slower."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlserve.bench.workload import Workload

if TYPE_CHECKING:
    import torch

    from rlserve.config import ModelConfig

# (substring of torch.cuda.get_device_name(), HBM bytes/s, dense bf16 FLOP/s); first match wins.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H200", 4.8e12, 989e12),
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),      # SXM
)


def count_params(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, parameters a decode step streams from memory).

    A step reads every weight once, except an untied input embedding, of which it gathers only the
    rows of the batch's tokens; a tied embedding is read in full as the LM head.
    """
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = h * q + 2 * h * kv + q * h
    if cfg.attention_bias:
        attn += q + 2 * kv
    if cfg.qk_norm:
        attn += 2 * cfg.head_dim
    layer = attn + 3 * h * cfg.intermediate_size + 2 * h
    embed = cfg.vocab_size * h
    body = cfg.num_layers * layer + h
    total = body + embed + (0 if cfg.tie_word_embeddings else embed)
    return total, body + embed


def projection_params(cfg: ModelConfig) -> int:
    """Parameters of the decoder layers' linear projections (q/k/v/o, gate/up/down): what FP8 quantizes."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size)


def streamed_weight_bytes(cfg: ModelConfig, dtype_bytes: int, quantization: str | None = None) -> float:
    """Bytes of weights a decode step streams. Under fp8 the projections are 1 byte a weight plus one
    float32 scale per output channel; the embedding, lm_head and norms stay in the model's dtype."""
    _, streamed = count_params(cfg)
    if quantization != "fp8":
        return float(streamed * dtype_bytes)
    proj = projection_params(cfg)
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    scales = cfg.num_layers * 4 * (q + 2 * kv + h + 2 * cfg.intermediate_size + h)
    return float(proj + scales + (streamed - proj) * dtype_bytes)


@dataclass(frozen=True)
class Roofline:
    min_time_s: float
    prefill_s: float
    decode_s: float
    decode_steps: int
    output_tok_per_s: float
    total_tok_per_s: float
    hbm_bytes_per_s: float
    peak_flops: float


def step_roofline_s(weight_bytes: float, context_tokens: int, kv_bytes_per_token: int, batch: int,
                    streamed_params: int, hbm_bytes_per_s: float, peak_flops: float = float("inf")) -> float:
    """The least time of one decode step: the larger of streaming every weight once plus the KV of
    every live context token, and 2 × params FLOPs per active request at peak."""
    memory_s = (weight_bytes + context_tokens * kv_bytes_per_token) / hbm_bytes_per_s
    return max(memory_s, 2 * streamed_params * batch / peak_flops)


def decode_roofline(model_config: ModelConfig, dtype_bytes: int, kv_bytes_per_token: int,
                    workload: Workload, hbm_bytes_per_s: float, peak_flops: float,
                    max_running: int | None = None, weight_bytes: float | None = None) -> Roofline:
    """The least time any engine could take for `workload` on this hardware.

    Prefill: 2 × params FLOPs per prompt token at peak (attention FLOPs left out). Decode is simulated
    step by step: request r runs its max_tokens steps, attending at step s to its prompt plus s tokens;
    all requests start at once unless `max_running` caps concurrency (then a finished request's slot
    goes to the next in line). A step costs the larger of its memory time (every streamed weight once +
    the KV of every active context token, over `hbm_bytes_per_s`) and its compute time (2 × params
    FLOPs per active request, at `peak_flops`). Pass peak_flops=inf to bound by bandwidth alone.
    `weight_bytes` (default: every streamed parameter at `dtype_bytes`) is what quantized weights read.
    """
    _, streamed = count_params(model_config)
    if weight_bytes is None:
        weight_bytes = streamed * dtype_bytes
    prefill_s = 2 * streamed * workload.input_tokens / peak_flops

    cap = workload.num_requests if max_running is None else max(1, min(max_running, workload.num_requests))
    prompt_lens = [len(p) for p in workload.prompt_token_ids]
    waiting = list(range(workload.num_requests))[::-1]     # pop() takes the next in line
    active: dict[int, int] = {}                             # request → tokens generated so far
    decode_s, steps = 0.0, 0
    while waiting or active:
        while waiting and len(active) < cap:
            active[waiting.pop()] = 0
        context = sum(prompt_lens[r] + done + 1 for r, done in active.items())
        decode_s += step_roofline_s(weight_bytes, context, kv_bytes_per_token, len(active), streamed,
                                    hbm_bytes_per_s, peak_flops)
        steps += 1
        for r in list(active):
            active[r] += 1
            if active[r] >= workload.max_tokens[r]:
                del active[r]

    total = prefill_s + decode_s
    return Roofline(min_time_s=total, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
                    output_tok_per_s=workload.output_tokens / total,
                    total_tok_per_s=(workload.input_tokens + workload.output_tokens) / total,
                    hbm_bytes_per_s=hbm_bytes_per_s, peak_flops=peak_flops)


def device_peaks(device: torch.device) -> tuple[float, float] | None:
    """(HBM bytes/s, bf16 FLOP/s) of a known GPU, else None."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw, flops in GPU_PEAKS:
        if key in name:
            return bw, flops
    return None
