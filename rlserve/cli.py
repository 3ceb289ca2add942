"""The `rlserve` command: generate, chat, bench, serve and train (the router is still to come).

Every subcommand shares the engine flags of `add_engine_args`; `engine_kwargs` maps them onto LLM(...).
Bad values end in one `error: ...` line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlserve.llm import LLM
    from rlserve.outputs import CompletionOutput
    from rlserve.sampling import SamplingParams

EXIT_USAGE = 2


class CLIError(ValueError):
    """A bad flag value or input found by the CLI itself."""


# ---- shared flags ----
def parse_bytes(text: str) -> int:
    """'268435456', '256M', '2G', '1.5GiB' → bytes (binary units)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (s[:-1], s[-1]) if s and s[-1] in units else (s, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (try 512M or 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"byte size must be positive, got {text!r}")
    return value


def add_engine_args(parser: argparse.ArgumentParser, default_model_help: str = "the default "
                    "SmolLM2-135M-Instruct") -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help=f"HF model directory, .gguf file or preset name (default: {default_model_help})")
    g.add_argument("--load-format", default="auto", help="auto | safetensors | gguf | dummy")
    g.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA) | float32 | "
                   "bfloat16 | float16; on a CPU with AMX or AVX-512 bf16, bfloat16 decodes about twice as "
                   "fast (docs/benchmarks.md)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, default=0, help="engine sampling seed (default 0)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    g.add_argument("--disable-radix-cache", action="store_true", help="turn prefix caching off")
    g.add_argument("--chunked-prefill-size", type=int, default=None, help="prefill tokens per step")
    g.add_argument("--max-running-requests", "--max-running", type=int, default=None,
                   help="cap on concurrently running requests")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV pool size in tokens (overrides the byte/fraction budgets)")
    g.add_argument("--kv-cache-bytes", type=parse_bytes, default=None,
                   help="KV pool byte budget on CPU, e.g. 512M or 2G")
    g.add_argument("--schedule-policy", default=None, help="fcfs | lpm")
    g.add_argument("--attention-backend", default="auto", help="auto | torch | triton")
    g.add_argument("--disable-cuda-graph", action="store_true", help="run decode eagerly on CUDA")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="largest decode batch captured in a CUDA graph (default: --max-running-requests)")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="don't overlap host work with the device's decode step")
    g.add_argument("--disable-compile", action="store_true",
                   help="run the elementwise steps (norms, rotary, activation) as eager torch ops, unfused")
    g.add_argument("--triton-elementwise", action="store_true",
                   help="run RMSNorm, the gated activation and rotary as Triton kernels on CUDA (the default there)")
    g.add_argument("--inductor-elementwise", action="store_true",
                   help="fuse RMSNorm, the gated activation and rotary with torch.compile instead of Triton kernels")
    g.add_argument("--enable-cascade-attention", action="store_true",
                   help="decode reads a prefix shared by several requests once per step (experimental)")
    g.add_argument("--disable-fp32-logits", action="store_true",
                   help="let a 16-bit model's lm_head write 16-bit logits (faster, but near-tied tokens tie)")
    g.add_argument("--skip-warmup", action="store_true",
                   help="on CUDA, skip the start-up run of each prefill size (the first requests then pay "
                   "CUDA's lazy kernel loading)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"],
                   help="auto (the model's dtype) | fp8_e4m3 (scaled per token and head; half the KV bytes)")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM(...) keyword arguments from the engine flags; unset flags keep LLM's defaults."""
    _check_device(args.device)
    kwargs: dict[str, Any] = dict(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                  device=args.device, seed=args.seed,
                                  enable_radix_cache=not args.disable_radix_cache,
                                  attention_backend=args.attention_backend,
                                  kv_cache_dtype=args.kv_cache_dtype)
    if args.disable_cuda_graph:
        kwargs["cuda_graph"] = False
    if args.disable_overlap_schedule:
        kwargs["overlap_schedule"] = False
    chosen = [flag for flag, on in (("--disable-compile", args.disable_compile),
                                    ("--triton-elementwise", args.triton_elementwise),
                                    ("--inductor-elementwise", args.inductor_elementwise)) if on]
    if len(chosen) > 1:
        raise SystemExit(f"{' and '.join(chosen)} exclude each other")
    if args.disable_compile:
        kwargs["compile"] = False
    if args.triton_elementwise:
        kwargs["compile"] = "triton"
    if args.inductor_elementwise:
        kwargs["compile"] = True
    if args.enable_cascade_attention:
        kwargs["cascade_attention"] = True
    if args.disable_fp32_logits:
        kwargs["fp32_logits"] = False
    if args.skip_warmup:
        kwargs["warmup"] = False
    optional = {"max_model_len": args.max_model_len, "chunked_prefill_size": args.chunked_prefill_size,
                "max_running_requests": args.max_running_requests, "cuda_graph_max_bs": args.cuda_graph_max_bs,
                "max_total_tokens": args.max_total_tokens, "kv_cache_bytes": args.kv_cache_bytes,
                "schedule_policy": args.schedule_policy}
    for name, value in optional.items():
        if value is not None:
            if name != "schedule_policy" and value < 1:
                raise CLIError(f"--{name.replace('_', '-')} must be positive, got {value}")
            kwargs[name] = value
    return kwargs


def _check_device(device: str) -> None:
    # torch reports a bad device string as RuntimeError and a missing GPU as AssertionError deep in
    # the model build; catch both here so they read as flag errors.
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CLIError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {device!r} requested but CUDA is not available")


