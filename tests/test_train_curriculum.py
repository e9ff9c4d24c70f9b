"""End to end: the synthesis stage's real output -> a 2-stage tiny curriculum on Ray Train (2 gloo workers,
DeepSpeed ZeRO-2, stage 2 with Ulysses SP 2), killed mid-stage and resumed by the same command.

Fault injection (runtime.fail_at_step=2): rank 0 waits until Ray Train has registered the checkpoints
reported so far, logs step 2's loss after its forward/backward and dies, once per (stage, step).
Invocation 1 (max_failures=0) dies in stage 4K. Invocation 2 (same command, max_failures=1) resumes 4K
from its step-1 checkpoint, recomputes step 2 with the same loss, then trains 8K (SP 2, 8K's RoPE) from
4K's weights; 8K's rank 0 dies at step 2 and FailureConfig restarts the worker group from 8K's step-1
checkpoint, again with the same loss. (tests/test_train_resume.py checks loss and lr across resumes and
layouts in detail.)
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
    cmd = [str(VENV_BIN / "ctxforge"), "synth", "--config", "tiny", f"output.dir={out}", "runtime.progress=false",
           "input.limit=2", "qa.hierarchical_per_document=2", "qa.diverse_per_document=1"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _train(synth: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--config", CONFIG, f"input.path={synth}", f"output.dir={out}", "runtime.progress=false",
            "runtime.fail_at_step=2", *extra]
    return subprocess.run([sys.executable, "-c", TRAIN, *args], env=_env(), capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_two_stage_curriculum_survives_a_killed_worker_and_resumes(synth_output, tmp_path):
    from transformers import AutoModelForCausalLM

    from ctxforge.train.rope import verify_rotary

    out = tmp_path / "train"
    crashed = _train(synth_output, out, "runtime.max_failures=0")
    assert crashed.returncode == 1, crashed.stdout[-4000:] + crashed.stderr[-4000:]
    assert "Run the same command again to resume" in crashed.stderr
    assert not (out / "checkpoints" / "4K").exists()

    registered = 1  # the fault waits for Ray Train to register step 1's checkpoint before it fires

    # The same command again (FailureConfig now allows one restart): 4K resumes from its checkpoint; 8K
    # starts fresh, its rank 0 dies at step 2 too, and Ray Train restarts the worker group from 8K's checkpoint.
    rerun = _train(synth_output, out, "runtime.max_failures=1")
    assert rerun.returncode == 0, rerun.stdout[-4000:] + rerun.stderr[-4000:]

    records = [json.loads(line) for line in (out / "metrics" / "4K.jsonl").read_text().splitlines()]
    rows = [r for r in records if "event" not in r]
    assert [r["step"] for r in rows] == list(range(1, 3))              # each step once: one history
    killed = next(r for r in records if r.get("event") == "killed")
    assert killed["at_step"] == 2
    resumed = next(r for r in records if r.get("event") == "resumed")
    assert resumed["from_step"] == registered                         # continues from the checkpoint
    assert rows[1]["loss"] == pytest.approx(killed["loss"], rel=1e-6)  # same weights, optimizer, data position
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_mem_bytes"] > 0 and len(r["peak_mem_bytes_per_rank"]) == 2

    sp_records = [json.loads(line) for line in (out / "metrics" / "8K.jsonl").read_text().splitlines()]
    sp_rows = [r for r in sp_records if "event" not in r]
    assert [r["step"] for r in sp_rows] == [1, 2]                      # restarted by FailureConfig, no repeat
    sp_killed = next(r for r in sp_records if r.get("event") == "killed")
    assert next(r for r in sp_records if r.get("event") == "resumed")["from_step"] == 1
    assert sp_rows[1]["loss"] == pytest.approx(sp_killed["loss"], rel=1e-6)

    from ctxforge.train.curriculum import stage_checkpoint_dir

    for stage, theta in (("4K", 2e6), ("8K", 8e6)):
        final = stage_checkpoint_dir(out, stage)    # where serve/eval configs point (tests/test_real_scale.py)
        config = json.loads((final / "config.json").read_text())
        assert config["rope_parameters"]["rope_theta"] == theta
        assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
        assert json.loads((final / "stage_complete.json").read_text())["final"] is True
        verify_rotary(AutoModelForCausalLM.from_pretrained(final))    # reloads with the stage's positions

    # Training moved the weights: the base model -> 4K -> 8K all differ.
    from safetensors.torch import load_file

    from ctxforge.models import resolve_model_path

    weights = [load_file(str(Path(d) / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
               for d in (resolve_model_path("ctxforge:tiny"), out / "checkpoints" / "4K", out / "checkpoints" / "8K")]
    assert not weights[0].equal(weights[1]) and not weights[1].equal(weights[2])

    # Finished stages are never re-run.
    again = _train(synth_output, out, "runtime.max_failures=1")
    assert again.returncode == 0 and "4K: already complete" in again.stdout and "8K: already complete" in again.stdout
