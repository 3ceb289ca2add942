"""The `rlserve` command: generate, chat, bench, serve (`--dp N`: several behind a router), router and train.

This module only parses arguments and dispatches. The engine flags, and the EngineConfig they describe,
come from rlserve.config_args; the benchmarks' flags are read only once `bench` runs, so `rlserve --help`
imports no benchmark code. Bad values end in one `error: ...` line on stderr and exit status 2, never a
traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rlserve.config_args import add_engine_args, engine_config_from_args

if TYPE_CHECKING:
    from rlserve.llm import LLM
    from rlserve.outputs import CompletionOutput
    from rlserve.sampling import SamplingParams

EXIT_USAGE = 2


class CLIError(ValueError):
    """A bad flag value or input found by the CLI itself."""


# ---- shared flags ----
def build_llm(args: argparse.Namespace) -> LLM:
    from rlserve.llm import LLM

    return LLM(config=engine_config_from_args(args))


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
def build_bench_parser(prog: str = "rlserve bench") -> argparse.ArgumentParser:
    """The `bench` subcommands; imports the benchmark modules, so only `bench` itself calls it."""
    from rlserve.bench import accuracy, offline, serving  # serving is light: httpx is imported only when it runs

    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks of rlserve.")
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    off = sub.add_parser("offline", help="offline throughput vs transformers and the roofline",
                         description=offline.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    offline.add_arguments(off)
    off.set_defaults(func=offline.main)
    srv = sub.add_parser("serving", help="load a running server: throughput, TTFT, ITL, latency",
                         description=serving.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serving.add_arguments(srv)
    srv.set_defaults(func=serving.main)
    acc = sub.add_parser("accuracy", help="quantized weights vs float: perplexity, KL, greedy agreement",
                         description=accuracy.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    accuracy.add_arguments(acc)
    acc.set_defaults(func=accuracy.main)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    bench_args = build_bench_parser().parse_args(args.bench_args)
    return int(bench_args.func(bench_args) or 0)


# ---- parser ----
def build_parser() -> argparse.ArgumentParser:
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

    # Everything after `bench` goes to build_bench_parser (prefix_chars: no flag is read here).
    bench = sub.add_parser("bench", help="benchmarks: offline, serving (rlserve bench --help)", add_help=False,
                           prefix_chars="\x00")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="OpenAI-compatible and native HTTP server",
                           description="Serve the engine over HTTP (engine in its own process).")
    from rlserve.server.args import add_serve_args  # light: FastAPI is imported only when serving
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    from rlserve.router.commands import add_router_command_args  # light: the router starts as a process
    rt = sub.add_parser("router", help="sglang-router in front of rlserve servers started elsewhere",
                        description="Route requests over running servers (docs/router.md).")
    add_router_command_args(rt)
    rt.set_defaults(func=cmd_router)

    tr = sub.add_parser("train", help="RL post-training (colocated GRPO)",
                        description="Train with the engine as the rollout engine: rlserve train --config x.yaml "
                                    "rollout.group_size=8 optim.lr=1e-5")
    tr.add_argument("--config", default=None, help="YAML file (see rlserve.rl.config.TrainConfig)")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. steps=100 task.name=countdown")
    tr.set_defaults(func=lambda a: __import__("rlserve.rl.run", fromlist=["main"]).main(a.config, a.overrides))
    return parser


def cmd_serve(args: argparse.Namespace) -> int:
    from rlserve.server.app import serve_from_args
    return serve_from_args(args) or 0


def cmd_router(args: argparse.Namespace) -> int:
    from rlserve.router.commands import router_from_args
    return router_from_args(args)


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
