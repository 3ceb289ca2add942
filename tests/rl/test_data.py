"""Datasets from JSONL and parquet files: rows come back as written, and bad files fail with the row."""
from __future__ import annotations

import json

import pytest

from rlserve.rl.data import load_dataset

ROWS = [
    {"prompt": "What is 2+3?", "answer": "5"},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7*6?"}],
     "answer": "42"},
]


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def test_jsonl_roundtrip(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, extra_lines=["\n"])   # a trailing blank line is fine
    assert load_dataset(path) == ROWS
    assert load_dataset(str(path)) == ROWS


def test_parquet_roundtrip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    # Parquet needs one type per column, so text and chat prompts go in separate files.
    text = [{"prompt": "1+1=", "answer": "2", "numbers": [1, 1]}, {"prompt": "2+2=", "answer": "4", "numbers": [2, 2]}]
    pq.write_table(pa.Table.from_pylist(text), tmp_path / "text.parquet")
    assert load_dataset(tmp_path / "text.parquet") == text
    chat = [ROWS[1], {"prompt": [{"role": "user", "content": "hi"}], "answer": "hello"}]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert load_dataset(tmp_path / "chat.parquet") == chat


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("prompt,answer\nx,1\n")
    with pytest.raises(ValueError, match="unknown dataset format '.csv'"):
        load_dataset(tmp_path / "d.csv")


def test_bad_json_line_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS, extra_lines=['{"prompt": "x", \n'])
    with pytest.raises(ValueError, match="line 3 is not valid JSON"):
        load_dataset(path)
    path.write_text('{"prompt": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2 must be a JSON object"):
        load_dataset(path)


@pytest.mark.parametrize("row, message", [
    ({"question": "x"}, "row 2 has no 'prompt' field"),
    ({"prompt": 3}, "row 2: 'prompt' must be a string or a non-empty list"),
    ({"prompt": ""}, "row 2: 'prompt' is an empty string"),
    ({"prompt": []}, "row 2: 'prompt' must be a string or a non-empty list"),
    ({"prompt": [{"role": "user"}]}, "row 2: prompt message 0 must be an object"),
    ({"prompt": ["hi"]}, "row 2: prompt message 0 must be an object"),
])
def test_bad_prompt_names_the_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], row])
    with pytest.raises(ValueError, match=message):
        load_dataset(path)


def test_empty_dataset(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_dataset(tmp_path / "d.jsonl")


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read parquet"):
        load_dataset(tmp_path / "d.parquet")
