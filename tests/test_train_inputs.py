"""Training inputs at real scale, fast (no Ray): object-store URIs, streamed row-group reads, a tokenizer
without a pad token, dynamic RoPE refused, run.json only after preflight, experiment trackers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ctxforge.config import ConfigError, load_config
from ctxforge.models import tokenizer_hash
from ctxforge.schema import SAMPLE_SCHEMA
from ctxforge.train.config import TrainConfig
from ctxforge.train.data import DataError, index_stage, read_stage
from test_sp_equivalence import CONVERSATIONS, build_samples
from test_train_config import _rows

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write_stage(root: Path, tokenizer, stage="4K", copies=4, rows_per_group=2) -> list[dict]:
    """`copies` x the 3 conversations as one shard with row groups of `rows_per_group` rows."""
    rows = []
    for c in range(copies):
        for r in _rows(tokenizer, stage):
            rows.append({**r, "sample_id": f"{r['sample_id']}-{c}"})
    folder = root / "samples" / stage
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), folder / "part-00000.parquet",
                   row_group_size=rows_per_group)
    return rows


def test_local_path_and_file_uri_read_the_same_samples(tmp_path, tiny_tokenizer):
    rows = _write_stage(tmp_path, tiny_tokenizer)
    h = tokenizer_hash(tiny_tokenizer)
    by_path = index_stage(tmp_path, "4K", 4096, h)
    by_uri = index_stage(tmp_path.as_uri(), "4K", 4096, h)          # file:///...: pyarrow's filesystem
    assert by_uri.location.startswith("file://") and len(by_path) == len(by_uri) == len(rows) == 12
    assert by_path.groups.max() == 5                                  # 6 row groups of 2 rows
    order = [7, 0, 11, 3]                                             # spans several row groups
    for a, b, k in zip(by_path.read(order), by_uri.read(order), order):
        assert a.sample_id == b.sample_id == rows[k]["sample_id"]
        assert a.input_ids.tolist() == b.input_ids.tolist() == rows[k]["input_ids"]
        assert a.loss_mask.tolist() == rows[k]["loss_mask"]


def test_index_reads_metadata_columns_only(tmp_path, tiny_tokenizer, monkeypatch):
    """The driver's preflight never reads input_ids/loss_mask; a worker reads only the row groups it needs."""
    _write_stage(tmp_path, tiny_tokenizer)
    asked = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        asked.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    index = index_stage(tmp_path, "4K", 4096, tokenizer_hash(tiny_tokenizer))
    assert asked and all("input_ids" not in cols and "loss_mask" not in cols for _, cols in asked)
    asked.clear()
    index.read([5, 4])                                                # both in row group 2
    assert [g for g, _ in asked] == [2]


def test_a_missing_input_dir_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"input.path .*typo: no such directory"):
        index_stage(tmp_path / "typo", "4K", 4096, "x")
    with pytest.raises(DataError, match=r"no such directory"):
        index_stage((tmp_path / "typo").as_uri(), "4K", 4096, "x")


def test_run_json_is_written_only_after_preflight(tmp_path, tiny_tokenizer):
    """A typo in input.path, then the corrected command: the second is not refused as 'another config'."""
    from ctxforge.train.curriculum import prepare

    _write_stage(tmp_path / "synth", tiny_tokenizer, stage="4K")
    _write_stage(tmp_path / "synth", tiny_tokenizer, stage="8K")
    out = tmp_path / "train"
    # one rank per stage: the fixture's samples pack into a single micro-batch per epoch
    base = [f"output.dir={out}", "model=ctxforge:tiny", "stages.0.workers=1", "stages.1.workers=1", "stages.1.sp_degree=1"]
    typo = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), [*base, f"input.path={tmp_path / 'synht'}"])
    with pytest.raises(DataError, match="synht: no such directory"):
        prepare(typo, "typo", log=lambda *_: None)
    assert not (out / "run.json").exists()
    fixed = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), [*base, f"input.path={tmp_path / 'synth'}"])
    prepare(fixed, "fixed", log=lambda *_: None)
    assert json.loads((out / "run.json").read_text())["config_source"] == "fixed"


