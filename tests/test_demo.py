"""The README's main command, as a new user runs it: `ctxforge demo` from an empty working directory
(relative output paths), then again, which must reuse everything finished. The chain runs on the tiny
model here (`--model tiny`: the same code as the SmolLM2 default, in minutes); the SmolLM2 stages have
their own tests (test_smollm2_stages.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SMALL = ["input.limit=2", "qa.hierarchical_per_document=3", "qa.diverse_per_document=2"]


def test_demo_runs_every_stage_and_rerun_reuses_what_is_finished(tmp_path):
    cmd = [sys.executable, "-m", "ctxforge", "demo", "--model", "tiny", *SMALL, "runtime.progress=false"]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = tmp_path / "runs" / "tiny"
    manifest = json.loads((runs / "synth" / "manifest.json").read_text())
    assert manifest["input"]["documents"] == 2
    for stage in ("4K", "8K"):
        assert (runs / "train" / "checkpoints" / stage / "config.json").is_file()
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"base", "trained"}
    assert (runs / "eval" / "report.md").is_file() and list((runs / "eval" / "plots").glob("*.png"))
    assert "scores mean nothing" in first.stdout and "report:" in first.stdout
    # a readable console: ctxforge's lines and tables; Ray Data's progress records and workers' output are in
    # Ray's log files, whose directory the demo names
    console = first.stdout + first.stderr
    assert "logging_progress" not in console and "pid=" not in console, console[-3000:]
    assert "Started Serve" not in console and "is ready at" not in console, console[-3000:]  # Serve's INFO lines
    assert "Ray's logs:" in first.stdout and "[4K] step 1: loss" in first.stdout
    assert len(console.splitlines()) < 150, console

    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    again = json.loads((runs / "synth" / "manifest.json").read_text())
    assert again["requests"]["cache_hits"] == again["requests"]["total"]["requests"] > 0
    assert again["requests"]["total"]["sent"] == 0
    assert "already complete" in second.stdout + second.stderr   # both training stages skipped
    rerun = json.loads((runs / "eval" / "results.json").read_text())
    for model in rerun["models"].values():
        assert model["requests"]["cached"] == model["requests"]["total"] > 0


def test_the_real_model_demo_runs_the_production_engine_where_vllm_imports(monkeypatch):
    from ctxforge import demo

    monkeypatch.setattr(demo, "vllm_import_error", lambda: None)
    synth, ev, line = demo.production_engine_overrides(demo.PRESETS["smollm2"], [])
    assert synth[0] == "generator.backend=vllm" and ev == ["serve.backend=vllm"] and "vLLM" in line
    # the user's backend wins; the tiny model keeps transformers
    assert demo.production_engine_overrides(demo.PRESETS["smollm2"], ["generator.backend=hf"])[:2] == ([], [])
    assert demo.production_engine_overrides(demo.PRESETS["tiny"], [])[:2] == ([], [])
    # negative control: where vllm does not import, hf is the fallback and the line says why
    monkeypatch.setattr(demo, "vllm_import_error", lambda: "RuntimeError: operator torchvision::nms does not exist")
    synth, ev, line = demo.production_engine_overrides(demo.PRESETS["smollm2"], [])
    assert (synth, ev) == ([], []) and "torchvision::nms" in line


def test_the_vllm_import_probe_names_the_error():
    from ctxforge.demo import vllm_import_error

    assert vllm_import_error("json") is None
    assert vllm_import_error("ctxforge_no_such_module") == "ModuleNotFoundError: No module named 'ctxforge_no_such_module'"
