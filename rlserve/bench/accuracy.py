"""Accuracy of quantized weights against the same model in float, on a fixed English corpus.

The corpus (rlserve/bench/data/accuracy_corpus.txt, about 2,900 SmolLM2 tokens of self-written prose)
is cut into windows of --window tokens. Over every next-token prediction in them:
  perplexity        exp(mean negative log-likelihood of the corpus' next token), for each model;
  mean KL           KL(float || quantized) of the next-token distributions, in nats, averaged over positions.
Then --num-prompts prompts (the first --prompt-tokens tokens of windows spread over the corpus) are
continued greedily for --max-tokens tokens by each engine (ignore_eos):
  prefix agreement  tokens before each continuation first differs from the float one / all tokens;
  position match    tokens equal at the same position / all tokens (after a divergence the two
                    continuations condition on different text, so this mostly counts re-convergence).
fp8 off CUDA runs the FP8 kernel's arithmetic in float32 (rlserve/bench/fp8_emulation.py); compare it with
--dtype bfloat16, the dtype an FP8 engine runs its other layers in.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

CORPUS = Path(__file__).parent / "data" / "accuracy_corpus.txt"


@dataclass
class ModeResult:
    mode: str                       # "float" or a quantization method
    perplexity: float
    mean_kl: float                  # vs the float model; 0 for it
    prefix_agreement: float
    position_match: float


def corpus_ids(tokenizer: Any) -> list[int]:
    ids: list[int] = tokenizer(CORPUS.read_text())["input_ids"]
    return ids


def windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i:i + size] for i in range(0, len(ids) - 1, size) if len(ids[i:i + size]) > 1]


@torch.no_grad()
def log_probs(model: Any, window: list[int], device: torch.device) -> torch.Tensor:
    """Next-token log-probabilities [len - 1, vocab] of one window (the model's plain causal forward)."""
    ids = torch.tensor(window, device=device)
    hidden = model(ids, torch.arange(len(window), device=device), cu_seqlens=[0, len(window)])
    return torch.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1)


def greedy_agreement(tokens: list[list[int]], ref: list[list[int]]) -> tuple[float, float]:
    """(prefix agreement, position match) of continuations against the reference ones."""
    total = sum(len(r) for r in ref)
    prefix = same = 0
    for a, b in zip(tokens, ref):
        diverged = False
        for s, t in zip(a, b):
            diverged = diverged or s != t
            prefix += not diverged
            same += s == t
    return prefix / total, same / total


def run_accuracy(methods: Sequence[str], model: str | None = None, device: str = "cpu", dtype: str = "auto",
                 group_size: int = 32, window: int = 512, num_prompts: int = 32, prompt_tokens: int = 16,
                 max_tokens: int = 64) -> tuple[list[ModeResult], int]:
    """One row per mode (float first) and the corpus' length in tokens."""
    from rlserve.llm import LLM
    from rlserve.sampling import SamplingParams

    base: dict[str, Any] = {"model": model, "device": device, "dtype": dtype, "max_total_tokens": 8192}
    ref_llm = LLM(**base)
    engine = ref_llm.engine
    ids = corpus_ids(engine.tokenizer)
    wins = windows(ids, window)
    step = max(1, (len(ids) - prompt_tokens) // num_prompts)
    prompts = [ids[i * step:i * step + prompt_tokens] for i in range(num_prompts)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def continuations(llm: Any) -> list[list[int]]:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    def nll(lps: torch.Tensor, win: list[int]) -> torch.Tensor:
        return -lps.gather(1, torch.tensor(win[1:], device=lps.device)[:, None]).squeeze(1)

    ref_tokens = continuations(ref_llm)
    ref_nll = torch.cat([nll(log_probs(ref_llm.engine.model, w, engine.device), w) for w in wins])
    results = [ModeResult("float", math.exp(ref_nll.mean().item()), 0.0, 1.0, 1.0)]
    for method in methods:
        if method == "fp8" and not device.startswith("cuda"):   # no FP8 matmuls here: their arithmetic
            from rlserve.bench.fp8_emulation import emulate_fp8
            llm = LLM(**base)
            emulate_fp8(llm.engine.model)
        else:
            llm = LLM(**base, quantization=method, quantization_group_size=group_size)
        nlls, kls = [], []
        for w in wins:
            p = log_probs(ref_llm.engine.model, w, engine.device)
            q = log_probs(llm.engine.model, w, engine.device)
            nlls.append(nll(q, w))
            kls.append((p.exp() * (p - q)).sum(-1))
        prefix, same = greedy_agreement(continuations(llm), ref_tokens)
        results.append(ModeResult(method, math.exp(torch.cat(nlls).mean().item()), torch.cat(kls).mean().item(),
                                  prefix, same))
        del llm
    return results, len(ids)


def report(results: list[ModeResult], num_tokens: int, num_prompts: int, max_tokens: int) -> str:
    lines = [f"corpus: {num_tokens} tokens; greedy: {num_prompts} prompts x {max_tokens} tokens",
             "| mode | perplexity | mean KL vs float (nats) | greedy prefix agreement | greedy position match |",
             "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.perplexity:.3f} | {r.mean_kl:.4f} | {r.prefix_agreement:.1%} | "
                     f"{r.position_match:.1%} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantization", default="int8,int4",
                        help="comma-separated methods to compare with float (default int8,int4)")
    parser.add_argument("--model", default=None, help="model path or preset (default: the default model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="the float model's dtype (and the quantized one's)")
    parser.add_argument("--quantization-group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--window", type=int, default=512, help="tokens per perplexity window")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json-out", metavar="FILE", help="append the results as one JSON line")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="rlserve bench accuracy", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(parser)
        args = parser.parse_args(args)
    methods = [m for m in args.quantization.split(",") if m]
    results, num_tokens = run_accuracy(methods, args.model, args.device, args.dtype, args.quantization_group_size,
                                       args.window, args.num_prompts, args.prompt_tokens, args.max_tokens)
    print(report(results, num_tokens, args.num_prompts, args.max_tokens))
    if args.json_out:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:],
                  "results": [asdict(r) for r in results]}
        with open(args.json_out, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0
