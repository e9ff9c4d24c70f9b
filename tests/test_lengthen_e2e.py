"""Self-Lengthen end to end on a 2-CPU local Ray with the tiny model: one iteration (instructions -> initial
responses -> extension rounds -> Generator and Extender SFT sets -> one training step per role -> long-output
set), then the same command again, which must send no generation request and train nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ctxforge.config import load_config
from ctxforge.lengthen.config import LengthenConfig
from ctxforge.lengthen.loop import run_lengthen
from ctxforge.schema import SAMPLE_COLUMNS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("lengthen")
    # one extension round keeps the test at four generation waves; tests/test_lengthen.py covers the rounds
    cfg = load_config(LengthenConfig, "lengthen-tiny", [f"output.dir={out}", "runtime.progress=false", "extend.rounds=1"])
    return out, cfg, run_lengthen(cfg, "lengthen-tiny")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows(folder: Path, stage: str) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [r for f in manifest["stages"][stage]["files"] for r in pq.read_table(folder / "samples" / stage / f).to_pylist()]


def test_one_tiny_iteration_end_to_end(first_run, tiny_tokenizer):
    from ctxforge.lengthen.checks import count_words
    from ctxforge.lengthen.length_control import length_score

    out, cfg, manifest = first_run
    steps = manifest["iterations"][0]["steps"]
    assert [s for s in steps] == ["self_instruct", "initial", "extend", "data", "train_generator", "train_extender"]
    assert manifest["requests_sent"] > 0
    it = out / "iter_001"
    instructions = _jsonl(it / "instructions.jsonl")
    initial = _jsonl(it / "initial.jsonl")
    extended = _jsonl(it / "extended.jsonl")
    assert instructions and initial and extended
    assert {r["instruction_id"] for r in initial} <= {r["instruction_id"] for r in instructions}
    assert all(r["extended_words"] > cfg.extend.min_ratio * r["initial_words"] for r in extended)
    assert steps["extend"]["rounds"] >= steps["extend"]["rounds_accepted"] >= 1

    by_id = {e["extension_id"]: e for e in extended}
    for stage in ("generator", "extender"):
        rows = _rows(it / "data", stage)
        assert len(rows) == len(extended)
        for row in rows:
            assert set(SAMPLE_COLUMNS) <= set(row) and row["stage"] == stage
            ext = by_id[row["qa_ids"][0]]
            user, answer = row["messages"][-2]["content"], row["messages"][-1]["content"]
            assert answer == ext["extended"]
            masked = tiny_tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
            # loss on the extended response only (compared through the tokenizer: it NFC-normalizes the
            # random model's text)
            answer_ids = tiny_tokenizer(answer, add_special_tokens=False)["input_ids"]
            assert masked == tiny_tokenizer.decode(answer_ids) + "<|im_end|>"
            if stage == "generator":
                assert user == ext["instruction"]
            else:
                assert user.startswith("Below are a writing instruction and a draft answer.")
                kept = user.split("Draft:\n\n", 1)[1].split("\n\n")
                assert set(kept) <= {line for line in ext["initial"].split("\n") if line.strip()}

    for role in ("generator", "extender"):
        st = steps[f"train_{role}"]
        assert st["status_train"] == "trained" and st["steps"] == 1
        assert (Path(st["checkpoint"]) / "stage_complete.json").is_file()
        assert manifest["final_models"][role] == st["checkpoint"]

    final = _rows(out / "final", "long_output")
    assert len(final) == manifest["final"]["samples"] == len(extended)
    for row in final:                                                    # probability 1: every query constrained
        answer = row["messages"][-1]["content"]
        assert row["messages"][-2]["content"].rsplit(" Write ", 1)[1].endswith("words.")
        c = manifest["final"]["length_constraints"]
        assert sum(c.values()) == len(final)
        assert count_words(answer) > 0 and length_score(count_words(answer), 0, 1e9) == 100.0


def test_rerun_sends_no_generation_request_and_trains_nothing(first_run):
    out, cfg, manifest = first_run
    again = run_lengthen(cfg, "lengthen-tiny")
    assert again["requests_sent"] == 0
    steps = again["iterations"][0]["steps"]
    for name in ("self_instruct", "initial", "extend"):
        req = steps[name]["requests"]
        assert req["sent"] == 0 and req["cache_hits"] == req["requests"] > 0, name
    for role in ("generator", "extender"):
        assert steps[f"train_{role}"]["status_train"] == "skipped"
        assert steps[f"train_{role}"]["checkpoint"] == manifest["iterations"][0]["steps"][f"train_{role}"]["checkpoint"]
    assert steps["data"]["content_hash"] == manifest["iterations"][0]["steps"]["data"]["content_hash"]
    assert again["final"]["content_hash"] == manifest["final"]["content_hash"]
