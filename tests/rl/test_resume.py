"""Kill and resume: a run SIGKILLed after its step-3 checkpoint and resumed from it produces the same
steps 4–6 (sampled prompts, rewards, losses, every logged number) as a run that was never interrupted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rl_toy import toy_train

from rlserve.rl.checkpoint import latest_checkpoint, list_checkpoints

# minibatches, two epochs and a warmup schedule: every piece of state a checkpoint must carry is in play
RUN = ("steps=6", "checkpoint_every=3", "checkpoint_keep=3", "task.prompts_per_step=2", "algorithm.minibatch_size=8",
       "algorithm.ppo_epochs=2", "optim.warmup_steps=4")


def _without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith("_s")}


def _train_until_killed(model_dir: Path, out: Path) -> None:
    """Train in a child process and SIGKILL it as soon as the checkpoint after step 3 is complete."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; from rl_toy import toy_train; "
              "toy_train(Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:])")
    child = subprocess.Popen([sys.executable, "-c", script, str(Path(__file__).parent), str(model_dir), str(out), *RUN],
                             env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "step_000002" / "state.pt"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            if child.poll() is not None:
                raise AssertionError(f"trainer exited early: {child.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no step-3 checkpoint within 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()


@pytest.fixture
def one_thread():
    """The killed trainer runs with one thread; float sums over other thread counts round differently,
    so the in-process runs use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_kill_and_resume_reproduces_the_next_steps(tiny_model_dir, tmp_path, one_thread):
    model_dir = tiny_model_dir("tiny-llama")
    reference = toy_train(model_dir, tmp_path / "straight", *RUN)

    resumed_dir = tmp_path / "killed"
    _train_until_killed(model_dir, resumed_dir)
    # killed before the end: the step-6 checkpoint was never written
    assert latest_checkpoint(resumed_dir).name == "step_000002"
    resumed = toy_train(model_dir, resumed_dir, *RUN, "resume=true")

    assert [r["step"] for r in resumed] == list(range(6))
    for straight, again in zip(reference[3:], resumed[3:]):
        assert _without_timings(again) == _without_timings(straight)
    assert len({r["prompts_sha1"] for r in reference}) == 6            # the steps really differ
    # metrics.jsonl holds each step once: lines the killed run wrote after its checkpoint are replaced
    lines = [json.loads(line) for line in (resumed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(6))
    assert [p.name for p in list_checkpoints(resumed_dir)] == ["step_000002", "step_000005"]
    assert not [p for p in (resumed_dir / "checkpoints").iterdir() if p.name.startswith(".tmp")]