def test_too_little_data_for_one_step_stops_at_preflight_naming_the_keys(tmp_path, tiny_tokenizer):
    """2 data-parallel ranks need 2 micro-batches a step; one packed micro-batch of data fails in the driver,
    before any worker starts, naming the stage's keys (not a worker traceback advising a rerun)."""
    from ctxforge.train.curriculum import prepare

    _write_stage(tmp_path / "synth", tiny_tokenizer, stage="4K", copies=1)
    _write_stage(tmp_path / "synth", tiny_tokenizer, stage="8K", copies=1)
    base = [f"output.dir={tmp_path / 'train'}", "model=ctxforge:tiny", f"input.path={tmp_path / 'synth'}"]
    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                      [*base, "stages.0.workers=2", "stages.0.sp_degree=1", "stages.0.batching=pack"])
    with pytest.raises(DataError, match=r"stage 4K: 1 micro-batches per epoch, .*dp_degree 2 x grad_accum 1 = 2\); "
                                        r"lower stages.0.workers"):
        prepare(cfg, "small", log=lambda *_: None)
    assert not (tmp_path / "train" / "run.json").exists()
    ok = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                     [*base, "stages.0.workers=1", "stages.0.batching=pack", "stages.1.workers=1",
                      "stages.1.sp_degree=1", "stages.1.batching=pack"])
    prepare(ok, "small", log=lambda *_: None)            # negative control: one rank, one micro-batch a step


def test_train_errors_go_to_stderr_as_one_line(tmp_path, capsys):
    import argparse

    from ctxforge.train.command import add_train_arguments, run_train

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    code = run_train(parser.parse_args(["--config", str(CONFIGS / "train-tiny.yaml"), "stages.0.rope.type=dynamic",
                                        "stages.1.lr=-1"]))
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    line, = err.err.strip().splitlines()
    assert "stages.0" in line and "rope" in line and "stages.1.lr" in line


# ---------------------------------------------------------------------------------------------------
# A tokenizer without a pad token (Llama-3.1)


@pytest.fixture(scope="module")
def no_pad_tokenizer(tiny_model_path, tmp_path_factory):
    """A copy of the tiny model's tokenizer with its pad token removed."""
    from ctxforge.models import load_tokenizer

    folder = tmp_path_factory.mktemp("nopad")
    for src in Path(tiny_model_path).iterdir():
        if src.suffix != ".safetensors":
            shutil.copy(src, folder / src.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["pad_token"] = None  # null, not absent: Qwen2Tokenizer would default it to <|endoftext|>
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(folder))
    assert tok.pad_token_id is None
    return tok


