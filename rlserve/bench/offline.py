"""Offline throughput: rlserve vs transformers on the same weights, beside a roofline estimate.

The default workload is nano-vllm's bench.py: random.seed(0); 256 requests whose prompts are
randint(100, 1024) random token ids in [0, 10000], then, drawn after all prompts, max_tokens =
randint(100, 1024) per request; temperature 0.6, ignore_eos. That is 142,827 input and 133,966
output tokens.

transformers runs `generate` in static left-padded batches of --batch-size. Each batch decodes for
its longest request (min_new_tokens = max_new_tokens = the batch's max of max_tokens), so the shorter
requests' extra tokens are wasted work: only the requested tokens count as output for both backends.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from rlserve.bench.roofline import Roofline, decode_roofline, device_peaks, streamed_weight_bytes
from rlserve.bench.workload import Workload, make_workload

if TYPE_CHECKING:
    import torch

TEMPERATURE = 0.6


# ---- results ----
@dataclass
class BackendResult:
    backend: str
    elapsed_s: float
    num_requests: int
    input_tokens: int
    output_tokens: int              # requested (useful) output tokens
    generated_tokens: int           # tokens actually decoded, padding waste included
    notes: str = ""

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.elapsed_s

    def line(self, name_width: int = 12) -> str:
        return (f"{self.backend + ':':<{name_width + 1}} {self.elapsed_s:8.2f} s  {self.requests_per_s:8.2f} req/s  "
                f"{self.output_tok_per_s:10,.1f} output tok/s  {self.total_tok_per_s:10,.1f} total tok/s")


@dataclass
class OfflineResult:
    model: str
    device: str
    dtype: str
    num_requests: int
    input_tokens: int
    output_tokens: int
    rlserve: BackendResult | None = None
    hf: BackendResult | None = None
    roofline: Roofline | None = None
    kv_leaked: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """rlserve's output throughput over transformers'."""
        if self.rlserve is None or self.hf is None:
            return None
        return self.rlserve.output_tok_per_s / self.hf.output_tok_per_s

    @property
    def roofline_fraction(self) -> float | None:
        if self.rlserve is None or self.roofline is None:
            return None
        return self.rlserve.output_tok_per_s / self.roofline.output_tok_per_s

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("rlserve", "hf"):
            res = getattr(self, name)
            if res is not None:
                data[name].update(requests_per_s=res.requests_per_s, output_tok_per_s=res.output_tok_per_s,
                                  total_tok_per_s=res.total_tok_per_s)
        data.update(ratio=self.ratio, roofline_fraction=self.roofline_fraction)
        return data


# ---- the runs ----
def sync_device(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warmup_workload(vocab_limit: int) -> Workload:
    # Its own random ids, so the timed prompts find no warm prefix in the radix cache.
    return make_workload(num_prompts=4, min_input=16, max_input=32, min_output=4, max_output=4, seed=12345,
                         max_token_id=vocab_limit)


def _engine_warmup_workload(workload: Workload, vocab_limit: int) -> Workload:
    """Prompts as long as the timed ones (so prefill runs full chunks and chunk continuations) but only a
    few output tokens: the kernels and compiled regions a run needs get built before the clock starts.
    Decode batch sizes need no warm-up: CUDA graphs are captured when the engine starts."""
    lengths = [len(p) for p in workload.prompt_token_ids]
    return make_workload(num_prompts=min(32, workload.num_requests), min_input=min(lengths),
                         max_input=max(lengths), min_output=8, max_output=8, seed=12345,
                         max_token_id=vocab_limit)


def run_rlserve(llm: Any, workload: Workload, warmup: bool = False, use_tqdm: bool = True,
                repeat: int = 1) -> BackendResult:
    """Time the workload `repeat` times (the prefix cache flushed before each) and report the median."""
    from rlserve.sampling import SamplingParams

    def params(w: Workload) -> list[SamplingParams]:
        return [SamplingParams(temperature=TEMPERATURE, ignore_eos=True, max_tokens=m) for m in w.max_tokens]

    if warmup:
        vocab = min(10000, max(max(p) for p in workload.prompt_token_ids))
        w = _engine_warmup_workload(workload, vocab)
        llm.generate(w.prompt_token_ids, params(w), use_tqdm=False)
    times, generated = [], 0
    for _ in range(max(1, repeat)):
        llm.engine.flush_cache()         # every timed run starts from an empty prefix cache
        sync_device(llm.engine.device)
        start = time.perf_counter()
        outputs = llm.generate(workload.prompt_token_ids, params(workload), use_tqdm=use_tqdm)
        sync_device(llm.engine.device)
        times.append(time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    notes = "" if generated == workload.output_tokens else (
        f"generated {generated} of {workload.output_tokens} requested tokens (context-length cap)")
    if len(times) > 1:
        notes = "; ".join(filter(None, [notes, "runs: " + ", ".join(f"{t:.2f} s" for t in times) + " (median shown)"]))
    return BackendResult("rlserve", statistics.median(times), workload.num_requests, workload.input_tokens,
                         generated, generated, notes)


def load_hf_model(model: str | None, load_format: str, device: torch.device, dtype: torch.dtype):
    """The same model in transformers: its weights for a real model, a random init for a dummy one."""
    from transformers import AutoModelForCausalLM

    from rlserve.models.loader import resolve_model

    source = resolve_model(model, load_format)
    if source.load_format == "dummy":
        hf = AutoModelForCausalLM.from_config(source.hf_config, dtype=dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(str(source.model_dir), dtype=dtype)
    return hf.to(device).eval()


def run_hf(hf_model: Any, workload: Workload, batch_size: int, device: torch.device,
           warmup: bool = False, pad_token_id: int = 0) -> BackendResult:
    import torch

    def run_batch(prompts: list[list[int]], new_tokens: int) -> None:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):        # left padding: every prompt ends at the last column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            hf_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                              temperature=TEMPERATURE, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                              max_new_tokens=new_tokens, pad_token_id=pad_token_id)

    if warmup:
        w = _warmup_workload(10000)
        run_batch(w.prompt_token_ids, max(w.max_tokens))
    sync_device(device)
    start = time.perf_counter()
    decoded = 0
    for i in range(0, workload.num_requests, batch_size):
        prompts = workload.prompt_token_ids[i:i + batch_size]
        new_tokens = max(workload.max_tokens[i:i + batch_size])
        run_batch(prompts, new_tokens)
        decoded += new_tokens * len(prompts)
    sync_device(device)
    elapsed = time.perf_counter() - start
    return BackendResult("transformers", elapsed, workload.num_requests, workload.input_tokens,
                         workload.output_tokens, decoded,
                         f"static batches of {batch_size}, left-padded; {decoded:,} tokens decoded, "
                         f"{workload.output_tokens:,} of them requested")


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The engine's rule: auto is CUDA when present; auto dtype is float32 on CPU, bfloat16 on CUDA."""
    from rlserve.engine.build import model_dtype, pick_device

    dev = pick_device(device)
    return dev, model_dtype(dtype, dev)


