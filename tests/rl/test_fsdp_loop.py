"""The sharded training loop (trainer.ranks=2, gloo, server mode) against the one-process loop: the same
first step (rollout, loss, gradient norm) and the same updated weights within 1e-5; the server ends
serving the trained policy; a run resumed from a sharded checkpoint continues exactly as the
uninterrupted one."""
from __future__ import annotations

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts
from safetensors.torch import load_file

from rlserve.rl.checkpoint import load_checkpoint
from rlserve.rl.train import train

SERVER = ("rollout.backend=server", "rollout.weight_sync=distributed", "algorithm.minibatch_size=16",
          "algorithm.micro_batch_size=3", "kl.coef=0.1", "optim.max_grad_norm=0.5")
COMPARED = ("reward", "pg_loss", "loss", "kl_loss", "grad_norm", "entropy", "clip_fraction", "kl_ref")


def sharded_weights(step_dir, tmp_path) -> dict[str, torch.Tensor]:
    """The policy in a sharded checkpoint, as one state dict (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "model", out)
    return torch.load(out, weights_only=False)["model.policy"]


def run(model_dir, out, *overrides):
    cfg = toy_config(model_dir, out, *SERVER, *overrides)
    return train(cfg, reward_fn=share_of_a, prompts=toy_prompts(cfg.seed))


def test_two_ranks_take_the_one_process_step(tiny_model_dir, tmp_path):
    model = tiny_model_dir("tiny-llama")
    # AdamW's first steps are ±lr wherever a gradient is non-zero, even where it is float32 rounding noise
    # (entries of near-cancelling sums), so the lr bounds how far rounding can move a weight.
    one = run(model, tmp_path / "one", "steps=1", "checkpoint_every=1", "optim.lr=1e-3")
    two = run(model, tmp_path / "two", "steps=1", "checkpoint_every=1", "optim.lr=1e-3", "trainer.ranks=2")
    assert one[0]["prompts_sha1"] == two[0]["prompts_sha1"]
    assert one[0]["optimizer_steps"] == two[0]["optimizer_steps"] == 2     # 32 samples, minibatches of 16
    for key in COMPARED:      # the gradient norm (~5) differs in its float32 rounding: relative 1e-5
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-5), key
    assert one[0]["grad_norm"] > 0.5        # clipping took part
    ref = load_checkpoint(tmp_path / "one/checkpoints/step_000000")["policy"]
    got = sharded_weights(tmp_path / "two/checkpoints/step_000000", tmp_path)
    assert sorted(got) == sorted(ref)
    initial = load_file(model / "model.safetensors")
    moved = 0.0
    for name, p in got.items():
        torch.testing.assert_close(p, ref[name], atol=1e-5, rtol=0)
        if name in initial:
            moved = max(moved, (p - initial[name]).abs().max().item())
    assert moved > 5e-4                     # the step did change the weights


def test_sharded_resume_is_exact(tiny_model_dir, tmp_path):
    model = tiny_model_dir("tiny-llama")
    whole = run(model, tmp_path / "whole", "steps=2", "checkpoint_every=1", "trainer.ranks=2")
    cut = tmp_path / "cut"
    run(model, cut, "steps=1", "checkpoint_every=1", "trainer.ranks=2")
    resumed = run(model, cut, "steps=2", "checkpoint_every=1", "trainer.ranks=2", "resume=true")
    assert [r["step"] for r in resumed] == [0, 1]
    for key in COMPARED:
        assert resumed[1][key] == pytest.approx(whole[1][key], abs=1e-6), key
    a = sharded_weights(tmp_path / "whole/checkpoints/step_000001", tmp_path)
    b = sharded_weights(cut / "checkpoints/step_000001", tmp_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
