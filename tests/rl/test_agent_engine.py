"""Agentic rollouts on the in-process engine (tiny random model, fp32): multi-turn samples whose
trainer-recomputed logprobs equal the engine's on every generated token, a Rollout whose mask is the
loss mask, and an update that ignores the masked-out tool tokens."""
from __future__ import annotations

import random
from typing import Any

import torch

from rlserve import LLM
from rlserve.rl.agent.rollout import agent_rollout
from rlserve.rl.agent.tools import AgentTool
from rlserve.rl.algorithms import discounted_returns, gae, policy_loss
from rlserve.rl.config import load_config
from rlserve.rl.logprobs import completion_logprobs
from rlserve.tool_parsing import ToolCall


async def _echo(text: str) -> str:
    return f"echo: {text[:20]}"


ECHO = AgentTool("echo", "repeat", {"type": "object", "properties": {"text": {"type": "string"}}}, _echo)


def _every_turn_calls_echo(text: str) -> list[ToolCall]:
    return [ToolCall("echo", {"text": text})]     # never an answer: every sample runs max_turns


def _cfg(temperature: float) -> Any:
    cfg = load_config(None, ["rollout.agent.enabled=true", "rollout.agent.max_turns=4",
                             "rollout.agent.max_turn_tokens=20", "rollout.max_tokens=400",
                             "rollout.group_size=3", f"rollout.temperature={temperature}"]).rollout
    # A random model seldom samples its end-of-turn token: a third of the vocabulary ends a turn instead
    # (a stop condition only, the sampled distribution and its logprobs are unchanged).
    cfg.constraint = {"stop_token_ids": list(range(0, 49152, 3))}
    return cfg


def _prompts(llm: LLM, n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [llm.encode(llm.apply_chat_template([{"role": "user", "content": " ".join(
        rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(2, 8)))}]))[1]
            for _ in range(n)]


def test_multi_turn_trainer_logprobs_equal_engine_fp32(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("tiny-qwen3")))
    for temperature in (1.0, 0.7):
        cfg = _cfg(temperature)
        prompts = _prompts(llm, 4)
        rollout = agent_rollout(llm, cfg, prompts, [{}] * 4, lambda p, c, **_: 0.0, seed=11, tools=[ECHO],
                                parser=_every_turn_calls_echo)
        assert len(rollout.prompt_ids) == 12 and rollout.group_size == 3
        assert rollout.prompt_ids[:3] == [prompts[0]] * 3
        mask = rollout.mask
        # several generated runs separated by tool segments: the mask has holes
        runs = [(torch.diff(m[:int(m.nonzero().max()) + 1], prepend=torch.zeros(1)) == 1).sum().item()
                for m in mask]
        assert min(runs) >= 3, runs
        assert (mask.sum(-1) < torch.tensor([len(c) for c in rollout.completion_ids])).all()
        assert len({tuple(c) for c in rollout.completion_ids}) > 1      # distinct seeds in a group
        with torch.no_grad():
            trainer = completion_logprobs(llm.engine.model, rollout.prompt_ids, rollout.completion_ids,
                                          temperature)
        for i, lp in enumerate(trainer):
            m = mask[i, :len(lp)].bool()
            diff = (lp[m] - rollout.engine_logprobs[i, :len(lp)][m]).abs().max().item()
            assert diff < 1e-4, (temperature, i, diff)
            assert (rollout.engine_logprobs[i, :len(lp)][~m] == 0).all()
        assert llm.engine.kv_leaked() == 0


def test_masked_tokens_contribute_nothing_to_the_loss_and_returns():
    torch.manual_seed(0)
    logp = torch.randn(2, 10, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(2, 10)
    adv = torch.randn(2, 10)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
    loss, _ = policy_loss(logp, old, adv, mask, agg="token-mean")
    loss.backward()
    assert logp.grad is not None and (logp.grad[mask == 0] == 0).all() and (logp.grad[mask == 1] != 0).all()
    # changing anything at masked positions changes nothing
    old2, adv2 = old.clone(), adv.clone()
    old2[mask == 0] += 5.0
    adv2[mask == 0] -= 3.0
    assert torch.equal(policy_loss(logp, old2, adv2, mask)[0], loss)
    # a reward at the end reaches every generated token across the holes (γ = 1), and GAE bootstraps
    # over them: the values at masked positions are never read
    rewards = torch.zeros(2, 10)
    rewards[0, 7], rewards[1, 4] = 1.0, 1.0
    ret = discounted_returns(rewards, mask)
    assert torch.equal(ret, mask)
    values = torch.randn(2, 10)
    adv_a, _ = gae(rewards, values, mask)
    values[mask == 0] = 100.0
    adv_b, _ = gae(rewards, values, mask)
    assert torch.allclose(adv_a, adv_b)
    # with values 0 and λ = γ = 1 every generated token's advantage is the final reward
    adv_c, _ = gae(rewards, torch.zeros(2, 10), mask)
    assert torch.equal(adv_c, mask)
