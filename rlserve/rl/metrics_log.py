"""Where a step's metrics go: <output_dir>/metrics.jsonl always, TensorBoard and a PNG when configured."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rlserve.rl.config import LoggingSection


class MetricLog:
    def __init__(self, output_dir: Path, cfg: LoggingSection, history: list[dict[str, Any]]) -> None:
        self.jsonl = output_dir / "metrics.jsonl"
        self.png = output_dir / "metrics.png"
        self.cfg = cfg
        # The file restarts from the history a checkpoint carries: lines a killed run wrote after its
        # last checkpoint are dropped, since the resumed run writes those steps again.
        tmp = self.jsonl.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, self.jsonl)
        self._file = open(self.jsonl, "a")
        self._tensorboard = None
        if cfg.tensorboard:
            from rlserve.rl.plots import TensorBoardLogger
            self._tensorboard = TensorBoardLogger(output_dir / "tensorboard")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.log(record["step"], record)
        if self.cfg.plot_every and (record["step"] + 1) % self.cfg.plot_every == 0:
            self.plot()

    def plot(self) -> None:
        from rlserve.rl.plots import plot_metrics
        plot_metrics(self.jsonl, self.png)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
