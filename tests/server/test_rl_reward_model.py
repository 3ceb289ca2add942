"""RL with task.reward: model: a served tiny reward model (its /classify) gives the rewards."""
from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rl"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pooling"))
from pooling_models import make_qwen2_rm  # noqa: E402
from rl_toy import toy_config, toy_prompts  # noqa: E402

from rlserve.rl.reward_model import RewardModel  # noqa: E402


class Recording(RewardModel):
    """The configured reward model, remembering each (text scored, reward) it gave."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.seen: list[tuple[str, float]] = []

    async def __call__(self, prompt: str, completion: str, **fields) -> float:
        reward = await super().__call__(prompt, completion, **fields)
        self.seen.append((prompt + completion, reward))
        return reward


@pytest.fixture(scope="module")
def rm_server(server_factory, tmp_path_factory, default_model_dir):
    path = make_qwen2_rm(tmp_path_factory.mktemp("tiny-qwen2-rm"), default_model_dir)
    return server_factory(["--model", str(path), "--dtype", "float32", "--max-model-len", "256"]).wait_ready()


def test_training_rewards_are_the_served_reward_models_scores(rm_server, tiny_model_dir, tmp_path):
    from rlserve.rl.train import setup, train
    cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "steps=2", "task.prompts_per_step=2",
                     "rollout.group_size=4", "task.reward=model", f"task.reward_model.url={rm_server.url}",
                     "task.reward_model.weight=2.0", "task.reward_model.rule=format", "task.reward_model.rule_weight=0.0")
    assert isinstance(setup(cfg, prompts=toy_prompts(cfg.seed)).reward_fn, RewardModel)   # built from the config
    fn = Recording(cfg.task.reward_model)
    records = train(cfg, reward_fn=fn, prompts=toy_prompts(cfg.seed))
    assert len(records) == 2 and len(fn.seen) == 2 * 2 * 4
    for text, reward in fn.seen:
        served = httpx.post(rm_server.url + "/classify", json={"text": text}, timeout=60).json()["embedding"][0]
        assert abs(reward - 2.0 * served) < 1e-5
    first = [r for _, r in fn.seen[:8]]
    assert abs(records[0]["reward"] - sum(first) / len(first)) < 1e-5
    assert len({round(r, 6) for _, r in fn.seen}) > 1        # the scores differ between completions