def run_offline(workload: Workload | None = None, backend: str = "rlserve", batch_size: int = 32,
                warmup: bool = False, engine_kwargs: dict[str, Any] | None = None,
                hbm_bytes_per_s: float | None = None, peak_flops: float | None = None,
                use_tqdm: bool = True, repeat: int = 1) -> OfflineResult:
    """Run the workload on rlserve and/or transformers (one after the other, same process)."""
    import torch

    from rlserve.kv_pool import KVPool
    from rlserve.models.loader import resolve_model

    if backend not in ("rlserve", "hf", "both"):
        raise ValueError(f"unknown backend {backend!r}; choose rlserve, hf or both")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    workload = workload or make_workload()
    kwargs = dict(engine_kwargs or {})
    model, load_format = kwargs.get("model"), kwargs.get("load_format", "auto")
    device, dtype = resolve_device_dtype(kwargs.get("device", "auto"), kwargs.get("dtype", "auto"))
    cfg = resolve_model(model, load_format).model_config
    if max(map(max, workload.prompt_token_ids)) >= cfg.vocab_size:
        raise ValueError(f"workload token ids reach past the model's vocabulary of {cfg.vocab_size}")

    result = OfflineResult(model=model or "SmolLM2-135M-Instruct (default)", device=str(device),
                           dtype=str(dtype).removeprefix("torch."), num_requests=workload.num_requests,
                           input_tokens=workload.input_tokens, output_tokens=workload.output_tokens)
    if device.type == "cuda":
        result.extra["gpu"] = torch.cuda.get_device_name(device)

    if backend in ("rlserve", "both"):
        from rlserve.llm import LLM

        llm = LLM(**kwargs)
        result.rlserve = run_rlserve(llm, workload, warmup, use_tqdm, repeat)
        result.kv_leaked = llm.engine.kv_leaked()
        del llm      # frees the KV pool before transformers needs the memory
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if backend in ("hf", "both"):
        hf = load_hf_model(model, load_format, device, dtype)
        result.hf = run_hf(hf, workload, batch_size, device, warmup)
        del hf
        gc.collect()

    peaks = device_peaks(device)
    if hbm_bytes_per_s is not None:
        peaks = (hbm_bytes_per_s, peak_flops if peak_flops is not None else (peaks[1] if peaks else float("inf")))
    elif peaks is not None and peak_flops is not None:
        peaks = (peaks[0], peak_flops)
    if peaks is not None:
        # The roofline of this run's bytes: FP8 projections read half a bf16 model's weights and run at
        # twice its peak FLOP/s; an fp8 KV cache reads half the KV.
        from rlserve.layers.quantized import FP8_DTYPE

        quantization = kwargs.get("quantization")
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        kv_dtype = FP8_DTYPE if str(kwargs.get("kv_cache_dtype") or "auto").startswith("fp8") else dtype
        kv_bytes = KVPool.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, kv_dtype)
        flops = peaks[1] * (2 if quantization == "fp8" else 1)
        result.roofline = decode_roofline(cfg, dtype_bytes, kv_bytes, workload, peaks[0], flops,
                                          kwargs.get("max_running_requests"),
                                          weight_bytes=streamed_weight_bytes(cfg, dtype_bytes, quantization))
    return result