@pytest.mark.parametrize("mode", ["pack", "sort", "naive"])
def test_every_padding_path_works_without_a_pad_token(no_pad_tokenizer, tiny_model_path, mode):
    from ctxforge.train.batching import collate
    from ctxforge.train.loss import IGNORE
    from ctxforge.train.model import load_stage_model, weighted_loss_sum
    from ctxforge.train.rope import RopeConfig
    from ctxforge.train.sequence_parallel import DOC_SDPA, pad_to_multiple

    samples = build_samples(no_pad_tokenizer)
    pad = no_pad_tokenizer.pad_token_id
    rows = 1 if mode == "pack" else 4
    mb = collate(samples if mode == "pack" else samples[:3], mode, "sample", pad, rows=rows)
    padded = pad_to_multiple(mb.tensors, 64, pad)                     # every SP > 1 stage pads to a multiple
    width = mb.tensors["input_ids"].shape[1]
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > width
    real = torch.zeros_like(padded["target_ids"], dtype=torch.bool)
    for r, s in enumerate(samples[:3] if mode != "pack" else [None]):
        real[r, :(width if s is None else len(s))] = True
    assert (padded["target_ids"][~real] == IGNORE).all() and (padded["weights"][~real] == 0).all()
    model = load_stage_model(tiny_model_path, RopeConfig(), 4096, DOC_SDPA, dtype="float64")
    with torch.no_grad():                                             # padding changes nothing in the loss
        assert weighted_loss_sum(model, padded).item() == pytest.approx(weighted_loss_sum(model, mb.tensors).item(),
                                                                         rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# RoPE


def test_dynamic_rope_is_refused_for_training_naming_the_alternatives(tiny_model_path, tmp_path):
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match=r"stage 8K: rope.type: rope type 'dynamic' cannot be trained.*"
                                          r"default with a larger rope.theta.*linear, yarn or llama3"):
        load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.1.rope.type=dynamic"])
    # A model whose own config is dynamic, kept by a stage that sets no type: refused at preflight.
    config = AutoConfig.from_pretrained(tiny_model_path)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}
    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.0.rope={theta: 2000000}"])
    with pytest.raises(ValueError, match=r"stage 4K: rope \(the model's own, kept by the stage\): rope type "
                                         r"'dynamic' cannot be trained"):
        cfg.validate_for(config)
    override = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.0.rope.type=default"])
    override.validate_for(config)                                     # a stage that replaces it is fine


# ---------------------------------------------------------------------------------------------------
# Experiment tracking


def _tfrecord_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files, parsed with tensorboardX's protobufs (TFRecord framing:
    u64 length, u32 crc, payload, u32 crc)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _tensorboard_steps(logdir: Path) -> list[int]:
    """The loss steps TensorBoard shows: its event files in order, each purge (a SessionLog START with
    step P, what SummaryWriter(purge_step=P) writes) dropping the steps >= P read before it."""
    from tensorboardX.proto import event_pb2

    steps: list[int] = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps = [s for s in steps if s < event.step]
            elif any(v.tag == "train/loss" for v in event.summary.value):
                steps.append(event.step)
    return steps


def test_tensorboard_and_mlflow_write_real_event_data_offline(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from ctxforge.train.tracking import Tracker

    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                      [f"output.dir={tmp_path}", "output.report_to=[tensorboard, mlflow]"])
    tracker = Tracker.start(cfg, cfg.stages[0], {"fingerprint": "f"})
    rows = [{"loss": 2.5, "lr": 1e-4, "grad_norm": 0.75, "tokens_per_s": 900.0, "samples_per_s": 3.0, "step_s": 1.5,
             "peak_mem_bytes": 2 * 1024 ** 3},
            {"loss": 2.25, "lr": 5e-5, "grad_norm": 0.5, "tokens_per_s": 950.0, "samples_per_s": 3.0, "step_s": 1.4,
             "peak_mem_bytes": 3 * 1024 ** 3}]
    for step, row in enumerate(rows, start=1):
        tracker.log(row, step)
    tracker.finish()

    scalars = _tfrecord_scalars(tmp_path / "tensorboard" / "4K")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)]
    assert scalars["train/lr"][1] == (2, pytest.approx(5e-5))
    assert scalars["train/grad_norm"] == [(1, 0.75), (2, 0.5)] and scalars["train/peak_mem_gib"][1] == (2, 3.0)
    assert [v for _, v in scalars["train/tokens_per_s"]] == [900.0, 950.0]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tiny")
    run, = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-4K" and run.data.params["max_seq_len"] == "4096"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == {1: 2.5, 2: 2.25}
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "grad_norm")} == {1: 0.75, 2: 0.5}


def test_a_tracker_that_is_not_installed_is_refused_at_preflight(monkeypatch):
    import importlib.util

    from ctxforge.train.tracking import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"output.report_to: wandb needs the wandb package"):
        check_available(["tensorboard", "wandb"])


