"""bench/gpu_checks.py: the GPU checks (flash-attn varlen = document-masked sdpa; peak memory of one step vs the
planner) run under `make test-gpu` where a GPU is lent, and skip cleanly, saying so, everywhere else."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_checks.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_checks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_gpu_checks_say_they_did_not_run_without_cuda(tmp_path, capsys):
    assert _module().main(["--out", str(tmp_path)]) == 0
    assert "the GPU checks did not run" in capsys.readouterr().out
    assert json.loads((tmp_path / "gpu_checks.json").read_text()) == {"ran": False, "why": "no CUDA device"}


@pytest.mark.gpu
def test_gpu_checks_pass_on_a_gpu(tmp_path):
    assert _module().main(["--out", str(tmp_path), "--tokens", "16384,32768", "--layers", "2"]) == 0
    report = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert report["flash_varlen"]["passed"]
    for variant in report["peak_memory"]["variants"].values():
        assert 0.5 < variant["measured_over_formula"] < 1.5
