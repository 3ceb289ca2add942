"""Training checkpoints: one directory per step, written atomically.

A checkpoint is `<output_dir>/checkpoints/step_<N>/state.pt` holding everything the next step reads:
model(s), optimizer(s), LR scheduler(s), RNG states, the data position, the step and the metrics
history. It is written into a hidden temporary directory and renamed into place, so a process killed
mid-write leaves the previous checkpoint as the newest complete one.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")
STATE_FILE = "state.pt"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories never match the name pattern)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as the checkpoint after `step` (0-based) and keep only the newest `keep`."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    for stale in root.glob(".tmp_step_*"):     # left by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    tmp.mkdir()
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():        # the same step written again after a resume from an older checkpoint
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with weights-only unpickling: tensors, numbers, strings and plain containers load,
    anything else (an object whose unpickling could run code) is refused with an error."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain values; refusing to unpickle it: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a training checkpoint (a {type(state).__name__}, not a dict)")
    return state


# Keys a resumed run may change: how long it runs, where and how it writes, how it logs. Any other
# difference would make the resumed steps differ from the run the checkpoint belongs to.
RESUMABLE_KEYS = ("steps", "output_dir", "resume", "resume_from", "checkpoint_every", "checkpoint_keep",
                  "task.eval_every", "logging.*")


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and prefix.count(".") < 1:      # sections, not dict values
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in RESUMABLE_KEYS)


def check_resume_config(saved: dict[str, Any] | None, current: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume when the config differs from the checkpoint's outside RESUMABLE_KEYS, listing every
    differing key with both values. A checkpoint without a recorded config is not checked."""
    if saved is None:
        return
    from rlserve.rl.config import TrainConfig, to_dict
    # A key newer than the checkpoint counts as its default there; one the code no longer has is moot.
    old = _flatten(to_dict(TrainConfig())) | _flatten(saved)
    new = _flatten(current)
    differ = sorted(k for k in new if not _resumable(k) and k in old and old[k] != new[k])
    if differ:
        changes = "; ".join(f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now" for k in differ)
        raise ValueError(f"cannot resume from {path}: the config differs in {', '.join(differ)} ({changes}). "
                         f"Only {', '.join(RESUMABLE_KEYS)} may change on resume; restore the other values "
                         f"or start a new run in another output_dir")


def rng_state(loop_rng: random.Random, engine: Any | None) -> dict[str, Any]:
    """Every random source a step can read: Python's, torch's (CPU and CUDA), the loop's own Random
    (it draws the per-step seeds) and the engine's sampling streams (unseeded rows)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "loop": loop_rng.getstate(),
            "engine": engine.rng_state() if engine is not None else None}


def restore_rng_state(state: dict[str, Any], loop_rng: random.Random, engine: Any | None) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loop_rng.setstate(state["loop"])
    if state["engine"] is not None and engine is not None:
        engine.set_rng_state(state["engine"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