def test_stage_data_stream_is_the_same_for_every_layout(tmp_path, tiny_tokenizer):
    """Data position carries over a layout change: the micro-batch stream does not depend on dp x grad_accum."""
    from ctxforge.train.step_batches import DataPosition, StepBatches

    def plan(epoch):                                                   # 7 micro-batches per epoch
        return [[epoch * 100 + i] for i in range(7)]

    two = StepBatches(plan, per_step=2, epochs=3)
    four = StepBatches(plan, per_step=4, epochs=3)
    assert two.steps_left(DataPosition()) == 9 and four.steps_left(DataPosition()) == 3
    steps = list(two.steps(DataPosition()))
    assert [s.microbatches for s in steps[:4]] == [[[0], [1]], [[2], [3]], [[4], [5]], [[100], [101]]]
    # Resume after step 4 (epoch 1, micro-batch 2) with twice the micro-batches per step:
    pos = steps[3].after
    assert pos == DataPosition(1, 2)
    rest = list(four.steps(pos, done=4))
    assert [s.microbatches for s in rest] == [[[102], [103], [104], [105]], [[200], [201], [202], [203]]]
    assert four.steps_left(pos, done=4) == 2
    capped = StepBatches(plan, per_step=4, epochs=1, max_steps=5)    # max_steps: epochs repeat, 1 step each
    assert capped.steps_left(DataPosition(), 0) == 5
    assert [s.epoch for s in capped.steps(DataPosition())] == [0, 1, 2, 3, 4]


def test_short_mix_reads_through_the_same_filesystems(tmp_path, tiny_tokenizer):
    from ctxforge.train.data import read_short_mix

    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS))
    by_uri = read_short_mix(path.as_uri(), tiny_tokenizer, 3, 4096, seed=0)
    by_path = read_short_mix(path, tiny_tokenizer, 3, 4096, seed=0)
    assert [s.input_ids.tolist() for s in by_uri] == [s.input_ids.tolist() for s in by_path]


def test_read_stage_checks_each_sample_against_its_metadata(tmp_path, tiny_tokenizer):
    rows = _rows(tiny_tokenizer)
    rows[1]["num_tokens"] += 1                                        # metadata and ids disagree
    folder = tmp_path / "samples" / "4K"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), folder / "part-00000.parquet")
    with pytest.raises(DataError, match=r"part-00000.parquet: sample 4K-1: num_tokens \d+ but \d+ input_ids"):
        read_stage(tmp_path, "4K", 4096, tokenizer_hash(tiny_tokenizer))


def test_a_resumed_attempt_leaves_one_history_in_tensorboard_and_mlflow(tmp_path, monkeypatch):
    """Attempt 1 logs steps 1-3 and is killed; attempt 2 resumes from the step-2 checkpoint and logs 3-4.
    TensorBoard (after its purge) and the one live MLflow run show steps 1-4 once, with attempt 2's step 3."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    from mlflow.tracking import MlflowClient

    from ctxforge.train.tracking import Tracker

    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                      [f"output.dir={tmp_path}", "output.report_to=[tensorboard, mlflow]"])
    row = {"lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 900.0, "samples_per_s": 3.0, "step_s": 1.5,
           "peak_mem_bytes": 1024 ** 3}
    first = Tracker.start(cfg, cfg.stages[0], {"fingerprint": "f"})
    rows = [dict(row, step=s, loss=10.0 + s) for s in (1, 2, 3)]
    for r in rows:
        first.log(r, r["step"])
    first.finish()  # the worker dies here; the checkpoint is at step 2
    second = Tracker.start(cfg, cfg.stages[0], {"fingerprint": "f"}, resumed_step=2, history=rows[:2])
    for s in (3, 4):
        second.log(dict(row, step=s, loss=20.0 + s), s)
    second.finish()

    assert _tensorboard_steps(tmp_path / "tensorboard" / "4K") == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    live = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert len(live) == 1  # the first attempt's run is superseded (deleted), the second holds the curve
    history = sorted((m.step, m.value) for m in client.get_metric_history(live[0].info.run_id, "loss"))
    assert history == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
