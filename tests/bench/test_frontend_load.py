"""The front-end load test: a real server with a stand-in engine streams every requested token."""
from __future__ import annotations

import re

from benchmarks import frontend_load


def test_stand_in_engine_serves_every_request(capsys, tmp_path, default_model_dir):
    assert frontend_load.main(["--step-ms", "5", "--groups", "2", "--questions", "4", "--prefix-len", "64",
                               "--output-len", "8", "--client-processes", "1", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"completed requests\s+8\b", out) and re.search(r"failed requests\s+0\b", out)
    assert "output tokens               64 (requested 64)" in out
    got, pace = (float(x.replace(",", "")) for x in
                 re.search(r"pace: ([\d,]+) output tok/s at full batch; the run got ([\d,]+)", out).groups()[::-1])
    assert 0 < got <= pace * 1.05          # 8 streams at 5 ms a step: at most ~1,600 tok/s
