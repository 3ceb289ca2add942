"""How an engine is put together from its EngineConfig: the device and dtypes, the model with its
elementwise kernel set, the KV budget and pools, the attention backend, the runner (cascade attention,
CUDA graphs) and the scheduler's defaults. Policy lives here; the step loop only uses what it built."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from rlserve.config import (
    CacheConfig,
    DType,
    Elementwise,
    EngineConfig,
    KVCacheDtype,
    ModelConfig,
    SchedulerConfig,
    Switch,
    parse_dtype,
)
from rlserve.distributed.group import TPGroup
from rlserve.engine.cache import RadixCache, ReqToTokenPool, TokenAllocator
from rlserve.engine.memory import RequestMemory
from rlserve.engine.memory_saver import MemorySaver, move_weights_into
from rlserve.engine.runner import ModelRunner
from rlserve.kv_pool import FP8_DTYPE, KVPool
from rlserve.layers.attention import create_backend
from rlserve.layers.fused import Kernels
from rlserve.models.heads import model_class
from rlserve.models.llama import LlamaForCausalLM, local_heads
from rlserve.models.loader import ModelSource, load_tokenizer, resolve_model
from rlserve.models.quantize import (
    check_quantization,
    engine_quantization,
    keep_checkpoint_quantization,
    quantize_model,
)

DEFAULT_MAX_MODEL_LEN = 32768   # keeps the request-to-token table small for 128k-context models


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def model_dtype(dtype: DType | str, device: torch.device) -> torch.dtype:
    """AUTO is float32 on a CPU (no fast 16-bit matmuls there) and bfloat16 on CUDA."""
    if dtype == DType.AUTO:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return parse_dtype(dtype)


def kv_cache_dtype(kind: KVCacheDtype, model_dtype: torch.dtype) -> torch.dtype:
    return FP8_DTYPE if kind is KVCacheDtype.FP8_E4M3 else model_dtype


def resolve_elementwise(mode: Elementwise, device: torch.device) -> Elementwise:
    """What AUTO means on this device: TRITON on CUDA with Triton installed (on an H100 the offline
    benchmark ran 2-3% faster than with inductor's kernels, which also cost the host dynamo's guards on
    every call), INDUCTOR on CUDA without it, EAGER elsewhere. Other modes stand as asked."""
    if mode is not Elementwise.AUTO:
        return mode
    if device.type != "cuda":
        return Elementwise.EAGER
    from rlserve.layers.triton_support import HAS_TRITON
    return Elementwise.TRITON if HAS_TRITON else Elementwise.INDUCTOR


def overlap_enabled(overlap: Switch, device: torch.device) -> bool:
    """AUTO overlaps the host's work with the device on CUDA (on a CPU both are the same cores)."""
    return device.type == "cuda" if overlap is Switch.AUTO else overlap is Switch.ON


