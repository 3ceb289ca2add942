"""model.release_kv_cache: the engine's KV pool is freed while the trainer works and back for the next
rollout; training is otherwise unchanged (same seeded metrics)."""
from __future__ import annotations

from rl_toy import toy_train

from rlserve.llm import LLM

KEYS = ("prompts_sha1", "reward", "loss", "entropy", "grad_norm")


def test_released_pool_during_update_changes_nothing_else(tiny_model_dir, tmp_path, monkeypatch):
    model = tiny_model_dir("tiny-llama")
    plain = toy_train(model, tmp_path / "a", "steps=3")
    seen: list[tuple[str, ...]] = []
    original = LLM.release_memory

    def spy(self, tags=("kv_cache", "weights")):
        original(self, tags)
        seen.append(self.engine.status().released)
    monkeypatch.setattr(LLM, "release_memory", spy)
    released = toy_train(model, tmp_path / "b", "steps=3", "model.release_kv_cache=true")
    assert seen == [("kv_cache",)] * 3            # released once a step (the weights stay)
    assert [{k: r[k] for k in KEYS} for r in released] == [{k: r[k] for k in KEYS} for r in plain]