# ---- command line ----
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlserve.config_args import add_engine_args

    w = parser.add_argument_group("workload (defaults: nano-vllm's bench.py)")
    w.add_argument("--num-prompts", type=int, default=256)
    w.add_argument("--min-input", type=int, default=None, help="default 100 (or --max-input if smaller)")
    w.add_argument("--max-input", type=int, default=1024)
    w.add_argument("--min-output", type=int, default=None, help="default 100 (or --max-output if smaller)")
    w.add_argument("--max-output", type=int, default=1024)
    w.add_argument("--workload-seed", type=int, default=0)
    b = parser.add_argument_group("benchmark")
    b.add_argument("--backend", choices=("rlserve", "hf", "both"), default="rlserve")
    b.add_argument("--batch-size", type=int, default=32, help="transformers' static batch size (default 32)")
    b.add_argument("--warmup", action="store_true",
                   help="before timing, run 32 prompts as long as the workload's with 8 output tokens each")
    b.add_argument("--repeat", type=int, default=1,
                   help="time rlserve's run this many times (prefix cache flushed before each); report the median")
    b.add_argument("--json-out", metavar="FILE", help="append the result as one JSON line")
    b.add_argument("--hbm-gbps", type=float, default=None,
                   help="memory bandwidth in GB/s for the roofline (default: known GPUs only)")
    b.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for the roofline (default: known GPUs; else prefill is not bounded)")
    b.add_argument("--no-tqdm", action="store_true", help="no progress bar")
    add_engine_args(parser)


def report(result: OfflineResult) -> str:
    lines = [f"workload: {result.num_requests} requests, {result.input_tokens:,} input tokens, "
             f"{result.output_tokens:,} output tokens; temperature {TEMPERATURE}, ignore_eos",
             f"model: {result.model}  dtype: {result.dtype}  device: {result.device}"
             + (f" ({result.extra['gpu']})" if "gpu" in result.extra else "")]
    for res in (result.rlserve, result.hf):
        if res is not None:
            lines.append(res.line())
            if res.notes:
                lines.append(f"{'':14}{res.notes}")
    if result.ratio is not None:
        lines.append(f"ratio rlserve/transformers (output tok/s): {result.ratio:.2f}x")
    if result.roofline is not None:
        r = result.roofline
        flops = "unbounded" if r.peak_flops == float("inf") else f"{r.peak_flops / 1e12:,.0f} TFLOP/s"
        lines.append(f"roofline ({r.hbm_bytes_per_s / 1e9:,.0f} GB/s, {flops}): {r.min_time_s:.3f} s minimum "
                     f"(prefill {r.prefill_s:.3f} s, decode {r.decode_s:.3f} s over {r.decode_steps} steps) "
                     f"→ {r.output_tok_per_s:,.1f} output tok/s")
        if result.roofline_fraction is not None:
            lines.append(f"rlserve reaches {result.roofline_fraction:.1%} of the roofline")
    if result.kv_leaked is not None:
        lines.append(f"kv leaked: {result.kv_leaked}")
    return "\n".join(lines)


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="rlserve bench offline", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parser)
        args = parser.parse_args(args)
    from rlserve.config_args import engine_options_from_args

    # A lone --max-input/--max-output below the default minimum of 100 pulls the minimum down with it.
    min_input = args.min_input if args.min_input is not None else min(100, args.max_input)
    min_output = args.min_output if args.min_output is not None else min(100, args.max_output)
    workload = make_workload(args.num_prompts, min_input, args.max_input, min_output, args.max_output,
                             seed=args.workload_seed)
    result = run_offline(workload, args.backend, args.batch_size, args.warmup, engine_options_from_args(args),
                         hbm_bytes_per_s=args.hbm_gbps * 1e9 if args.hbm_gbps else None,
                         peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None,
                         use_tqdm=not args.no_tqdm, repeat=args.repeat)
    print(report(result))
    if args.json_out:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "argv": sys.argv[1:], **result.to_json()}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 1 if result.kv_leaked else 0


if __name__ == "__main__":
    sys.exit(main())
