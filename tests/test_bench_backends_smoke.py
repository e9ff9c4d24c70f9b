"""bench/bench_backends.py --smoke runs end to end and prints its tables (hf only: a vLLM load alone takes
40 s to minutes on a 2-core CPU, so the side-by-side run is the full benchmark's, recorded in the README)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_backends.py"


def test_bench_backends_smoke_prints_both_tables(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    synth = next(line for line in lines if line.startswith("hf ") and "%" in line).split()
    assert int(synth[3]) > 0                       # requests sent by the hf engines
    evaluation = [line for line in lines if line.startswith("hf ")][-1].split()
    assert all(float(v) > 0 for v in evaluation[2:])   # req/s at c=1 and c=8, prefill tok/s
    assert not any(line.startswith("vllm") for line in lines)   # smoke: hf only
    assert (tmp_path / "hf" / "manifest.json").exists()
