"""The real synthesis stage end to end on a 2-CPU local Ray: hf with the tiny model, http against a
fault-injecting OpenAI-compatible server, bad input, and a rerun that must redo nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ctxforge.config import load_config
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.run import synthesize
from ctxforge.schema import SAMPLE_COLUMNS
from fake_openai_server import FakeOpenAIServer

pytestmark = pytest.mark.slow

SMALL = [
    "input.limit=2", "qa.hierarchical_per_document=3", "qa.diverse_per_document=2",
    "concat.n1_hierarchical=1", "concat.n1_diverse=1", "concat.n2_earlier_diverse=1", "concat.n3_followups=1",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 2},"
    " {name: 4K, target_tokens: 4096, documents_per_sample: 2, samples: 2}]",
    "runtime.progress=false",
]


def config(out: Path, *extra: str) -> SynthConfig:
    return load_config(SynthConfig, "tiny", [f"output.dir={out}", *SMALL, *extra])


def read_samples(out: Path, stage: str) -> list[dict]:
    files = sorted((out / "samples" / stage).glob("*.parquet"))
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def check_samples(out: Path, tokenizer, stages: dict[str, int]) -> None:
    import datasets
    import ray

    for stage, target in stages.items():
        rows = read_samples(out, stage)
        assert rows, stage
        for row in rows:
            assert set(SAMPLE_COLUMNS) <= set(row)
            assert row["num_tokens"] == len(row["input_ids"]) == len(row["loss_mask"]) <= target
            assert sum(row["loss_mask"]) == row["num_loss_tokens"] > 0
            assert row["stage"] == stage and row["documents"] and row["qa_ids"]
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            masked = tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])
            assert masked == "".join(a + "<|im_end|>" for a in answers)  # the mask is exactly the answers
        glob = str(out / "samples" / stage / "*.parquet")
        assert len(datasets.load_dataset("parquet", data_files=glob, split="train")) == len(rows)
        assert ray.data.read_parquet(str(out / "samples" / stage)).count() == len(rows)


def test_hf_tiny_model_end_to_end_then_rerun_redoes_nothing(ray_local, tmp_path, tiny_tokenizer):
    out = tmp_path / "hf"
    # one document at a time (two "waves"), every pass and retry round of each: one engine, loaded once
    report = synthesize(config(out, "runtime.documents_in_flight=1", "generator.concurrency=1"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["documents"] == 2
    engines, sent = manifest["accounting"]["engines"], manifest["requests"]["total"]["sent"]
    assert engines["engines"] == engines["loads"] == 1 and engines["lost"] == 0
    assert engines["requests"] == sent > 0   # that one engine answered every attempt (retries included)
    assert engines["load_s"] > 0 and engines["alive_s"] >= engines["load_s"] + engines["generating_s"] - 1e-6
    assert manifest["input"]["skipped_by_reason"]["over_limit"] > 0
    assert manifest["generator"]["backend"] == "hf" and manifest["generator"]["prompt_set_hash"]
    assert manifest["tokenizer"]["hash"] == report.tokenizer_hash
    total = manifest["requests"]["total"]
    assert total["requests"] > 0 and total["ok"] + total["failed"] == len(set_of_requests(out))
    # the random-weight model grounds nothing: kept, flagged, and the manifest says so plainly
    assert manifest["grounding"]["policy"] == "flag"
    assert any("tiny model" in note for note in manifest["notes"])
    check_samples(out, tiny_tokenizer, {"2K": 2048, "4K": 4096})
    assert manifest["stages"]["4K"]["samples_built"] >= 1
    before = {p.name: p.read_bytes() for p in (out / "samples" / "2K").glob("*.parquet")}
    qa_before = pq.read_table(out / "qa" / "qa.parquet")

    again = synthesize(config(out, "runtime.documents_in_flight=1", "generator.concurrency=1"))
    assert again.totals.sent == 0
    assert again.accounting["engines"]["loads"] == 0   # everything came from the cache: no engine was started
    assert again.totals.cache_hits == again.totals.requests == total["requests"]
    assert json.loads((out / "manifest.json").read_text())["requests"]["cache_hits"] == total["requests"]
    assert {p.name: p.read_bytes() for p in (out / "samples" / "2K").glob("*.parquet")} == before
    assert pq.read_table(out / "qa" / "qa.parquet").equals(qa_before)


def set_of_requests(out: Path) -> set[str]:
    import sqlite3
    db = sqlite3.connect(out / "work" / "requests.sqlite")
    attempts = db.execute("SELECT request_id, attempt FROM attempts").fetchall()
    db.close()
    assert len(attempts) == len(set(attempts))
    return {rid for rid, _ in attempts}


def test_http_backend_with_faults_grounds_and_retries(ray_local, tmp_path, tiny_tokenizer):
    # every request meets a 429, then a 500, then a timeout before it is answered: all retried by the backend
    with FakeOpenAIServer(schedule=(429, 500, "timeout"), timeout_sleep_s=3.0) as server:
        out = tmp_path / "http"
        cfg = config(out, "generator.backend=http", "generator.api_key_env=null", f"generator.base_url={server.base_url}",
                     "generator.model=fake-qwen", "generator.concurrency=8", "generator.retry_base_s=0.01",
                     "generator.timeout_s=0.5", "grounding.on_ungrounded=drop")
        synthesize(cfg)
        stats = server.stats.snapshot()
        base_url = server.base_url
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["requests"]["total"]
    assert total["failed"] == 0 and total["ok"] == total["requests"] - total["cache_hits"]
    # one of each fault per request, each retried by the backend
    assert stats["by_status"][429] == stats["by_status"][500] == stats["faults"]["timeout"] == total["ok"]
    assert manifest["grounding"]["overall"]["rate"] > 0.5  # the fake quotes the prompt verbatim
    assert manifest["generator"]["base_url"] == base_url
    check_samples(out, tiny_tokenizer, {"2K": 2048, "4K": 4096})
    qa = pq.read_table(out / "qa" / "qa.parquet").to_pylist()
    assert qa and all(r["grounded"] for r in qa)  # drop policy: only grounded QA reach the table


def test_invalid_json_is_retried_then_recorded_as_failed(ray_local, tmp_path):
    with FakeOpenAIServer(permanent="malformed", match="Write one question") as server:  # every question prompt
        out = tmp_path / "bad-json"
        cfg = config(out, "generator.backend=http", "generator.api_key_env=null", f"generator.base_url={server.base_url}",
                     "generator.model=fake", "generator.max_attempts=2", "generator.retry_base_s=0.01")
        synthesize(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    qa_pass = manifest["requests"]["by_pass"]["qa"]
    assert qa_pass["failed"] == qa_pass["requests"] > 0  # every question prompt got non-JSON twice
    assert qa_pass["failures_by_reason"] == {"invalid_json": qa_pass["requests"]}
    assert qa_pass["failed_attempts_by_reason"]["invalid_json"] == 2 * qa_pass["requests"]
    assert manifest["requests"]["by_pass"]["summary_small"]["failed"] == 0
    assert manifest["failures_by_reason"]["invalid_json"] == qa_pass["requests"]


def test_bad_input_is_skipped_and_counted(ray_local, tmp_path):
    import pyarrow as pa

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = "\n\n".join(f"Paragraph {i}. " + "The river ran past the old mill and the miller counted sacks. " * 8
                       for i in range(12))
    (corpus / "good.txt").write_text(good)
    (corpus / "empty.txt").write_text("")
    (corpus / "blank.md").write_text("   \n\t\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 50)
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (corpus / "short.txt").write_text("Too short.")
    lines = [json.dumps({"text": good.replace("river", "road"), "id": "jsonl-1"}), "{not json",
             json.dumps({"body": "no text field"}), json.dumps({"text": 42}), json.dumps(["a", "list"]),
             json.dumps({"text": good.replace("river", "road"), "id": "jsonl-1"}),  # same id, same text: a repeat
             json.dumps({"text": good.replace("mill", "dam"), "id": "array-1"})]   # array.json's id, other text
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    # a JSON array beside JSON Lines: its record is read, not counted as invalid lines
    (corpus / "array.json").write_text(json.dumps([{"id": "array-1", "text": good.replace("mill", "barn")}], indent=2))
    pq.write_table(pa.table({"text": [good.replace("mill", "forge")], "title": ["forge"]}), corpus / "p.parquet")
    pq.write_table(pa.table({"content": ["wrong column"]}), corpus / "q.parquet")
    (corpus / ".hidden.txt").write_text(good)

    with FakeOpenAIServer() as server:
        out = tmp_path / "out"
        cfg = config(out, f"input.path={corpus}", "input.limit=0", "input.max_document_tokens=0",
                     "generator.backend=http", "generator.api_key_env=null", f"generator.base_url={server.base_url}", "generator.model=fake",
                     "chunking.min_document_tokens=8")
        synthesize(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input"]["documents"] == 4  # good.txt, jsonl-1, array-1, the parquet row
    assert manifest["input"]["skipped_by_reason"] == {
        "empty_document": 2, "invalid_utf8": 1, "binary_file": 1, "too_short": 1, "invalid_json_line": 1,
        "missing_text_field": 2, "text_not_string": 1, "record_not_an_object": 1, "duplicate_document": 1,
        "conflicting_id": 1,
    }
    assert manifest["input"]["records_read"] == 16
    # the conflict is named with where the kept (first by file path) and the dropped records sit; the repeat is not
    conflicts = manifest["input"]["id_conflicts"]
    assert (conflicts["conflicting_ids"], conflicts["records_dropped"]) == (1, 1)
    assert [(e["id"], Path(e["kept"]["file"]).name, e["kept"]["line"], [(Path(d["file"]).name, d["line"])
             for d in e["dropped"]]) for e in conflicts["examples"]] == [("array-1", "array.json", 1, [("docs.jsonl", 7)])]
    [note] = [n for n in manifest["notes"] if "conflicting_id" in n]
    assert "'array-1' (kept array.json element 1; dropped docs.jsonl line 7)" in note and "jsonl-1" not in note
    assert {k: [Path(f).name for f in v] for k, v in manifest["input"]["files_read_as"].items()} == {
        "json_array": ["array.json"], "jsonl": ["docs.jsonl"], "parquet": ["p.parquet", "q.parquet"],
        "text": ["blank.md", "empty.txt", "good.txt", "image.txt", "latin1.txt", "short.txt"]}


def _outcome(out: Path, *overrides: str) -> tuple[dict, dict]:
    """(what the run decided and wrote, its request counts): exit status, verdict counts, QA table, samples."""
    from ctxforge.pipeline.concat import EmptyStageError

    try:
        synthesize(config(out, "generator.backend=fake", *overrides))
        status = "ok"
    except EmptyStageError:      # the CLI's exit 2: every stage is written, some empty
        status = "empty_stage"
    m = json.loads((out / "manifest.json").read_text())
    by_pass = {name: {k: p[k] for k in ("ok", "failed", "failures_by_reason", "failed_attempts_by_reason")}
               for name, p in m["requests"]["by_pass"].items()}
    qa = pq.read_table(out / "qa" / "qa.parquet").to_pylist()
    samples = {stage: [(r["sample_id"], r["input_ids"], r["loss_mask"]) for r in read_samples(out, stage)]
               for stage in ("2K", "4K")}
    decided = {"status": status, "by_pass": by_pass, "qa": m["qa"], "grounding": m["grounding"], "qa_rows": qa,
               "samples": samples, "built": {k: v["samples_built"] for k, v in m["stages"].items()},
               "rules": m["requests"]["verdict_rules"]}
    return decided, m["requests"]["total"]


def test_changed_rules_over_a_full_cache_give_the_fresh_runs_output(ray_local, tmp_path):
    """A cached answer is judged by the rules of the run that reads it: checks off then on into the same output
    decides, counts and writes what a fresh run with the checks on does (the fake engine's summaries quote the
    instructions, not the text, so the checks fail them); back off, nothing is sent and the first run's output
    returns."""
    off = ["checks.enabled=false"]
    on = ["checks.enabled=true"]
    first, first_total = _outcome(tmp_path / "reused", *off)
    fresh_on, _ = _outcome(tmp_path / "fresh-on", *on)
    assert first["status"] == "ok" and first["built"] == {"2K": 2, "4K": 2}
    assert sum(p["failures_by_reason"].get("unsupported:summary", 0) for p in fresh_on["by_pass"].values()) > 0
    assert fresh_on["qa"]["kept"] < first["qa"]["kept"]
    assert first != fresh_on                                          # negative control: the rules matter here
    reused_on, total = _outcome(tmp_path / "reused", *on)
    assert reused_on == fresh_on
    assert total["cache_hits"] > 0 and total["sent"] > 0              # summaries reused; failed QA's next attempts sent
    back_off, total = _outcome(tmp_path / "reused", *off)
    assert back_off == first and total["sent"] == 0 and total["cache_hits"] == first_total["requests"]
    # grounding and limits changed together: stricter quotes (new schemas, so new requests) and a longer minimum
    strict = [*off, "limits.quote_chars=40", "grounding.min_quote_chars=30", "grounding.on_ungrounded=drop"]
    reused_strict, _ = _outcome(tmp_path / "reused", *strict)
    assert reused_strict == _outcome(tmp_path / "fresh-strict", *strict)[0] != first
