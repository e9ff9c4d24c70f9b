"""Resume on Ray Train is exact, with the same layout and with another one (2 gloo workers, ZeRO-2, tiny model).

One stage of 8 optimizer steps (Adam, linear warmup then decay, so both the optimizer state and the
scheduler state show in the numbers), a checkpoint every 2 steps. Reference: the same command run
uninterrupted. Then, in one output directory, each run killed by fault injection (rank 0 dies after a
step's forward/backward, before its optimizer step, once Ray Train has registered the checkpoints so
far) and the next run resuming from the last checkpoint:

1. dp2 x sp1, logs steps 1-3, dies in step 4 -> resumes at step 2 (step 3 is done again)
2. same layout, dies in step 6               -> steps 3-4: loss and lr equal the uninterrupted run's
3. workers 2 = dp1 x sp2, grad_accum 2       -> steps 5-6 equal (sp_degree changed; dies in step 8)
4. workers 1, grad_accum 2                   -> steps 7-8 equal (ZeRO shards resharded 2 -> 1)

Every record reads as one history although steps 3, 5 and 7 were each logged twice: the metrics file
and the MLflow run hold steps 1-8 once each, in order, and TensorBoard's event files purge what a killed
attempt logged past its checkpoint.

Each layout keeps dp x grad_accum = 2 micro-batches per step, so every run computes the same steps.
Why this can fail: losses and learning rates are compared step by step with the uninterrupted run, so a
resume that lost Adam's moments would change the updates after it (and so the next losses), and one that
lost the scheduler's state would restart the warmup (a different lr at the first resumed step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_train_inputs import _tensorboard_steps, _write_stage

STEPS = 8


def _config(tmp: Path, synth: Path, out: Path, *overrides: str):
    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig

    data = {
        "model": "ctxforge:tiny",
        "input": {"path": str(synth)},
        "output": {"dir": str(out), "name": "resume", "report_to": ["tensorboard", "mlflow"]},
        "runtime": {"device": "cpu", "dtype": "float32", "zero_stage": 2, "gradient_checkpointing": False,
                    "loss_chunk_tokens": 64, "cpus_per_worker": 1, "num_cpus": 2, "max_failures": 0,
                    "progress": False},
        "stages": [{"name": "4K", "max_seq_len": 192, "lr": 2e-3, "schedule": "linear", "warmup_steps": 2,
                    "max_steps": STEPS, "workers": 2, "sp_degree": 1, "batching": "pack", "checkpoint_every": 2}],
    }
    path = tmp / f"train-{abs(hash(overrides))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(TrainConfig, str(path), list(overrides))


def _rows(out: Path) -> list[dict]:
    """The step rows of the metrics file (event rows left out)."""
    return [r for r in _records(out) if "event" not in r]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics" / "4K.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("synth")
    _write_stage(root, tiny_tokenizer, stage="4K", copies=6, rows_per_group=4)
    return root


@pytest.fixture(scope="module")
def uninterrupted(ray_local, synth, tmp_path_factory):
    from ctxforge.train.curriculum import run_curriculum

    tmp = tmp_path_factory.mktemp("ref")
    run_curriculum(_config(tmp, synth, tmp / "out"), log=lambda *_: None)
    rows = {r["step"]: r for r in _rows(tmp / "out")}
    assert sorted(rows) == list(range(1, STEPS + 1))
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1800)  # five Ray Train runs; about 3 min on an idle 2-core machine
def test_resume_is_exact_with_the_same_layout_and_across_layouts(ray_local, synth, uninterrupted, tmp_path, monkeypatch):
    from ray.train import TrainingFailedError

    from ctxforge.train.curriculum import run_curriculum

    out = tmp_path / "out"
    runs = [("runtime.fail_at_step=4",),
            ("runtime.fail_at_step=6",),
            ("runtime.fail_at_step=8", "stages.0.sp_degree=2", "stages.0.grad_accum=2"),
            ("stages.0.workers=1", "stages.0.grad_accum=2")]
    for n, overrides in enumerate(runs):
        cfg = _config(tmp_path, synth, out, *overrides)
        if n < 3:
            with pytest.raises(TrainingFailedError):
                run_curriculum(cfg, log=lambda *_: None)
        else:
            report = run_curriculum(cfg, log=lambda *_: None)
            assert report.stages["4K"]["status"] == "trained"

    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # each step once, in order
    events = [r for r in _records(out) if "event" in r]
    assert [(e["event"], e.get("at_step", e.get("from_step"))) for e in events] == [
        ("killed", 4), ("resumed", 2), ("killed", 6), ("resumed", 4), ("killed", 8), ("resumed", 6)]
    assert [e["dropped_steps"] for e in events if e["event"] == "resumed"] == [[3], [5], [7]]
    assert [r["workers"] for r in rows] == [2, 2, 2, 2, 2, 2, 1, 1] and [r["sp_degree"] for r in rows][4:6] == [2, 2]
    segments = [rows[:2], rows[2:4], rows[4:6], rows[6:]]
    for seg in segments:
        for r in seg:
            ref = uninterrupted[r["step"]]
            assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12), (r["step"], r["lr"], ref["lr"])
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5), (r["step"], r["loss"], ref["loss"])
            assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # The schedule really moves, so equal lr values mean the scheduler state was restored.
    assert len({round(uninterrupted[s]["lr"], 12) for s in range(1, STEPS + 1)}) >= 5

    final = out / "checkpoints" / "4K"
    assert (final / "model.safetensors").is_file() and json.loads((final / "stage_complete.json").read_text())["final"]
    # Intermediate checkpoints hold ZeRO shards and state only; the HF export is at the stage end.
    ckpts = sorted(c for c in (out / "ray" / "resume-4K").glob("checkpoint_*") if c.is_dir())
    states = {json.loads((c / "train_state.json").read_text())["step"]: c for c in ckpts}
    assert not (states[6] / "hf").exists() and (states[8] / "hf" / "model.safetensors").is_file()
    assert (states[6] / "universal" / "CONVERTED").is_file()  # the 2 -> 1 worker resume resharded step 6
    assert max(states) == rows[-1]["step"] == STEPS  # the last checkpoint is the last step recorded

    assert _tensorboard_steps(out / "tensorboard" / "4K") == list(range(1, STEPS + 1))
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the store the workers wrote (tracking.py sets it there)
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("resume")
    live = client.search_runs([experiment.experiment_id])  # deleted (superseded) runs are not listed
    assert len(live) == 1, [r.info.run_name for r in live]
    history = client.get_metric_history(live[0].info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: (m.step, m.timestamp))] == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx({s: uninterrupted[s]["loss"] for s in range(1, STEPS + 1)},
                                                               rel=1e-5)
