from __future__ import annotations

import random

import pytest
import torch

from rlserve.bench.roofline import (
    count_params,
    decode_roofline,
    projection_params,
    step_roofline_s,
    streamed_weight_bytes,
)
from rlserve.bench.workload import Workload, make_workload
from rlserve.config import ModelConfig
from rlserve.models.llama import LlamaForCausalLM
from rlserve.models.presets import preset_hf_config


def test_default_workload_matches_nano_vllm_totals():
    w = make_workload()
    assert w.num_requests == 256
    assert w.input_tokens == 142_827
    assert w.output_tokens == 133_966


def test_workload_draw_order_is_nano_vllms():
    # nano-vllm's bench.py, verbatim apart from the sizes, on the global generator.
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 300))] for _ in range(8)]
    max_tokens = [random.randint(100, 200) for _ in range(8)]
    assert make_workload(8, 100, 300, 100, 200) == Workload(prompts, max_tokens)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama-3.1-8b", "tiny-qwen2", "tiny-llama"])
def test_count_params_matches_the_model(preset):
    cfg = ModelConfig.from_hf(preset_hf_config(preset))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    total, streamed = count_params(cfg)
    assert total == sum(p.numel() for p in model.parameters())
    embed = cfg.vocab_size * cfg.hidden_size
    assert streamed == total - (0 if cfg.tie_word_embeddings else embed)


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "tiny-llama"])
def test_fp8_weight_bytes_count_the_models_projections(preset):
    cfg = ModelConfig.from_hf(preset_hf_config(preset))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    projections = {n: p for n, p in model.named_parameters() if n.endswith("_proj.weight")}
    assert projection_params(cfg) == sum(p.numel() for p in projections.values())
    _, streamed = count_params(cfg)
    channels = sum(p.shape[0] for p in projections.values())
    # 1 byte a projection weight and a float32 scale per output channel; everything else stays bf16.
    expected = projection_params(cfg) + 4 * channels + 2 * (streamed - projection_params(cfg))
    assert streamed_weight_bytes(cfg, 2, "fp8") == expected
    assert streamed_weight_bytes(cfg, 2) == 2 * streamed


def _toy() -> tuple[ModelConfig, Workload]:
    # One layer, hidden 4, q 2×2, kv 1×2, MLP 8, vocab 10, tied:
    # attention 4·4 + 2·4·2 + 4·4 = 48, MLP 3·4·8 = 96, norms 2·4 → 152; + final norm 4 + embedding 40 = 196.
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=8,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=2, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position=64, tie_word_embeddings=True)
    return cfg, Workload([[1, 2, 3], [1, 2, 3, 4, 5]], [2, 1])


def test_roofline_toy_memory_bound():
    cfg, w = _toy()
    assert count_params(cfg) == (196, 196)
    r = decode_roofline(cfg, dtype_bytes=2, kv_bytes_per_token=10, workload=w, hbm_bytes_per_s=100.0,
                        peak_flops=1e9)
    # Weights 392 B a step. Step 1: both run, contexts 3+1 and 5+1 → 392 + 100 B; step 2: only the first,
    # context 3+2 → 392 + 50 B. Prefill: 2·196·8 FLOPs.
    assert r.decode_steps == 2
    assert r.decode_s == pytest.approx(4.92 + 4.42)
    assert r.prefill_s == pytest.approx(2 * 196 * 8 / 1e9)
    assert r.output_tok_per_s == pytest.approx(3 / (9.34 + 3136e-9))
    assert r.total_tok_per_s == pytest.approx(11 / (9.34 + 3136e-9))


def test_roofline_toy_with_concurrency_cap():
    cfg, w = _toy()
    r = decode_roofline(cfg, 2, 10, w, 100.0, float("inf"), max_running=1)
    # One at a time: the first request's contexts 4 and 5, then the second's 6.
    assert r.decode_steps == 3
    assert r.decode_s == pytest.approx(4.32 + 4.42 + 4.52)
    assert r.prefill_s == 0


def test_roofline_toy_compute_bound():
    cfg, w = _toy()
    r = decode_roofline(cfg, 2, 10, w, hbm_bytes_per_s=1e15, peak_flops=392.0)
    # 2·196 FLOPs per active request = 1 s each: step 1 takes 2 s, step 2 takes 1 s; prefill 8 tokens → 8 s.
    assert r.decode_s == pytest.approx(3.0)
    assert r.prefill_s == pytest.approx(8.0)
    assert r.min_time_s == pytest.approx(11.0)


def test_step_roofline_is_the_slower_of_memory_and_compute():
    # 1 GB of weights + 1,000 tokens × 1 MB of KV over 1 TB/s = 2 ms; compute 2 × 1e9 × 8 / 1e15 = 16 µs.
    assert step_roofline_s(1e9, 1000, 10**6, 8, 10**9, 1e12, 1e15) == pytest.approx(2e-3)
    # A huge batch on a slow chip turns compute-bound.
    assert step_roofline_s(1e9, 1000, 10**6, 10**6, 10**9, 1e12, 1e15) == pytest.approx(2.0)
