"""The offline workload: nano-vllm's bench.py request mix, drawn in its order."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    prompt_token_ids: list[list[int]]
    max_tokens: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def input_tokens(self) -> int:
        return sum(map(len, self.prompt_token_ids))

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_prompts: int = 256, min_input: int = 100, max_input: int = 1024,
                  min_output: int = 100, max_output: int = 1024, seed: int = 0,
                  max_token_id: int = 10000) -> Workload:
    """nano-vllm's draw order: every prompt (its length, then its ids) first, then every max_tokens."""
    if not 1 <= min_input <= max_input or not 1 <= min_output <= max_output or num_prompts < 1:
        raise ValueError(f"bad workload: need num prompts >= 1 (got {num_prompts}), 1 <= min input <= max input "
                         f"(got {min_input}, {max_input}), 1 <= min output <= max output "
                         f"(got {min_output}, {max_output})")
    rng = random.Random(seed)     # the same stream as random.seed(seed), without touching global state
    prompts = [[rng.randint(0, max_token_id) for _ in range(rng.randint(min_input, max_input))]
               for _ in range(num_prompts)]
    max_tokens = [rng.randint(min_output, max_output) for _ in range(num_prompts)]
    return Workload(prompts, max_tokens)
