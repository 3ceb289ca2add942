"""Tensor-parallel layers on real processes (gloo): ranks built from the full model's state dict, each
loading its pieces, give the same hidden states and gathered logits as the whole model, at 2 ranks and at
4 (fewer K/V heads than ranks: K/V heads replicated), for Llama, Qwen2 (q/k/v biases, tied embeddings)
and Qwen3 (q/k norms), with a vocabulary the ranks don't divide."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from rlserve.config import ModelConfig
from rlserve.distributed.group import TPGroup, destroy_tensor_parallel, init_tensor_parallel
from rlserve.layers.parallel import Shard, even_shard, head_shard, parameter_shards, vocab_shard
from rlserve.models.llama import LlamaForCausalLM
from rlserve.net import free_port

BASE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=103, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
                   max_position=128, tie_word_embeddings=False)
CONFIGS = {
    "llama": BASE,
    "qwen2": replace(BASE, architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True),
    "qwen3": replace(BASE, architecture="Qwen3ForCausalLM", qk_norm=True, tie_word_embeddings=True),
}
IDS = torch.tensor([5, 17, 99, 102, 0, 3, 64, 64, 12, 101])
POSITIONS = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
CU_SEQLENS = [0, 5, 10]


def whole(cfg: ModelConfig) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.init_dummy(seed=1, std=0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@torch.no_grad()
def outputs(model: LlamaForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model(IDS, POSITIONS, cu_seqlens=CU_SEQLENS)
    return hidden, model.compute_logits(hidden)


def _rank(rank: int, size: int, port: int, queue: mp.Queue) -> None:
    tp = init_tensor_parallel(rank, size, port, torch.device("cpu"))
    try:
        for name, cfg in CONFIGS.items():
            full = whole(cfg)
            model = LlamaForCausalLM(cfg, tp=tp).eval()
            model.load_weights(full.state_dict().items())
            model.stack_projections()
            hidden, logits = outputs(model)
            if rank == 0:
                queue.put((name, hidden, logits))
    finally:
        destroy_tensor_parallel()


@pytest.mark.parametrize("size", [2, 4])
def test_ranks_match_the_whole_model(size: int) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.spawn(_rank, args=(size, free_port(), queue), nprocs=size, join=False)
    got = {}
    for _ in CONFIGS:
        name, hidden, logits = queue.get()
        got[name] = (hidden, logits)
    procs.join()
    for name, cfg in CONFIGS.items():
        hidden, logits = outputs(whole(cfg))
        assert logits.shape == (len(IDS), cfg.vocab_size)
        torch.testing.assert_close(got[name][0], hidden, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(got[name][1], logits, rtol=0, atol=1e-5, msg=name)


def test_one_rank_is_the_plain_model() -> None:
    """At one rank nothing of the parallel layers is there: plain nn.Linear and nn.Embedding modules."""
    model = LlamaForCausalLM(BASE, tp=TPGroup(0, 1))
    layer = model.model.layers[0]
    for module in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj, model.lm_head):
        assert type(module) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    assert model.tp is None and parameter_shards(model) == {}


def test_shards_cover_the_full_tensor() -> None:
    full = torch.arange(10 * 3).view(10, 3)
    pieces = [vocab_shard(TPGroup(r, 4), 10).take(full) for r in range(4)]
    assert [p.shape[0] for p in pieces] == [3, 3, 3, 3]
    torch.testing.assert_close(torch.cat(pieces)[:10], full)
    assert torch.cat(pieces)[10:].eq(0).all()                # vocabulary padding reads zeros
    # 2 K/V heads over 4 ranks: ranks 0-1 hold head 0, ranks 2-3 head 1
    kv = [head_shard(TPGroup(r, 4), 2, 5, 0, "kv") for r in range(4)]
    assert [s.index for s in kv] == [0, 0, 1, 1] and kv[0] == Shard(0, 0, 2, 10, 10)
    with pytest.raises(ValueError, match="not divisible"):
        even_shard(TPGroup(0, 4), 6, 0, "intermediate")
    with pytest.raises(ValueError, match="not a multiple"):
        head_shard(TPGroup(0, 4), 3, 8, 0, "kv")
