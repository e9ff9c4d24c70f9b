"""bench/gpu_checks.py: the GPU checks (flash-attn varlen = document-masked sdpa; peak memory of one step vs the
planner) run under `make test-gpu` where a GPU is lent, and skip cleanly, saying so, everywhere else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_checks.py"


def _run(*args):
    """The script as a user runs it (`python bench/gpu_checks.py ...`): its own folder is on the path, so it
    finds the bench helpers it imports (a module loaded by file location would not)."""
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_gpu_checks_say_they_did_not_run_without_cuda(tmp_path):
    out = _run("--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the GPU checks did not run" in out.stdout
    assert json.loads((tmp_path / "gpu_checks.json").read_text()) == {"ran": False, "why": "no CUDA device"}


@pytest.mark.gpu
def test_gpu_checks_pass_on_a_gpu(tmp_path):
    out = _run("--out", str(tmp_path), "--tokens", "16384,32768", "--layers", "2")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert report["flash_varlen"]["passed"]
    for variant in report["peak_memory"]["variants"].values():
        assert 0.5 < variant["measured_over_formula"] < 1.5
