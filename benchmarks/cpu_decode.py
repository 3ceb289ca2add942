"""Batch-1 decode on a CPU, float vs quantized weights, beside transformers in the same run, and where a
step's time goes (torch.profiler): matmuls (GEMV at batch 1), attention, other ops, and the rest of the
wall time (Python, the dispatcher, the engine's bookkeeping). Every run is timed in `--rounds` windows
taken in turns, and the medians are reported: on a shared machine one run's speed swings by a fifth
between windows a minute apart, and turns spread such a swing over every run alike.

`python benchmarks/cpu_decode.py --modes float,int8,int4 --tokens 128`
`python benchmarks/cpu_decode.py --modes float,int4 --tokens 128 --concurrent 32 --no-hf` (32 requests of the
same prompt decoding together: output tok/s of the decode phase, the batched-decode figure beside the
prefill-heavy `rlserve bench offline` one)
`python benchmarks/cpu_decode.py --modes int4 --no-hf --elementwise inductor` (torch.compile'd elementwise
chains instead of eager ops: on a 2-core CPU at batch 1 their guards cost more than the ops they fuse)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch.profiler import ProfilerActivity, profile

from rlserve import LLM, SamplingParams

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu",
           "aten::linear", "aten::matmul"}
ATTENTION = ("attention", "softmax", "sdpa", "flash")
PROMPT = "The capital of France is Paris. Tell me about the history of the city, its rivers and its bridges."


def decode_tok_s(step: Callable[[], object], steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t)


class RlserveDecode:
    """One engine (a mode: float|int8|int4|gguf, optionally :dtype) and fresh decode windows on it."""

    def __init__(self, mode: str, tokens: int, profile_steps: int, concurrent: int = 1,
                 elementwise: str = "auto") -> None:
        method, _, dtype = mode.partition(":")      # e.g. int8:bfloat16 (the model's other layers in bf16)
        self.llm = LLM(quantization=None if method == "float" else method, dtype=dtype or "auto",
                       compile=elementwise, max_total_tokens=max(4096, concurrent * (tokens + profile_steps + 64)))
        self.tokens, self.profile_steps, self.concurrent = tokens, profile_steps, concurrent
        self.ids = self.llm.engine.tokenizer(PROMPT)["input_ids"]
        self.llm.generate([self.ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                          use_tqdm=False)                                               # warm-up

    def _start(self, steps: int) -> None:
        """`concurrent` fresh requests, prefilled (untimed) and one decode step in."""
        e = self.llm.engine
        for _ in range(self.concurrent):
            e.add_request(self.ids, SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True))
        while (s := e.status()).waiting or s.chunked:
            e.step()
        e.step()

    def _finish(self) -> None:
        while self.llm.engine.has_unfinished():
            self.llm.engine.step()

    def window(self) -> float:
        """Output tok/s over `tokens` decode steps of fresh requests."""
        self._start(self.tokens)
        tok_s = self.concurrent * decode_tok_s(self.llm.engine.step, self.tokens)
        self._finish()
        return tok_s

    def profiled(self, top: int = 0) -> dict[str, float]:
        """The profiled split of `profile_steps` decode steps."""
        self._start(self.profile_steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(self.profile_steps):
                self.llm.engine.step()
            wall = time.perf_counter() - t
        self._finish()
        if top:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
        return breakdown(prof, wall, self.profile_steps)


def breakdown(prof: profile, wall: float, steps: int) -> dict[str, float]:
    """ms per step: matmuls, attention, other aten ops (self time, so nothing counts twice), and the rest."""
    out = {"matmul": 0.0, "attention": 0.0, "other ops": 0.0}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        ms = ev.self_cpu_time_total / 1e3 / steps
        if ev.key in MATMULS:
            out["matmul"] += ms
        elif any(a in ev.key for a in ATTENTION):
            out["attention"] += ms
        else:
            out["other ops"] += ms
    out["wall"] = wall * 1e3 / steps
    out["python + dispatch"] = out["wall"] - out["matmul"] - out["attention"] - out["other ops"]
    return out


class HfDecode:
    """transformers on the same float32 weights: greedy `generate`, prefill subtracted."""

    def __init__(self, tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlserve.models.default import ensure_default_model

        path = ensure_default_model()
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.ids = AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt")["input_ids"]
        self.tokens = tokens
        self._generate(8)                                                        # warm-up

    @torch.no_grad()
    def _generate(self, n: int) -> float:
        t = time.perf_counter()
        self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    def window(self) -> float:
        return self.tokens / (self._generate(self.tokens + 1) - self._generate(1))


def summary(values: list[float], baseline: list[float] | None = None) -> str:
    """Median tok/s over the rounds, its range, and (beside a baseline) the median per-round ratio."""
    text = f"{statistics.median(values):.1f} tok/s (rounds {min(values):.1f}-{max(values):.1f})"
    if baseline:
        ratio = statistics.median(v / b for v, b in zip(values, baseline))
        text += f", {ratio:.0%} of llama.cpp"
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="float,int8,int4", help="float|int8|int4|gguf, each optionally :dtype")
    ap.add_argument("--tokens", type=int, default=128, help="decode steps timed per window")
    ap.add_argument("--rounds", type=int, default=5,
                    help="timed windows per run, taken in turns (llama.cpp, transformers, each mode, then "
                         "again): the median is reported, and beside llama.cpp the median per-round ratio, "
                         "so a stretch where the machine slows down hits every run alike")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--concurrent", type=int, default=1,
                    help="requests decoding at once (the same prompt; tok/s counts all of them)")
    ap.add_argument("--top", type=int, default=0, help="also print the profile's N costliest ops")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also llama.cpp on the GGUF the default model comes from (needs rlserve[llamacpp])")
    ap.add_argument("--elementwise", default="auto", help="auto|inductor|eager: how norms, rotary and the "
                    "gated activation run (auto is eager on a CPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    # Figures are only comparable on a quiet machine: say how busy it was.
    print(f"torch {torch.__version__}, {threads} threads, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.2f}")
    runs: dict[str, Callable[[], float]] = {}
    with ExitStack() as stack:
        if a.llama_cpp:
            from llama_cpp_peer import batch1_peer, concurrent_peer
            peer = (batch1_peer(PROMPT, a.tokens, threads) if a.concurrent == 1
                    else concurrent_peer(PROMPT, a.concurrent, a.tokens, threads))
            label = "llama.cpp (Q4_1 GGUF)" + (f" x{a.concurrent}, 24-token prompts" if a.concurrent > 1 else "")
            runs[label] = stack.enter_context(peer)
        if not a.no_hf and a.concurrent == 1:
            runs["transformers (float32)"] = HfDecode(a.tokens).window
        engines = {f"rlserve {m} x{a.concurrent}": RlserveDecode(m, a.tokens, a.profile_steps, a.concurrent,
                                                                a.elementwise) for m in a.modes.split(",")}
        runs.update({name: engine.window for name, engine in engines.items()})
        results: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, window in runs.items():
                results[name].append(window())
    baseline = next((v for k, v in results.items() if k.startswith("llama.cpp")), None)
    for name, values in results.items():
        line = f"{name}: {summary(values, None if name.startswith('llama.cpp') else baseline)}"
        if name in engines:
            parts = engines[name].profiled(a.top)
            line += "; profiled ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(line)


if __name__ == "__main__":
    main()
