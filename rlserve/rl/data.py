"""Training data from files: JSONL (one JSON object a line) or parquet, one sample a row.

Every row has a "prompt": a string, or a chat conversation (a list of {"role", "content"} messages)
that the trainer renders with the tokenizer's chat template. Every other field is ground truth handed
to the reward functions as keyword arguments (e.g. "answer", "target", "numbers").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMATS = (".jsonl", ".parquet")


def load_dataset(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate every row of a .jsonl or .parquet file. Raises ValueError with the file and the
    row (1-based) at fault."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise ValueError(f"{path}: unknown dataset format {suffix or '(no extension)'!r}; "
                         f"use one of {', '.join(FORMATS)}")
    if not rows:
        raise ValueError(f"{path}: the dataset has no rows")
    for i, row in enumerate(rows, 1):
        _check_row(row, f"{path}: row {i}")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():          # a trailing blank line is common and harmless
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {lineno} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install 'rlserve[rl]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:                # pyarrow raises its own error types for corrupt files
        raise ValueError(f"{path}: cannot read parquet ({e})") from e
    return table.to_pylist()


def _check_row(row: dict[str, Any], where: str) -> None:
    if "prompt" not in row:
        raise ValueError(f"{where} has no 'prompt' field (fields: {', '.join(row) or 'none'})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: 'prompt' is an empty string")
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of chat messages, "
                         f"got {type(prompt).__name__}")
    for j, msg in enumerate(prompt):
        if not (isinstance(msg, dict) and isinstance(msg.get("role"), str)
                and isinstance(msg.get("content"), str)):
            raise ValueError(f"{where}: prompt message {j} must be an object with string 'role' and "
                             f"'content', got {msg!r}")
