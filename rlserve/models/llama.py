"""One Llama-family model for Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norm).

Parameter names follow HF checkpoints so safetensors load without renaming. The same module serves
inference (attention through a backend over the KV pool) and training (plain causal attention).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from rlserve.config import ModelConfig
from rlserve.distributed.group import TPGroup
from rlserve.layers import parallel
from rlserve.layers.attention.base import AttentionBackend, ForwardBatch
from rlserve.layers.attention.torch_backend import causal_attention
from rlserve.layers.fused import EAGER, Kernels
from rlserve.layers.logits import float32_logits
from rlserve.layers.norm import RMSNorm
from rlserve.layers.rotary import RotaryEmbedding
from rlserve.layers.stacked_linear import StackedLinear, project


def local_heads(cfg: ModelConfig, tp: TPGroup | None) -> tuple[int, int]:
    """(query heads, K/V heads) one rank computes: all of them at one rank; else the rank's share, at
    least one K/V head (replicated when there are fewer than ranks)."""
    if tp is None or tp.size == 1:
        return cfg.num_heads, cfg.num_kv_heads
    return cfg.num_heads // tp.size, max(1, cfg.num_kv_heads // tp.size)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = local_heads(cfg, tp)
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        bias, h, d = cfg.attention_bias, cfg.hidden_size, cfg.head_dim
        q_shard = kv_shard = None
        if tp is not None:       # this rank's query heads, and the K/V heads they read
            q_shard = parallel.head_shard(tp, cfg.num_heads, d, 0, "query heads")
            kv_shard = parallel.head_shard(tp, cfg.num_kv_heads, d, 0, "key/value heads")
        self.q_proj = parallel.column_linear(tp, h, cfg.num_heads * d, bias, q_shard)
        self.k_proj = parallel.column_linear(tp, h, cfg.num_kv_heads * d, bias, kv_shard)
        self.v_proj = parallel.column_linear(tp, h, cfg.num_kv_heads * d, bias, kv_shard)
        self.o_proj = parallel.row_linear(tp, cfg.num_heads * d, h, False, q_shard)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.stacked: StackedLinear | None = None      # set by LlamaForCausalLM.stack_projections
        self.kernels: Kernels = EAGER                  # set by LlamaForCausalLM.use_kernels

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                backend: AttentionBackend | None, batch: ForwardBatch | None,
                cu_seqlens: list[int] | None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = project(x, [self.q_proj, self.k_proj, self.v_proj], self.stacked)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.kernels.qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                               *cos_sin)
        else:
            q, k = self.kernels.apply_rotary(q, k, *cos_sin)
        if batch is None:
            out = causal_attention(q, k, v, self.scale, cu_seqlens or [0, t])
        else:
            out = backend.forward(q, k, v, self.layer, batch)  # type: ignore[union-attr]  # a batch comes with one
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = parallel.column_linear(tp, h, i, False)
        self.up_proj = parallel.column_linear(tp, h, i, False)
        self.down_proj = parallel.row_linear(tp, i, h, False)
        self.stacked: StackedLinear | None = None
        self.kernels: Kernels = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, [self.gate_proj, self.up_proj], self.stacked)
        return self.down_proj(self.kernels.silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer, tp)
        self.mlp = MLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cos_sin: tuple[torch.Tensor, torch.Tensor],
                backend: AttentionBackend | None, batch: ForwardBatch | None,
                cu_seqlens: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; delta: the previous layer's MLP output, not yet added (its add is
        fused into this layer's first norm). Returns (residual stream, this layer's MLP output)."""
        if delta is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm.add_forward(x, delta)
        attn = self.self_attn(h, cos_sin, backend, batch, cu_seqlens)
        h, x = self.post_attention_layernorm.add_forward(x, attn)
        return x, self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.embed_tokens = parallel.embedding(tp, cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels = EAGER, tp: TPGroup | None = None) -> None:
        """tp: this rank's tensor-parallel group (layers/parallel.py); None or one rank: the whole model."""
        super().__init__()
        self.config = cfg
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.model = LlamaModel(cfg, self.tp)
        self.lm_head = parallel.lm_head(self.tp, cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.attn_backend: AttentionBackend | None = None
        # float32 logits from 16-bit models (layers/logits.py says why); the engine sets it from its config.
        self.fp32_logits = True
        self.use_kernels(kernels)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch | None = None,
                cu_seqlens: list[int] | None = None) -> torch.Tensor:
        """Hidden states [T, hidden] for flat tokens. With a batch: inference over the KV pool.
        Without: causal attention over packed sequences delimited by cu_seqlens (training)."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(positions)
        delta = None
        for layer in self.model.layers:
            x, delta = layer(x, delta, cos_sin, self.attn_backend, batch, cu_seqlens)
        return self.model.norm(x) if delta is None else self.model.norm.add_forward(x, delta)[0]

    def decoder_layers(self) -> list[DecoderLayer]:
        return cast("list[DecoderLayer]", list(self.model.layers))

    def use_kernels(self, kernels: Kernels) -> None:
        """Run the elementwise chains with this set (its engine's choice; a forward under autograd takes
        the eager functions whatever the set)."""
        self.kernels = kernels
        for module in self.modules():
            if isinstance(module, (Attention, MLP, RMSNorm)):
                module.kernels = kernels

    def stack_projections(self) -> None:
        """Run q/k/v and gate/up as one GEMM each at inference (see layers/stacked_linear.py). Call it
        once the weights sit on their final device and dtype."""
        for layer in self.decoder_layers():
            attn, mlp = layer.self_attn, layer.mlp
            attn.stacked = StackedLinear([attn.q_proj, attn.k_proj, attn.v_proj])
            mlp.stacked = StackedLinear([mlp.gate_proj, mlp.up_proj])

    def unstack_projections(self) -> None:
        """Drop the stacked tensors (each layer then runs alone): they hold the weights' storage, so
        releasing the weights' memory must drop them too."""
        for layer in self.decoder_layers():
            layer.self_attn.stacked = layer.mlp.stacked = None

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Logits over the vocabulary. With fp32_logits (the default) they are float32 straight from the
        GEMM's accumulator, whatever the model's dtype. Without it the GEMM writes the model's dtype;
        float32=False then keeps it (decode sampling reads it directly), float32=True widens it."""
        if self.fp32_logits:
            logits = float32_logits(hidden, self.lm_head.weight)
        else:
            logits = self.lm_head(hidden)
            logits = logits.float() if float32 else logits
        if self.tp is not None:
            logits = cast(parallel.ParallelLMHead, self.lm_head).gather_logits(logits)
        return logits

    def ignores_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors the model has no place for and skips: rotary tables (computed here) and a
        tied lm_head (the embedding serves as both)."""
        return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full (checkpoint) tensors in; under tensor parallelism each rank keeps its piece."""
        params = dict(self.named_parameters(remove_duplicate=False))
        shards = parallel.parameter_shards(self)
        missing = set(params)
        for name, tensor in weights:
            if self.ignores_checkpoint_tensor(name):
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {self.config.architecture}")
            p = params[name]
            shape = parallel.full_shape(shards, name, p.shape)
            if shape != tuple(tensor.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {shape}")
            p.copy_(parallel.local_piece(shards, name, tensor))
            missing.discard(name)
        if self.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")

    @torch.no_grad()
    def init_dummy(self, seed: int = 0, std: float = 0.02) -> None:
        """Random weights for benchmarks: same shapes and dtypes as a real checkpoint."""
        gen = torch.Generator(device=self.model.embed_tokens.weight.device).manual_seed(seed)
        shards = parallel.parameter_shards(self)    # ranks draw the full tensor, each keeps its piece
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name not in shards:
                p.normal_(0.0, std, generator=gen)
            else:
                full = torch.empty(shards[name].full_shape(p.shape), dtype=p.dtype, device=p.device)
                p.copy_(shards[name].take(full.normal_(0.0, std, generator=gen)))
