"""Training logs beyond the JSONL file: TensorBoard scalars while a run goes, and a PNG of the main
curves (reward, held-out accuracy, KL, entropy, response length) drawn from metrics.jsonl afterwards.

tensorboard and matplotlib come with the `rl` extra and are imported only here.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TensorBoardLogger:
    """One TensorBoard scalar per numeric metric: `TensorBoardLogger(dir).log(step, record)`."""

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, record: dict[str, Any]) -> None:
        # bools are ints to Python but flags, not curves; strings and lists have no scalar form
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]     # the metric's name and its known aliases; the first one present is drawn
    ylabel: str


PANELS = (
    Panel("Reward (train)", ("reward", "reward_mean"), "mean reward"),
    Panel("Held-out accuracy", ("eval_accuracy", "heldout_accuracy", "eval_reward"), "greedy accuracy"),
    Panel("KL to reference", ("kl_ref", "kl", "kl_mean"), "KL"),
    Panel("Entropy", ("entropy", "entropy_mean"), "nats / token"),
    Panel("Response length", ("response_length", "response_length_mean", "completion_length"), "tokens"),
)


def read_metrics(jsonl_path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(jsonl_path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def _series(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str, list[float], list[float]] | None:
    """(key, steps, values) of the first alias that any row holds; rows without it are skipped, which is
    how sparse metrics (held-out accuracy every few steps) come out as their own points."""
    for key in keys:
        points = [(row.get("step", i), row[key]) for i, row in enumerate(rows)
                  if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)]
        if points:
            return key, [p[0] for p in points], [p[1] for p in points]
    return None


def plot_metrics(jsonl_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Draw one panel per curve present in metrics.jsonl into a PNG; returns the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")          # no display on training machines
    import matplotlib.pyplot as plt

    rows = read_metrics(jsonl_path)
    drawn = [(panel, s) for panel in PANELS if (s := _series(rows, panel.keys)) is not None]
    if not drawn:
        known = ", ".join(k for p in PANELS for k in p.keys)
        raise ValueError(f"{jsonl_path}: none of the plotted metrics ({known}) appear in it")
    cols = min(len(drawn), 3)
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (panel, (key, steps, values)) in zip(axes.flat, drawn):
        sparse = len(values) < len(rows)
        ax.plot(steps, values, marker="o" if sparse else None, markersize=4, linewidth=1.5)
        ax.set_title(panel.title if key == panel.keys[0] else f"{panel.title} ({key})")
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    fig.suptitle(title or f"Training metrics: {Path(jsonl_path).parent.name or Path(jsonl_path).name}")
    fig.tight_layout()
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