def grammar_helper_count(asked: int | None, overlap: bool) -> int:
    """Helper processes that fill grammar masks beside overlapped steps. By default one per four cores,
    at most three (two measured slower, four no faster), and none without overlap."""
    if asked is not None:
        return asked
    return max(1, min(3, (os.cpu_count() or 1) // 4)) if overlap else 0


def scheduler_config(cfg: SchedulerConfig, device: torch.device) -> SchedulerConfig:
    """The chunked-prefill budget's default: 8192 tokens on CUDA (fewer, fuller prefill steps amortise
    the per-step host cost), 2048 on a CPU (decode steps don't wait behind long prefills)."""
    if cfg.chunked_prefill_size is not None:
        return cfg
    return replace(cfg, chunked_prefill_size=8192 if device.type == "cuda" else 2048)


def max_model_len(asked: int | None, cfg: ModelConfig) -> int:
    if asked is not None and not 1 < asked <= cfg.max_position:
        raise ValueError(f"max_model_len must be in [2, {cfg.max_position}] for this model, got {asked}")
    return min(cfg.max_position, asked or DEFAULT_MAX_MODEL_LEN)


def build_model(cfg: ModelConfig, source: ModelSource, device: torch.device, dtype: torch.dtype,
                kernels: Kernels, config: EngineConfig, saver: MemorySaver,
                tp: TPGroup | None = None) -> LlamaForCausalLM:
    method = engine_quantization(config.quantization, config.quantization_group_size, source, cfg, device,
                                 tp is not None)
    check_quantization(method, config.quantization_group_size, cfg, device)   # before loading
    torch.manual_seed(config.seed)
    with torch.device(device):
        if tp is None:
            model = model_class(cfg)(cfg, kernels)     # a pooling head (models/heads.py) or the causal LM
        else:
            model = LlamaForCausalLM(cfg, kernels, tp)
    if source.load_format == "dummy":
        model.init_dummy(config.seed)
    else:
        from rlserve.models.loader import iter_safetensors
        assert source.model_dir is not None, "a checkpoint that is not a preset has a directory"
        model.load_weights(iter_safetensors(source.model_dir))
    model = model.to(dtype).eval()
    model.fp32_logits = config.fp32_logits
    quantize_model(model, method, config.quantization_group_size)
    keep_checkpoint_quantization(model, config.quantization, source)   # a GGUF's or FP8 checkpoint's codes
    move_weights_into(saver, model)          # stacks the projections, inside the saver's region if any
    return model


def kv_budget_tokens(cache: CacheConfig, cfg: ModelConfig, kv_dtype: torch.dtype, device: torch.device) -> int:
    """KV slots: max_total_tokens if set, else a fraction of the GPU memory free after the weights, else
    (CPU) a byte budget."""
    if cache.max_total_tokens is not None:
        return cache.max_total_tokens
    per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * cache.gpu_memory_fraction) // per_token
    return max(cache.kv_cache_bytes // per_token, 1)


@dataclass
class RankParts:
    """What every rank of an engine holds: its model (its piece, under tensor parallelism) with the attention
    backend over its KV pool (its K/V heads), and the request-to-token table."""
    model_config: ModelConfig
    local_config: ModelConfig           # the heads one rank computes (model_config at one rank)
    source: ModelSource
    dtype: torch.dtype
    kv_dtype: torch.dtype
    max_model_len: int
    model: LlamaForCausalLM
    num_tokens: int                     # KV slots, the same on every rank
    kv_pool: KVPool
    table: ReqToTokenPool


def build_rank(config: EngineConfig, device: torch.device, saver: MemorySaver, tp: TPGroup | None) -> RankParts:
    dtype = model_dtype(config.dtype, device)
    source = resolve_model(config.model, config.load_format)
    cfg = ModelConfig.from_hf(source.hf_config)
    kernels = Kernels.for_mode(resolve_elementwise(config.compile, device))
    max_len = max_model_len(config.max_model_len, cfg)
    model = build_model(cfg, source, device, dtype, kernels, config, saver, tp)
    heads, kv_heads = local_heads(cfg, tp)
    local = replace(cfg, num_heads=heads, num_kv_heads=kv_heads)
    kv_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype)
    num_tokens = kv_budget_tokens(config.cache, local, kv_dtype, device)
    if tp is not None:          # every rank holds every slot: the smallest budget serves all
        num_tokens = tp.all_reduce_min(num_tokens)
    with saver.region("kv_cache"):
        kv_pool = KVPool(cfg.num_layers, num_tokens + 1, kv_heads, cfg.head_dim, kv_dtype, device)
    table = ReqToTokenPool(config.scheduler.max_running_requests + 3, max_len + 1, device)
    model.attn_backend = create_backend(config.attention_backend, kv_pool, local, device)
    return RankParts(cfg, local, source, dtype, kv_dtype, max_len, model, num_tokens, kv_pool, table)


@dataclass
class EngineParts:
    """What construction hands the engine: the model and every KV and runner component, wired together."""
    device: torch.device
    dtype: torch.dtype
    kv_dtype: torch.dtype
    model_config: ModelConfig
    tokenizer: Any                      # a transformers tokenizer, or None for presets without one
    max_model_len: int
    eos_ids: set[int]
    model: LlamaForCausalLM
    allocator: TokenAllocator
    kv_pool: KVPool
    table: ReqToTokenPool
    pad_row: int                        # a table row that stays all zeros: padded graph rows read KV slot 0
    tree: RadixCache | None             # None when the prefix cache is disabled
    memory: RequestMemory
    runner: ModelRunner
    scheduler: SchedulerConfig          # with its defaults for this device filled in
    overlap: bool
    grammar_helpers: int
    memory_saver: MemorySaver           # releases weights and KV at fixed addresses where it can


def build(config: EngineConfig) -> EngineParts:
    device = pick_device(config.device)
    workers = None
    if config.tensor_parallel_size > 1:     # start ranks 1.. (engine/tp_worker.py); this process is rank 0
        from rlserve.engine.tp_plan import Workers, check_tensor_parallel
        check_tensor_parallel(config, ModelConfig.from_hf(resolve_model(config.model, config.load_format).hf_config))
        workers = Workers(config, device)
        device = workers.device
    saver = MemorySaver(config.memory_saver, device)
    try:
        rank = build_rank(config, device, saver, workers.tp if workers else None)
    except BaseException:
        if workers is not None:
            workers.close()
        raise
    cfg, model, table = rank.model_config, rank.model, rank.table
    tokenizer = load_tokenizer(config.tokenizer or rank.source.tokenizer_dir)
    eos_ids = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    allocator = TokenAllocator(rank.num_tokens, device)
    pad_row = table.alloc()
    assert pad_row is not None
    tree = RadixCache(allocator) if config.cache.enable_radix_cache else None
    memory = RequestMemory(allocator, table, tree)
    runner = build_runner(config, model, table, pad_row, device, tree is not None, rank.kv_dtype, rank.local_config)
    runner.tp_workers = workers
    overlap = overlap_enabled(config.overlap_schedule, device)
    return EngineParts(device, rank.dtype, rank.kv_dtype, cfg, tokenizer, rank.max_model_len, eos_ids, model,
                       allocator, rank.kv_pool, table, pad_row, tree, memory, runner,
                       scheduler_config(config.scheduler, device), overlap,
                       grammar_helper_count(config.grammar_helpers, overlap), saver)


def build_runner(config: EngineConfig, model: LlamaForCausalLM, table: ReqToTokenPool, pad_row: int,
                 device: torch.device, radix: bool, kv_dtype: torch.dtype, cfg: ModelConfig) -> ModelRunner:
    """The runner, with cascade attention where asked for and possible, and decode graphs captured on CUDA
    (at one rank: the worker ranks of a tensor-parallel engine run their steps eagerly)."""
    runner = ModelRunner(model, table, device)
    max_members = getattr(model.attn_backend, "cascade_max_members", 0)
    if config.cascade_attention and radix and max_members:
        runner.enable_cascade(max_members, KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                                                  kv_dtype))
    # The torch backend sizes its masks on the host per batch, so only the triton one is captured.
    graphable = type(model.attn_backend).__name__ == "TritonAttentionBackend"
    if device.type == "cuda" and config.cuda_graph and graphable and config.tensor_parallel_size == 1:
        # By default every batch the scheduler can form replays a graph (an eager step costs ~1.5x one).
        max_running = config.scheduler.max_running_requests
        runner.capture_cuda_graphs(pad_row, min(config.cuda_graph_max_bs or max_running, max_running))
    return runner
