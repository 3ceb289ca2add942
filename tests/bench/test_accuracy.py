"""`rlserve bench accuracy` on a tiny preset: one row per mode, float first; its own KL is 0 and a
quantized model's is positive but small; agreement fractions are fractions; the metrics' arithmetic."""
from __future__ import annotations

import math

from rlserve.bench.accuracy import CORPUS, greedy_agreement, report, run_accuracy, windows


def test_greedy_agreement_counts_the_prefix_and_the_positions():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert greedy_agreement(ref, ref) == (1.0, 1.0)
    prefix, same = greedy_agreement([[1, 9, 3, 4], [5, 6, 7, 0]], ref)
    assert prefix == (1 + 3) / 8 and same == (3 + 3) / 8


def test_windows_cover_the_corpus_once():
    ids = list(range(1000))
    ws = windows(ids, 300)
    assert [len(w) for w in ws] == [300, 300, 300, 100] and sum(ws, []) == ids
    assert len(CORPUS.read_text().split()) > 2000


def test_run_accuracy_on_a_tiny_preset(default_model_dir):
    rows, num_tokens = run_accuracy(["int8", "int4"], model="tiny-llama", window=256, num_prompts=3,
                                    prompt_tokens=8, max_tokens=6)
    assert [r.mode for r in rows] == ["float", "int8", "int4"] and num_tokens > 2000
    assert rows[0].mean_kl == 0 and rows[0].prefix_agreement == 1
    assert all(math.isfinite(r.perplexity) and r.perplexity > 1 for r in rows)
    assert 0 < rows[1].mean_kl < rows[2].mean_kl            # int8 is closer to float than int4
    assert all(0 <= r.prefix_agreement <= r.position_match <= 1 for r in rows)
    table = report(rows, num_tokens, 3, 6)
    assert "| int4 |" in table and table.count("\n") == 5
