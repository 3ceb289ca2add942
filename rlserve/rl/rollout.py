"""Rollout with the colocated engine: n completions per prompt, the engine's logprobs of what it
sampled, and the rewards. A remote engine would implement the same `generate_rollout` over HTTP."""
from __future__ import annotations

from typing import Any

import torch

from rlserve.llm import LLM
from rlserve.rl.batch import Rollout, pad
from rlserve.rl.config import RolloutSection
from rlserve.rl.rewards import RewardFn, score_batch
from rlserve.sampling import SamplingParams

Sample = dict[str, Any]


def encode_prompt(llm: LLM, sample: Sample) -> tuple[list[int], dict[str, Any]]:
    """(prompt token ids, the ground-truth fields for the reward). A prompt is text, chat messages
    (rendered with the model's chat template) or token ids."""
    prompt = sample["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        prompt = llm.apply_chat_template(prompt)
    fields = {k: v for k, v in sample.items() if k != "prompt"}
    return llm.encode(prompt)[1], fields


def generate_rollout(llm: LLM, cfg: RolloutSection, prompts: list[list[int]], fields: list[dict[str, Any]],
                     reward_fn: RewardFn, seed: int) -> Rollout:
    """Sample cfg.group_size completions per prompt. Prompt i draws with seeds seed + i·n … seed + i·n + n − 1,
    so a step's samples depend only on its seed and the weights."""
    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                             seed=seed + i * cfg.group_size, logprobs=0, logprobs_mode="tempered",
                             ignore_eos=cfg.ignore_eos,
                             **(cfg.constraint or {}))
              for i in range(len(prompts))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    prompt_ids, completion_ids, texts, engine_lps, prompt_texts, sample_fields = [], [], [], [], [], []
    for ids, out, f in zip(prompts, outs, fields):
        for c in out.outputs:
            prompt_ids.append(ids)
            completion_ids.append(list(c.token_ids))
            texts.append(c.text)
            assert c.logprobs is not None       # rollouts always ask for logprobs
            engine_lps.append(torch.tensor([d[t] for d, t in zip(c.logprobs, c.token_ids)], dtype=torch.float32))
            prompt_texts.append(out.prompt or "")
            sample_fields.append(f)
    rewards = torch.tensor(score_batch(reward_fn, prompt_texts, texts, sample_fields), dtype=torch.float32)
    mask = pad([torch.ones(len(c)) for c in completion_ids])
    return Rollout(prompt_ids, completion_ids, texts, pad(engine_lps, mask.shape[1]), mask, rewards, cfg.group_size)


def greedy_accuracy(llm: LLM, samples: list[Sample], reward_fn: RewardFn, max_tokens: int) -> float:
    """Mean reward of greedy completions (held-out evaluation)."""
    encoded = [encode_prompt(llm, s) for s in samples]
    outs = llm.generate([ids for ids, _ in encoded], SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    scores = score_batch(reward_fn, [o.prompt or "" for o in outs], [o.outputs[0].text for o in outs],
                         [f for _, f in encoded])
    return sum(scores) / len(scores)
