"""TensorBoard scalars read back from the event file; the PNG of metrics.jsonl is a real image."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("matplotlib")

from rlserve.rl.plots import TensorBoardLogger, plot_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def full_run(steps: int = 10) -> list[dict]:
    rows = []
    for s in range(steps):
        row = {"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "entropy": 2.0 - 0.1 * s,
               "response_length": 20 + s, "loss": 1.0 / (s + 1)}
        if (s + 1) % 5 == 0:
            row["eval_accuracy"] = 0.2 + 0.05 * s     # sparse: every fifth step
        rows.append(row)
    return rows


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path / "tb") as tb:
        for s in range(3):
            tb.log(s, {"step": s, "reward": 0.5 * s, "loss": 2 - s, "note": "text", "done": True,
                       "lengths": [1, 2]})
        tb.log(3, {"eval_accuracy": 0.75})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["eval_accuracy", "loss", "reward"]
    rewards = acc.Scalars("reward")
    assert [e.step for e in rewards] == [0, 1, 2]
    assert [e.value for e in rewards] == pytest.approx([0.0, 0.5, 1.0])
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([2, 1, 0])
    assert [(e.step, e.value) for e in acc.Scalars("eval_accuracy")] == [(3, pytest.approx(0.75))]


def check_png(path) -> tuple[int, int]:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0              # something was drawn
    return image.shape[0], image.shape[1]


def test_plot_all_panels(tmp_path):
    jsonl = write_metrics(tmp_path / "metrics.jsonl", full_run())
    png = plot_metrics(jsonl, tmp_path / "out" / "metrics.png")
    assert png == tmp_path / "out" / "metrics.png"
    height, width = check_png(png)
    assert width > height                # five panels: a 2 x 3 grid


def test_plot_with_missing_keys_and_aliases(tmp_path):
    # Today's loop logs reward, loss and sparse held-out accuracy only; KL, entropy and length are absent.
    rows = [{"step": s, "reward_mean": 0.1 * s, "loss": 0.5} for s in range(6)]
    rows[-1]["eval_accuracy"] = 0.4
    png = plot_metrics(write_metrics(tmp_path / "m.jsonl", rows), tmp_path / "m.png", title="two panels")
    check_png(png)


def test_plot_without_any_known_metric(tmp_path):
    jsonl = write_metrics(tmp_path / "m.jsonl", [{"step": 0, "loss": 1.0}])
    with pytest.raises(ValueError, match="none of the plotted metrics"):
        plot_metrics(jsonl, tmp_path / "m.png")
