from __future__ import annotations

import pytest

from rlserve.rl.config import load_config, to_dict


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nrollout:\n  group_size: 4\n  temperature: 0.9\ntask:\n  name: countdown\n")
    cfg = load_config(f, ["rollout.group_size=16", "optim.lr=3e-6", "model.path=tiny-llama"])
    assert cfg.steps == 7 and cfg.rollout.group_size == 16 and cfg.rollout.temperature == 0.9
    assert cfg.optim.lr == 3e-6 and cfg.model.path == "tiny-llama" and cfg.task.name == "countdown"
    assert to_dict(cfg)["rollout"]["group_size"] == 16


@pytest.mark.parametrize("overrides", [["rollout.nope=1"], ["bogus=1"], ["steps"], ["steps.x=1"]])
def test_bad_keys_are_rejected(overrides):
    with pytest.raises(ValueError):
        load_config(None, overrides)


def test_example_configs_load():
    from pathlib import Path
    from rlserve.rl.rewards import BUILTIN_REWARDS
    from rlserve.rl.tasks import TASKS
    examples = sorted(Path(__file__).parents[2].joinpath("examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = load_config(path)
        assert cfg.task.name in TASKS and cfg.task.reward in BUILTIN_REWARDS, path
