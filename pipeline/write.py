"""Write the synthesis outputs: the QA table, Parquet sample shards per stage, manifest.json, summary.

Every file goes to a temporary name first and is renamed into place, and a stage's shard folder is
swapped in whole, so a crash leaves either the previous complete output or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctxforge import __version__
from ctxforge.pipeline.concat import build_stage_samples
from ctxforge.pipeline.config import StageConfig, SynthConfig
from ctxforge.pipeline.passes import PassStats
from ctxforge.pipeline.prompts import load_prompt_set
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.schema import SAMPLE_SCHEMA

QA_SCHEMA = pa.schema([
    ("qa_id", pa.string()), ("doc_id", pa.string()), ("kind", pa.string()), ("qtype", pa.string()),
    ("order", pa.int64()), ("question", pa.string()), ("answer", pa.string()),
    ("evidence_ids", pa.list_(pa.string())), ("evidence_quote", pa.string()), ("grounded", pa.bool_()),
    ("grounding_score", pa.float64()), ("parent_qa_id", pa.string()), ("request_id", pa.string()),
    ("quote_grounded", pa.bool_()), ("grounding_basis", pa.string()), ("answer_support", pa.float64()),
    ("judge", pa.string()), ("evidence_quotes", pa.list_(pa.string())), ("section_end", pa.int64()),
])


@dataclass
class SynthReport:
    out_dir: str
    config: SynthConfig
    config_label: str
    backend: dict
    tokenizer_path: str
    tokenizer_hash: str
    records_read: int
    documents: int
    skipped: dict
    chunks: int
    sections: int
    tokens: int
    estimate: dict
    passes: dict[str, PassStats]
    totals: PassStats
    cache_counts: dict
    qa_generated: dict
    qa_dropped: dict
    qa_kept: int
    grounding: dict
    stages: dict
    wall_s: float
    tiny_model: bool = False
    notes: list[str] = field(default_factory=list)
    boilerplate: dict = field(default_factory=dict)   # documents stripped of each kind of wrapper at read time


def _atomic_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_qa_table(path: Path, records: list[QARecord]) -> None:
    rows = [asdict(r) for r in records]
    _atomic_table(path, pa.Table.from_pylist(rows, schema=QA_SCHEMA))


def write_stage_samples(folder: Path, stage: StageConfig, documents: list[DocumentQA], cfg: SynthConfig,
                        tokenizer, tok_hash: str) -> dict:
    rows, stats = build_stage_samples(stage, documents, cfg.concat, tokenizer, tok_hash)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    per = cfg.output.rows_per_shard
    files = []
    for n, start in enumerate(range(0, len(rows), per)):
        name = f"part-{n:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[start:start + per], schema=SAMPLE_SCHEMA), tmp / name)
        files.append(name)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return {**stats, "target_tokens": stage.target_tokens, "documents_per_sample": stage.documents_per_sample,
            "samples_requested": stage.samples, "files": files}


def _notes(report: SynthReport) -> list[str]:
    notes = []
    overall = report.grounding.get("overall", {})
    total, rate = overall.get("total", 0), overall.get("rate", 0.0)
    policy = report.config.grounding.on_ungrounded
    if total and policy == "flag":
        ungrounded = total - overall.get("grounded", 0)
        notes.append(f"grounding.on_ungrounded=flag: {ungrounded} of {total} QA pairs are ungrounded (their evidence "
                     f"quote was not found in their evidence) and were KEPT, flagged, in the samples.")
    if total and rate < 0.5:
        notes.append(f"Grounding rate is {rate:.1%}: most answers are not supported by a verbatim quote. "
                     + ("The generator is the random-weight tiny model, which grounds nothing: this data only "
                        "exercises the pipeline and must not be trained on for quality." if report.tiny_model
                        else "Check the generator and prompts before training on this data."))
    if report.totals.failed:
        notes.append(f"{report.totals.failed} requests failed after all attempts; see failures_by_reason.")
    for name, st in report.stages.items():
        built, wanted = st.get("samples_built", 0), st["samples_requested"]
        if built < wanted:
            pool = st.get("pool", {})
            notes.append(f"stage {name}: {built} of {wanted} samples built (skipped: {st.get('skip_reasons', {})}; "
                         f"documents too long for {st['target_tokens']} tokens with their QA: {pool.get('too_long', 0)}, "
                         f"without QA: {pool.get('without_qa', 0)}). Raise the stage's target_tokens, lower "
                         f"input.max_document_tokens, or add documents.")
    return notes


def write_manifest(path: Path, report: SynthReport) -> None:
    report.notes = _notes(report)
    cfg = report.config
    prompt_set = load_prompt_set(cfg.generator.prompts)
    manifest = {
        "ctxforge_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "notes": report.notes,
        "config_source": report.config_label,
        "config": cfg.model_dump(mode="json"),
        "generator": {**report.backend, "prompt_set_version": prompt_set.version, "prompt_set_hash": prompt_set.hash,
                      "prompt_set_path": prompt_set.path,
                      "temperature": cfg.generator.temperature, "top_p": cfg.generator.top_p},
        "tokenizer": {"spec": cfg.target.tokenizer, "path": report.tokenizer_path, "hash": report.tokenizer_hash},
        "input": {"records_read": report.records_read, "documents": report.documents,
                  "skipped_by_reason": report.skipped, "boilerplate_stripped": report.boilerplate},
        "chunking": {"small_chunks": report.chunks, "sections": report.sections, "document_tokens": report.tokens},
        "estimate": report.estimate,
        "requests": {
            "by_pass": {name: s.to_dict() for name, s in report.passes.items()},
            "total": report.totals.to_dict(),
            "cache_hits": report.totals.cache_hits,
            "cache_entries": report.cache_counts,
        },
        "failures_by_reason": dict(report.totals.failures),
        "qa": {"generated_by_type": report.qa_generated, "dropped": report.qa_dropped, "kept": report.qa_kept},
        "grounding": {**report.grounding, "policy": cfg.grounding.on_ungrounded, "min_score": cfg.grounding.min_score},
        "stages": report.stages,
        "wall_s": round(report.wall_s, 2),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def print_summary(report: SynthReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = report.totals
    table = Table(title=f"ctxforge synth: {report.out_dir}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    gen_s = max(t.wall_s, 1e-9)
    rows = [
        ("documents (records read)", f"{report.documents} ({report.records_read})"),
        ("skipped records", ", ".join(f"{k}={v}" for k, v in report.skipped.items()) or "0"),
        ("small chunks / sections", f"{report.chunks} / {report.sections}"),
        ("requests (cache hits)", f"{t.requests} ({t.cache_hits})"),
        ("generated ok / failed", f"{t.ok} / {t.failed}"),
        ("prompt / completion tokens", f"{t.prompt_tokens:,} / {t.completion_tokens:,}"),
        ("completion tokens/s", f"{t.completion_tokens / gen_s:,.1f}"),
        ("failures", ", ".join(f"{k}={v}" for k, v in t.failures.items()) or "0"),
        ("QA kept", str(report.qa_kept)),
        ("grounding rate", f"{report.grounding.get('overall', {}).get('rate', 0.0):.1%}"),
    ]
    for name, st in report.stages.items():
        fill = st.get("fill", {})
        qa = st.get("qa_turns_per_sample", {})
        rows.append((f"stage {name} samples (fill mean, QA per sample)",
                     f"{st.get('samples_built', 0)}/{st['samples_requested']} ({fill.get('mean', 0):.0%}, "
                     f"{qa.get('mean', 0):.1f})"))
    rows.append(("wall time", f"{report.wall_s:.1f} s"))
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)
    for note in report.notes:
        console.print(f"[bold yellow]note:[/] {note}")
