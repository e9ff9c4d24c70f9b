"""Train config, layout arithmetic, bad input, resume guards, plan, CLI surfaces (fast: no Ray, no training)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctxforge.config import ConfigError, load_config
from ctxforge.models import tokenizer_hash
from ctxforge.schema import SAMPLE_SCHEMA
from ctxforge.train.config import TrainConfig
from ctxforge.train.data import DataError, read_short_mix, read_stage, short_count
from ctxforge.train.sequence_parallel import SequenceParallelError, check_sp_degree, valid_sp_degrees
from test_sp_equivalence import CONVERSATIONS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _rows(tokenizer, stage="4K", tok_hash=None, lengths_from=CONVERSATIONS):
    from ctxforge.pipeline.render import render_conversation

    rows = []
    for n, conv in enumerate(lengths_from):
        ids, mask = render_conversation(conv, tokenizer)
        rows.append({"sample_id": f"{stage}-{n}", "stage": stage, "target_tokens": 4096, "num_tokens": len(ids),
                     "num_loss_tokens": sum(mask), "input_ids": ids, "loss_mask": mask, "messages": conv,
                     "documents": [], "chunks": [], "qa_ids": [], "num_questions": 1, "ungrounded_questions": 0,
                     "tokenizer_hash": tok_hash or tokenizer_hash(tokenizer)})
    return rows


def _write(root: Path, stage: str, rows, schema=SAMPLE_SCHEMA) -> Path:
    folder = root / "samples" / stage
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / "part-00000.parquet")
    return folder / "part-00000.parquet"


@pytest.mark.parametrize("name", ["train-tiny.yaml", "train-llama8b-1m.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(TrainConfig, str(CONFIGS / name))
    assert cfg.stages and all(s.workers % s.sp_degree == 0 for s in cfg.stages)


def test_shipped_llama_config_layouts_are_valid_for_its_heads():
    from ctxforge.train.memory_plan import KNOWN_ARCHITECTURES

    cfg = load_config(TrainConfig, str(CONFIGS / "train-llama8b-1m.yaml"))
    arch = KNOWN_ARCHITECTURES[cfg.model]
    for stage in cfg.stages:
        check_sp_degree(stage.sp_degree, arch["heads"], arch["kv_heads"])


def test_workers_not_a_multiple_of_sp_states_the_arithmetic():
    with pytest.raises(ConfigError, match=r"workers 3 is not a multiple of sp_degree 2 \(3 % 2 = 1\)"):
        load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.1.workers=3"])


def test_valid_sp_degrees_for_real_head_counts():
    assert valid_sp_degrees(28, 4) == [1, 2, 4, 28]             # Qwen2.5-7B
    assert valid_sp_degrees(32, 8) == [1, 2, 4, 8, 16, 32]      # Llama-3.1-8B (16, 32: KV heads replicated)
    with pytest.raises(SequenceParallelError, match=r"28 query heads \(28 % 8 = 4\).*1, 2, 4, 28"):
        check_sp_degree(8, 28, 4)
    with pytest.raises(SequenceParallelError, match=r"6 KV heads divide neither way"):
        check_sp_degree(4, 12, 6)


def test_validate_for_uses_the_models_heads(tiny_model_path):
    from transformers import AutoConfig

    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.1.sp_degree=3", "stages.1.workers=3"])
    with pytest.raises(SequenceParallelError, match=r"stage 8K: sp_degree 3 does not divide the 4 query heads"):
        cfg.validate_for(AutoConfig.from_pretrained(tiny_model_path))


def test_fingerprint_ignores_runtime_knobs_but_not_the_curve():
    base = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"))
    same = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                       ["runtime.progress=false", "runtime.fail_at_step=2", "runtime.max_failures=3",
                        "output.report_to=[tensorboard]"])
    # The layout is not part of what a stage computes: a rerun with more SP or workers resumes.
    relaid = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"),
                         ["stages.0.workers=1", "stages.0.grad_accum=2", "stages.1.sp_degree=1", "stages.1.workers=4"])
    assert [base.stage_fingerprint(i) for i in range(2)] == [relaid.stage_fingerprint(i) for i in range(2)]
    other = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), ["stages.0.lr=3e-4"])
    assert base.stage_fingerprint(1) == same.stage_fingerprint(1)
    assert base.stage_fingerprint(0) != other.stage_fingerprint(0)
    assert base.stage_fingerprint(1) != other.stage_fingerprint(1)   # a later stage depends on earlier ones


def test_read_stage_keeps_good_rows_and_drops_over_length(tmp_path, tiny_tokenizer):
    rows = _rows(tiny_tokenizer)
    _write(tmp_path, "4K", rows)
    limit = sorted(r["num_tokens"] for r in rows)[1]
    samples, stats = read_stage(tmp_path, "4K", limit, tokenizer_hash(tiny_tokenizer))
    assert stats["dropped_too_long"] == 1 and stats["kept"] == 2 and len(samples) == 2
    with pytest.raises(DataError, match=r"has \d+ tokens, more than the stage's max_seq_len .*input.strict"):
        read_stage(tmp_path, "4K", limit, tokenizer_hash(tiny_tokenizer), strict=True)


def test_shard_without_contract_columns_is_refused(tmp_path, tiny_tokenizer):
    rows = [{k: v for k, v in r.items() if k not in ("loss_mask", "num_loss_tokens")} for r in _rows(tiny_tokenizer)]
    schema = pa.schema([f for f in SAMPLE_SCHEMA if f.name not in ("loss_mask", "num_loss_tokens")])
    path = _write(tmp_path, "4K", rows, schema)
    with pytest.raises(DataError, match=rf"{path}: missing column\(s\) num_loss_tokens, loss_mask"):
        read_stage(tmp_path, "4K", 4096, tokenizer_hash(tiny_tokenizer))


def test_foreign_tokenizer_hash_is_refused(tmp_path, tiny_tokenizer):
    path = _write(tmp_path, "4K", _rows(tiny_tokenizer, tok_hash="0123456789abcdef"))
    with pytest.raises(DataError, match=rf"{path}: .*tokenizer hash 0123456789abcdef.*hashes to "
                                        rf"{tokenizer_hash(tiny_tokenizer)}"):
        read_stage(tmp_path, "4K", 4096, tokenizer_hash(tiny_tokenizer))


def test_stage_missing_from_the_manifest_is_named(tmp_path, tiny_tokenizer):
    _write(tmp_path, "4K", _rows(tiny_tokenizer))
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"4K": {"files": ["part-00000.parquet"]}}}))
    with pytest.raises(DataError, match=r"no stage '180K' in the synthesis output \(stages: 4K\)"):
        read_stage(tmp_path, "180K", 4096, tokenizer_hash(tiny_tokenizer))


def test_short_mix_renders_answer_only_masks(tmp_path, tiny_tokenizer):
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS))
    mix = read_short_mix(path, tiny_tokenizer, 5, 4096, seed=0)
    assert len(mix) == 5 and all(s.source == "short" and 0 < s.num_targets < len(s) for s in mix)
    assert short_count(60, 0.4) == 40 and short_count(10, 0.0) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}))
    with pytest.raises(DataError, match="row 0 has no 'messages' list with an assistant turn"):
        read_short_mix(bad, tiny_tokenizer, 1, 4096, seed=0)


def test_resume_directory_from_a_different_config_is_refused(tmp_path):
    from ctxforge.train.curriculum import _check_run_dir, _write_run_file
    from ctxforge.train.loop import ResumeError

    cfg = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), [f"output.dir={tmp_path}"])
    _write_run_file(tmp_path, cfg, "a", _check_run_dir(tmp_path, cfg, "a"))
    _check_run_dir(tmp_path, cfg, "a")                                   # same config: fine
    other = load_config(TrainConfig, str(CONFIGS / "train-tiny.yaml"), [f"output.dir={tmp_path}", "stages.1.lr=1"])
    with pytest.raises(ResumeError, match=rf"{tmp_path}: stage 8K was started with a different config"):
        _check_run_dir(tmp_path, other, "b")


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from ctxforge.train.config import StageConfig
    from ctxforge.train.deepspeed_setup import lr_lambda

    stage = StageConfig(name="s", max_seq_len=8, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = lr_lambda(stage, total_steps=10)
    assert [round(f(n), 6) for n in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert f(9) == pytest.approx(0.1) and f(5) < f(3)


def test_plan_needs_less_per_gpu_with_more_sp_and_finds_a_fit():
    from ctxforge.train.memory_plan import KNOWN_ARCHITECTURES, Arch, need_bytes, plan_curriculum

    cfg = load_config(TrainConfig, str(CONFIGS / "train-llama8b-1m.yaml"))
    arch = Arch(**KNOWN_ARCHITECTURES[cfg.model])
    assert 7.9e9 < arch.params < 8.1e9                                   # Llama-3.1-8B: 8.03B
    one_m = cfg.stages[-1]
    needs = [need_bytes(arch, cfg, one_m, sp, sp)["total"] for sp in (1, 2, 4, 8, 16)]
    assert needs == sorted(needs, reverse=True)
    rows = plan_curriculum(cfg, gpu_memory_gib=80, max_sp=16)
    assert all(r.min_gpus for r in rows)
    assert rows[0].min_sp <= rows[-1].min_sp                             # longer stages need more SP


def test_cli_surfaces_build_and_describe_every_field():
    from ctxforge.train.command import add_plan_arguments, add_train_arguments

    train, plan = argparse.ArgumentParser(prog="ctxforge train"), argparse.ArgumentParser(prog="ctxforge plan")
    add_train_arguments(train)
    add_plan_arguments(plan)
    text = train.format_help()
    assert "runtime.zero_stage" in text and "input.short_data" in text and "stages.N.*" in text
    assert "--gpu-memory-gib" in plan.format_help()
    assert train.parse_args(["--config", "x.yaml", "a.b=1"]).overrides == ["a.b=1"]
