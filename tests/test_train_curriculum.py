"""End to end: the synthesis stage's real output -> a 2-stage tiny curriculum on Ray Train (2 gloo workers,
DeepSpeed ZeRO-2, stage 2 with Ulysses SP 2), killed mid-stage and resumed by the same command.

One run of each process keeps the CPU bill at a few minutes: the first `train` invocation has rank 0 die
after the forward/backward of step 2 of stage 4K (fault injection; it logs that step's loss first); the
second invocation, the same command, must resume from the step-1 checkpoint, recompute step 2 with the
same loss, finish 4K and train 8K from 4K's weights with 8K's RoPE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
TRAIN = ("import sys, argparse\n"
         "from ctxforge.train.command import add_train_arguments, run_train\n"
         "p = argparse.ArgumentParser(); add_train_arguments(p)\n"
         "sys.exit(run_train(p.parse_args(sys.argv[1:])))\n")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "train-tiny.yaml")


def _env():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # always an embedded local Ray, never a cluster the caller points at
    return env


@pytest.fixture(scope="module")
def synth_output(tmp_path_factory):
    reuse = os.environ.get("CTXFORGE_TEST_SYNTH_DIR")  # an earlier run of the same small synth command
    if reuse:
        return Path(reuse)
    out = tmp_path_factory.mktemp("synth")
    cmd = [str(VENV_BIN / "ctxforge"), "synth", "--config", "tiny", f"output.dir={out}", "run.progress=false",
           "input.limit=2", "qa.hierarchical_per_document=2", "qa.diverse_per_document=1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _train(synth: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--config", CONFIG, f"input.dir={synth}", f"output.dir={out}", "runtime.progress=false",
            "runtime.max_failures=0", *extra]
    return subprocess.run([sys.executable, "-c", TRAIN, *args], env=_env(), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_two_stage_curriculum_survives_a_killed_worker_and_resumes(synth_output, tmp_path):
    from transformers import AutoModelForCausalLM

    from ctxforge.train.rope import verify_rotary

    out = tmp_path / "train"
    crashed = _train(synth_output, out, "runtime.fail_at_step=2")
    assert crashed.returncode == 1, crashed.stdout[-4000:] + crashed.stderr[-4000:]
    assert "Run the same command again to resume" in crashed.stdout
    assert not (out / "checkpoints" / "4K").exists()

    resumed = _train(synth_output, out)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]

    rows = [json.loads(line) for line in (out / "metrics" / "4K.jsonl").read_text().splitlines()]
    steps = [(r["step"], r.get("crashed", False)) for r in rows]
    assert steps == [(1, False), (2, True), (2, False)], steps     # resumed at the checkpointed step, not at 1
    crash_loss, resumed_loss = rows[1]["loss"], rows[2]["loss"]
    assert resumed_loss == pytest.approx(crash_loss, rel=1e-6)    # same weights, optimizer and data position
    for r in rows[::2]:
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and len(r["peak_mem_bytes_per_rank"]) == 2

    sp_rows = [json.loads(line) for line in (out / "metrics" / "8K.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sp_rows] == list(range(1, len(sp_rows) + 1)) and sp_rows
    assert all(r["loss"] > 0 for r in sp_rows)

    for stage, theta in (("4K", 2e6), ("8K", 8e6)):
        final = out / "checkpoints" / stage
        config = json.loads((final / "config.json").read_text())
        assert config["rope_parameters"]["rope_theta"] == theta
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert json.loads((final / "stage_complete.json").read_text())["final"] is True
        verify_rotary(AutoModelForCausalLM.from_pretrained(final))    # reloads with the stage's positions

    # Finished stages are never re-run.
    again = _train(synth_output, out)
    assert again.returncode == 0 and "4K: already complete" in again.stdout and "8K: already complete" in again.stdout
