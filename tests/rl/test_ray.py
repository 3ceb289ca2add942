"""Ray placement on a local Ray cluster (CPU): a short server-mode GRPO run with the trainer ranks and
the rollout server as actors in a placement group, colocated (the server shares the trainer's bundle and
releases its memory between rollouts) and disaggregated (separate bundles, weights through a gloo
weight-update group). The reward on the toy task rises (both layouts train the same policy: about 0.58 at
the first step, 0.97 at the sixth), the server ends on the trained policy's weight version, and its
greedy completions equal those of the trainer's final (sharded) checkpoint run in this process."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts

from rlserve.client import Client
from rlserve.llm import LLM
from rlserve.rl.checkpoint import latest_checkpoint
from rlserve.sampling import SamplingParams

ray = pytest.importorskip("ray")

STEPS = 6       # the toy task's reward needs about this many steps at lr 1e-2 to rise clearly
PROMPTS = [[11, 12, 13, 14], [500, 600, 700], [42] * 6]


@pytest.fixture(scope="module")
def local_ray():
    # the actors import rl_toy (the reward and prompts travel to rank 0 by reference to their module)
    ray.init(num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parent)}})
    yield
    ray.shutdown()


def trained_policy_greedy(model_dir: Path, out: Path) -> list[list[int]]:
    """Greedy completions of PROMPTS by the policy in the run's last sharded checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step_dir = latest_checkpoint(out)
    assert step_dir is not None and step_dir.name == f"step_{STEPS - 1:06d}"
    dcp_to_torch_save(step_dir / "model", out / "final.pt")
    weights = torch.load(out / "final.pt", weights_only=False)["model.policy"]
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    llm.engine.model.load_state_dict(weights, strict=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("placement,ranks", [
    ("colocated", 1), pytest.param("disaggregated", 2, marks=pytest.mark.slow)])
def test_ray_placement_trains_and_serves_the_policy(local_ray, tiny_model_dir, tmp_path, placement, ranks):
    from rlserve.rl.cluster.ray import RayPlacement

    model = tiny_model_dir("tiny-llama")
    cfg = toy_config(model, tmp_path, f"steps={STEPS}", "rollout.backend=server", "cluster.backend=ray",
                     f"cluster.placement={placement}", f"trainer.ranks={ranks}", "trainer.fsdp=true",
                     f"checkpoint_every={STEPS}", "cluster.cpus_per_bundle=1")
    with RayPlacement(cfg) as placement_:
        history = placement_.train(share_of_a, partial(toy_prompts, cfg.seed))
        assert [r["step"] for r in history] == list(range(STEPS))
        assert all(r["groups_kept"] == cfg.task.prompts_per_step for r in history)
        rewards = [r["reward"] for r in history]
        end = sum(rewards[-2:]) / 2                    # rewards[0] is the untrained policy's
        assert rewards[0] < 0.75 and end > 0.85 and end - rewards[0] > 0.2, rewards
        with Client(placement_.urls[0], admin_api_key=placement_.admin_api_key) as client:
            info = client.get_server_info()
            assert info["weight_version"] == str(STEPS)      # the final push reached the engine
            if placement == "colocated":     # released after the last rollout, taken back by the final push
                assert info.get("released", []) == []
            served = client.generate(input_ids=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                         "ignore_eos": True})
    assert [list(item["output_ids"]) for item in served] == trained_policy_greedy(model, tmp_path)
