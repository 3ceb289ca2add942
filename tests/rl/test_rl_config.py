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


def test_the_model_section_is_the_engine_config_by_option_name():
    from rlserve.config import EngineConfig, SchedulePolicy

    default = load_config(None, [])
    assert default.model.engine == EngineConfig(dtype="float32", compile="eager")   # the training defaults
    cfg = load_config(None, ["model.path=tiny-llama", "model.dtype=bfloat16", "model.max_total_tokens=512",
                             "model.schedule_policy=lpm", "model.compile=true", "model.release_kv_cache=true"])
    assert cfg.model.engine == EngineConfig(model="tiny-llama", dtype="bfloat16", compile="inductor").with_options(
        max_total_tokens=512, policy="lpm")
    assert cfg.model.engine.scheduler.policy is SchedulePolicy.LPM and cfg.model.release_kv_cache is True
    assert cfg.model.path == "tiny-llama"


@pytest.mark.parametrize("override, message", [
    ("model.max_totl_tokens=5", "unknown config key 'model.max_totl_tokens'.*known: path, release_kv_cache, .*"
                                "max_total_tokens"),
    ("model.seed=3", "top-level `seed`"),
    ("model.dtype=float8", "dtype must be one of auto, float32, bfloat16, float16"),
    ("model.max_total_tokens=0", "max_total_tokens must be a positive integer"),
])
def test_bad_model_keys_and_values_are_rejected_with_what_is_valid(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_to_dict_writes_what_load_config_reads(tmp_path):
    import yaml

    cfg = load_config(None, ["model.path=tiny-llama", "model.kv_cache_dtype=fp8_e4m3", "model.cuda_graph=false",
                             "steps=3"])
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(path) == cfg


def test_guard_options_default_off_and_are_validated():
    algo = load_config(None, []).algorithm
    assert (algo.log_ratio_clamp, algo.k3_clamp, algo.dual_clip) == (None, None, None)
    cfg = load_config(None, ["algorithm.log_ratio_clamp=20", "algorithm.k3_clamp=10", "algorithm.dual_clip=3",
                             "task.on_invalid_reward=drop"])
    assert (cfg.algorithm.log_ratio_clamp, cfg.algorithm.k3_clamp, cfg.algorithm.dual_clip) == (20.0, 10.0, 3.0)
    assert isinstance(cfg.algorithm.dual_clip, float) and cfg.task.on_invalid_reward == "drop"
    assert load_config(None, []).task.on_invalid_reward == "error"
    for bad, message in [("algorithm.dual_clip=1", "dual_clip must be > 1"), ("algorithm.k3_clamp=0", "k3_clamp"),
                         ("algorithm.log_ratio_clamp=big", "expects a number"),
                         ("task.on_invalid_reward=skip", "on_invalid_reward")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [bad])


def test_trainer_float32_matmul_precision_is_validated_and_set_by_setup(tiny_model_dir, tmp_path):
    """trainer.float32_matmul_precision takes torch's names only, and the trainer's setup applies it to
    its process (TF32 on CUDA for 'high'); the default keeps float32 matmuls exact."""
    import torch
    from rl_toy import share_of_a, toy_config, toy_prompts

    from rlserve.rl.train import setup

    with pytest.raises(ValueError, match="float32_matmul_precision.*highest, high, medium"):
        load_config(None, ["trainer.float32_matmul_precision=tf32"])
    assert load_config(None, []).trainer.float32_matmul_precision == "highest"
    before = torch.get_float32_matmul_precision()
    try:
        cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path, "trainer.float32_matmul_precision=high")
        setup(cfg, share_of_a, toy_prompts(cfg.seed))
        assert torch.get_float32_matmul_precision() == "high"
        cfg = toy_config(tiny_model_dir("tiny-llama"), tmp_path / "b")
        setup(cfg, share_of_a, toy_prompts(cfg.seed))
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