def build_llm(args: argparse.Namespace) -> LLM:
    from rlserve.llm import LLM

    return LLM(**engine_kwargs(args))


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"default {max_tokens}")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1, help="-1 is off")
    g.add_argument("--stop", action="append", default=None, metavar="S",
                   help="stop string; repeat for several")


def sampling_params(args: argparse.Namespace, n: int = 1) -> SamplingParams:
    from rlserve.sampling import SamplingParams

    return SamplingParams(n=n, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, stop=args.stop)


# ---- generate ----
def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CLIError("no prompts: pass them as arguments or with --file")
    return prompts


def cmd_generate(args: argparse.Namespace) -> int:
    raw = prompts = read_prompts(args)
    params = sampling_params(args, n=args.n)   # validated before the (slow) model load
    if args.stream and (len(prompts) > 1 or args.n > 1):
        raise CLIError("--stream takes a single prompt and --n 1")
    if args.system and not args.chat:
        raise CLIError("--system needs --chat")
    llm = build_llm(args)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [llm.apply_chat_template(system + [{"role": "user", "content": p}]) for p in prompts]
    start = time.perf_counter()
    if args.stream:
        generated = len(_print_stream(llm, prompts[0], params).token_ids)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=True)
        generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        _print_outputs(raw, outputs)
    elapsed = time.perf_counter() - start
    print(f"[{len(prompts)} prompt(s), {generated} tokens generated in {elapsed:.2f} s]", file=sys.stderr)
    return 0


def _print_outputs(prompts: Sequence[str], outputs: list) -> None:
    """One completion prints bare; several print under their prompt, numbered."""
    if len(outputs) == 1 and len(outputs[0].outputs) == 1:
        print(outputs[0].outputs[0].text)
        return
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        print(f"=== prompt {i}: {prompt!r}")
        for comp in out.outputs:
            label = f"[{comp.index}] " if len(out.outputs) > 1 else ""
            print(f"{label}{comp.text}")


def _print_stream(llm: LLM, prompt: str, params: SamplingParams) -> CompletionOutput:
    """Print the reply as it grows; return the finished completion."""
    printed = 0
    last = None
    for out in llm.stream(prompt, params):
        last = out.outputs[0]
        if len(last.text) > printed:
            sys.stdout.write(last.text[printed:])
            sys.stdout.flush()
            printed = len(last.text)
    sys.stdout.write("\n")
    sys.stdout.flush()
    assert last is not None     # a stream always ends with the finished output
    return last


# ---- chat ----
def _input_lines(interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    params = sampling_params(args)
    llm = build_llm(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = args.once is None and sys.stdin.isatty()
    if interactive:
        print("rlserve chat — /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    lines: Iterator[str] = iter([args.once]) if args.once is not None else _input_lines(interactive)
    failed = False
    for line in lines:
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": message})
        try:
            reply = _print_stream(llm, llm.apply_chat_template(history), params).text
        except ValueError as e:     # e.g. the conversation outgrew the context; the session goes on
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            failed = True
            continue
        history.append({"role": "assistant", "content": reply})
    return EXIT_USAGE if failed else 0


# ---- bench ----
def cmd_bench_offline(args: argparse.Namespace) -> int:
    from rlserve.bench import offline

    return offline.main(args)


def cmd_bench_serving(args: argparse.Namespace) -> int:
    from rlserve.bench import serving

    return serving.main(args)


# ---- parser ----
def build_parser() -> argparse.ArgumentParser:
    from rlserve.bench import offline

    parser = argparse.ArgumentParser(prog="rlserve", description="rlserve: LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete prompts offline",
                         description="Complete prompts with the in-process engine.")
    gen.add_argument("prompts", nargs="*", metavar="PROMPT")
    gen.add_argument("--file", help="read prompts from a file, one per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--n", type=int, default=1, help="completions per prompt")
    gen.add_argument("--stream", action="store_true", help="print text as it arrives (one prompt)")
    add_sampling_args(gen, max_tokens=128)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat",
                          description="Chat on stdin: one message a line; /reset, /exit. Works on a pipe.")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--once", metavar="MESSAGE", help="reply to one message and exit")
    add_sampling_args(chat, max_tokens=256)
    add_engine_args(chat)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    off = bench_sub.add_parser("offline", help="offline throughput vs transformers and the roofline",
                               description=offline.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    offline.add_arguments(off)
    off.set_defaults(func=cmd_bench_offline)
    from rlserve.bench import serving   # light: httpx is imported only when it runs
    srv = bench_sub.add_parser("serving", help="load a running server: throughput, TTFT, ITL, latency",
                               description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serving.add_arguments(srv)
    srv.set_defaults(func=cmd_bench_serving)

    serve = sub.add_parser("serve", help="OpenAI-compatible and native HTTP server",
                           description="Serve the engine over HTTP (engine in its own process).")
    add_engine_args(serve)
    from rlserve.server.args import add_server_args   # light: FastAPI is imported only when serving
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    tr = sub.add_parser("train", help="RL post-training (colocated GRPO)",
                        description="Train with the engine as the rollout engine: rlserve train --config x.yaml "
                                    "rollout.group_size=8 optim.lr=1e-5")
    tr.add_argument("--config", default=None, help="YAML file (see rlserve.rl.config.TrainConfig)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 task.name=countdown")
    tr.set_defaults(func=lambda a: __import__("rlserve.rl.train", fromlist=["main"]).main(a.config, a.overrides))
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from rlserve.server.app import serve_from_args
    return serve_from_args(args) or 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
