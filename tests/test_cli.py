from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlserve.cli import main
from rlserve.config_args import parse_bytes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def rlserve(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlserve.cli", *args], input=stdin, capture_output=True,
                          text=True, env=ENV, timeout=600)


def test_generate_prints_text():
    proc = rlserve("generate", "The capital of France is", "--max-tokens", "5", "--temperature", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_chat_reads_a_pipe():
    proc = rlserve("chat", "--max-tokens", "5", stdin="hi\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_missing_model_is_a_one_line_error():
    proc = rlserve("generate", "hi", "--model", "/nonexistent")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "/nonexistent" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--top-p", "2"], ["--dtype", "foo"],
                                   ["--device", "nonsense"], ["--chunked-prefill-size", "0"],
                                   ["--stream", "--n", "2"]])
def test_bad_values_exit_2_without_traceback(flags, capsys):
    # In-process: each of these is rejected before any model is loaded.
    assert main(["generate", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("256M") == 256 << 20
    assert parse_bytes("1.5GiB") == 3 << 29


def test_bench_offline_both_backends(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = rlserve("bench", "offline", "--num-prompts", "4", "--max-input", "32", "--max-output", "8",
                   "--backend", "both", "--model", "tiny-llama", "--no-tqdm", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "rlserve:" in proc.stdout and "transformers:" in proc.stdout
    assert "kv leaked: 0" in proc.stdout
    record = json.loads(out.read_text())
    assert record["rlserve"]["output_tok_per_s"] > 0 and record["hf"]["output_tok_per_s"] > 0
    assert record["kv_leaked"] == 0


def test_bench_offline_warmup_and_repeats(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = rlserve("bench", "offline", "--num-prompts", "3", "--max-input", "24", "--max-output", "6",
                   "--model", "tiny-llama", "--no-tqdm", "--warmup", "--repeat", "2", "--json-out", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    runs = [float(t.removesuffix(" s")) for t in record["rlserve"]["notes"].split("runs: ")[1]
            .removesuffix(" (median shown)").split(", ")]
    assert len(runs) == 2
    assert abs(record["rlserve"]["elapsed_s"] - sum(runs) / 2) < 0.011     # the median of two
    assert record["kv_leaked"] == 0
