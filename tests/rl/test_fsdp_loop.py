"""The sharded training loop (trainer.ranks=2, gloo, server mode) against the one-process loop: the same
first step (rollout, loss, gradient norm) and the same updated weights within 1e-5, with minibatches and
micro-batches that split unevenly over the ranks (one minibatch of a single sample: one rank only pads);
a run resumed from a sharded checkpoint continues exactly as the uninterrupted one."""
from __future__ import annotations

import pytest
import torch
from rl_toy import share_of_a, toy_config, toy_prompts
from safetensors.torch import load_file

from rlserve.rl.checkpoint import load_checkpoint
from rlserve.rl.fsdp_update import rank_chunks
from rlserve.rl.run import train

# 32 samples a step: minibatches of 31 and 1 samples, micro-batches of 4. AdamW's first steps are ±lr
# wherever a gradient is non-zero, even where it is float32 rounding noise (entries of near-cancelling
# sums), so a small lr bounds how far rounding can move a weight.
SERVER = ("rollout.backend=server", "rollout.weight_sync=distributed", "algorithm.minibatch_size=31",
          "algorithm.micro_batch_size=4", "kl.coef=0.1", "optim.max_grad_norm=0.5", "optim.lr=1e-3")
COMPARED = ("reward", "pg_loss", "loss", "kl_loss", "grad_norm", "entropy", "clip_fraction", "kl_ref")


def test_rank_chunks_cover_every_row_once_in_equal_passes():
    rows = list(range(10, 21))                         # 11 rows
    for world in (1, 2, 3, 4):
        for micro in (0, 1, 2, 5):
            per_rank = [rank_chunks(rows, r, world, micro) for r in range(world)]
            # every rank: the same number of passes over the same number of samples
            assert len({tuple(len(part) for part, _ in chunks) for chunks in per_rank}) == 1
            real = [i for chunks in per_rank for part, n in chunks for i in part[:n]]
            assert sorted(real) == rows
            assert all(len(part) <= (micro or len(rows)) for chunks in per_rank for part, _ in chunks)
    assert rank_chunks([7], 1, 2, 0) == [([7], 0)]               # nothing left for rank 1: padding only
    assert rank_chunks([1, 2, 3], 1, 2, 0) == [([2, 1], 1)]


def sharded_weights(step_dir, tmp_path) -> dict[str, torch.Tensor]:
    """The policy in a sharded checkpoint, as one state dict (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir / "model", out)
    return torch.load(out, weights_only=False)["model.policy"]


def run(model_dir, out, *overrides):
    cfg = toy_config(model_dir, out, *SERVER, "checkpoint_every=1", *overrides)
    return train(cfg, reward_fn=share_of_a, prompts=toy_prompts(cfg.seed))


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    return out, run(tiny_model_dir("tiny-llama"), out, "steps=2", "trainer.ranks=2")


def test_two_ranks_take_the_one_process_step(tiny_model_dir, tmp_path, two_ranks):
    model = tiny_model_dir("tiny-llama")
    one = run(model, tmp_path / "one", "steps=1")
    out, two = two_ranks
    assert one[0]["prompts_sha1"] == two[0]["prompts_sha1"]
    assert one[0]["optimizer_steps"] == two[0]["optimizer_steps"] == 2
    for key in COMPARED:      # the gradient norm (~5) differs in its float32 rounding: relative 1e-5
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-5), key
    assert one[0]["grad_norm"] > 0.5        # clipping took part
    ref = load_checkpoint(tmp_path / "one/checkpoints/step_000000")["policy"]
    got = sharded_weights(out / "checkpoints/step_000000", tmp_path)
    assert sorted(got) == sorted(ref)
    initial = load_file(model / "model.safetensors")
    moved = 0.0
    for name, p in got.items():
        torch.testing.assert_close(p, ref[name], atol=1e-5, rtol=0)
        if name in initial:
            moved = max(moved, (p - initial[name]).abs().max().item())
    assert moved > 5e-4                     # the step did change the weights


def test_sharded_resume_is_exact(tiny_model_dir, tmp_path, two_ranks):
    out, whole = two_ranks
    resumed = run(tiny_model_dir("tiny-llama"), tmp_path / "resumed", "steps=2", "trainer.ranks=2",
                  f"resume_from={out}/checkpoints/step_000000")
    assert [r["step"] for r in resumed] == [0, 1]      # the checkpoint's history, then the resumed step
    for key in COMPARED:
        assert resumed[1][key] == pytest.approx(whole[1][key], abs=1e-6), key
    a = sharded_weights(out / "checkpoints/step_000001", tmp_path)
    b = sharded_weights(tmp_path / "resumed/checkpoints/step_000001", tmp_path)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0)
