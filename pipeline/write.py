"""Write the synthesis outputs: the QA table, Parquet sample shards per stage, manifest.json, summary.

Every file goes to a temporary name first and is renamed into place, and a stage's shard folder is
swapped in whole, so a crash leaves either the previous complete output or the new one.

Algorithm 2 runs in two parts (concat.py): the seeded plan (which documents each sample gets) in the
driver, sample by sample, from document sizes only; then rendering and tokenizing, the expensive
part, in `RenderPool`: actors that each load the target tokenizer once, read the documents and QA of
their samples from disk (docstore.py), render chunks of consecutive samples, and write the shards.
Shards hold the same rows in the same order as a sequential build, so the files are byte-identical
to `write_stage_samples`'s for any number of workers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ctxforge import __version__
from ctxforge.pipeline.concat import (
    RenderPlan, SampleSummary, StagePlan, build_stage_samples, document_reuse_note, render_planned, stage_stats,
)
from ctxforge.pipeline.config import ConcatConfig, StageConfig, SynthConfig
from ctxforge.pipeline.docstore import QA_SCHEMA, Location, QAIndex, SampleSource
from ctxforge.pipeline.documents import id_conflict_note
from ctxforge.pipeline.read import BUILTIN_KJV
from ctxforge.generation.stats import PassStats
from ctxforge.pipeline.prompts import load_prompt_set
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.generation.verdicts import rules_fingerprint
from ctxforge.schema import SAMPLE_SCHEMA

__all__ = ["QA_SCHEMA", "RenderPool", "SynthReport", "write_manifest", "write_qa_table", "write_stage_samples"]


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
    accounting: dict = field(default_factory=dict)
    projection: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)    # wall seconds per phase (read, generate, qa, samples)
    boilerplate: dict = field(default_factory=dict)   # documents stripped of each kind of wrapper at read time
    files_read_as: dict = field(default_factory=dict)  # {format read as: [input files]} (documents.files_read_as)
    id_conflicts: dict = field(default_factory=dict)   # records dropped for an id held by other text (select_documents)


def _atomic_table(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_qa_table(path: Path, records: list[QARecord]) -> None:
    rows = [asdict(r) for r in records]
    _atomic_table(path, pa.Table.from_pylist(rows, schema=QA_SCHEMA))


def _swap_in(tmp: Path, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _fresh(folder: Path) -> Path:
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _shard_name(n: int) -> str:
    return f"part-{n:05d}.parquet"


def write_stage_samples(folder: Path, stage: StageConfig, documents: list[DocumentQA], cfg: SynthConfig,
                        tokenizer, tok_hash: str) -> dict:
    """Algorithm 2 for one stage in this process, one sample after another (the reference for RenderPool)."""
    rows, stats = build_stage_samples(stage, documents, cfg.concat, tokenizer, tok_hash)
    tmp = _fresh(folder)
    per = cfg.output.rows_per_shard
    files = []
    for n, start in enumerate(range(0, len(rows), per)):
        pq.write_table(pa.Table.from_pylist(rows[start:start + per], schema=SAMPLE_SCHEMA), tmp / _shard_name(n))
        files.append(_shard_name(n))
    _swap_in(tmp, folder)
    return _stage_report(stage, stats, files)


def _stage_report(stage: StageConfig, stats: dict, files: list[str]) -> dict:
    # "documents_per_sample" reports the requested count (as readers of the manifest expect); the
    # histogram of documents per built sample keeps its own key
    return {**stats, "documents_per_sample_histogram": stats["documents_per_sample"],
            "target_tokens": stage.target_tokens, "documents_per_sample": stage.documents_per_sample,
            "samples_requested": stage.samples, "files": files}


class RenderWorker:
    """Renders planned samples: the target tokenizer loaded once, documents read from disk as needed."""

    def __init__(self, tokenizer_path: str, qa_path: str, tokenizer: Any = None):
        from ctxforge.models import load_tokenizer

        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
        self.source = SampleSource({}, QAIndex(qa_path, {}))

    def render(self, plans: list[RenderPlan], locations: dict[str, Location], qa_row_groups: dict[str, int],
               stage: StageConfig, concat: ConcatConfig, tok_hash: str):
        """(Arrow table of the built rows, ([SampleSummary], Counter)) for consecutive planned samples."""
        self.source.add(locations, qa_row_groups)
        rows, summaries, counters = [], [], Counter()
        for rp in plans:
            row = render_planned(rp, [self.source.get(i) for i in rp.doc_ids], stage, concat, self.tokenizer,
                                 tok_hash, counters)
            summaries.append(SampleSummary.of(rp.index, row))
            if row is not None:
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), (summaries, counters)

    def write(self, path: str, parts: list, slices: list[tuple[int, int]]) -> int:
        """Write rows [offset, offset + length) of each part (Arrow tables, in order) as one shard."""
        import ray

        tables = ray.get(parts)
        shard = pa.concat_tables([t.slice(o, n) for t, (o, n) in zip(tables, slices)]).combine_chunks()
        pq.write_table(shard, path)
        return shard.num_rows


IN_DRIVER_MAX_TOKENS = 2_000_000   # about 16 s of tokenizing on one core: less than starting workers costs


def render_workers(setting: int | None, stages: list[StageConfig]) -> int:
    """Actors to render with (0 = in the driver) for runtime.render_workers = `setting`."""
    import ray

    if setting is not None:
        return setting
    if sum(s.samples * s.target_tokens for s in stages) <= IN_DRIVER_MAX_TOKENS:
        return 0
    return max(1, min(32, int(ray.cluster_resources().get("CPU", 1))))


class RenderPool:
    """`workers` RenderWorker actors (1 CPU each), used for every stage, then released; 0 = in this process.

    Work goes out in chunks of consecutive samples, at most two per worker at a time; a shard is
    written (by a worker) as soon as all the samples before its end are rendered, so finished rows
    do not pile up in the object store. Workers are restarted by Ray if their node is lost, and
    their calls retried: rendering is a pure function of the plan.
    """

    def __init__(self, workers: int, tokenizer_path: str, locations: dict[str, Location], qa: QAIndex,
                 tokenizer: Any = None):
        import ray

        self.n = workers
        self.locations = locations
        self.qa = qa
        if workers == 0:
            self.local = RenderWorker(tokenizer_path, qa.path, tokenizer)
            self.actors = []
            return
        actor = ray.remote(RenderWorker).options(num_cpus=1, max_restarts=-1, max_task_retries=-1)
        self.actors = [actor.remote(tokenizer_path, qa.path) for _ in range(workers)]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def _where(self, plans: list[RenderPlan]) -> tuple[dict[str, Location], dict[str, int]]:
        ids = {i for sp in plans for i in sp.doc_ids}
        return ({i: self.locations[i] for i in ids},
                {i: self.qa.row_groups[i] for i in ids if i in self.qa.row_groups})

    def write_stage(self, folder: Path, stage: StageConfig, plan: StagePlan, cfg: SynthConfig, tok_hash: str) -> dict:
        if self.n == 0:
            return self._write_stage_here(folder, stage, plan, cfg, tok_hash)
        import ray

        samples = plan.samples
        size = max(1, min(16, math.ceil(len(samples) / (4 * self.n)))) if samples else 1
        chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
        tmp = _fresh(folder)
        per = cfg.output.rows_per_shard
        done_chunks: dict[int, tuple[Any, tuple]] = {}   # chunk index -> (table ref, (summaries, counters))
        summaries: list[SampleSummary] = []
        counters: Counter = Counter()
        in_flight: dict = {}          # meta ref -> (chunk index, table ref, worker)
        load = [0] * self.n
        writes: list = []
        files: list[str] = []
        carry: list[list] = []        # [table ref, offset, rows] not yet in a shard, in sample order
        carry_rows = 0
        next_chunk = next_in_order = 0

        def flush(final: bool) -> None:
            nonlocal carry_rows
            while carry_rows >= per or (final and carry_rows):
                take, parts, slices = min(per, carry_rows), [], []
                while take:
                    ref, off, n = carry[0]
                    k = min(n, take)
                    parts.append(ref)
                    slices.append((off, k))
                    take -= k
                    carry_rows -= k
                    if k == n:
                        carry.pop(0)
                    else:
                        carry[0] = [ref, off + k, n - k]
                name = _shard_name(len(files))
                writes.append(self.actors[len(files) % self.n].write.remote(str(tmp / name), parts, slices))
                files.append(name)

        while next_chunk < len(chunks) or in_flight:
            while next_chunk < len(chunks) and min(load) < 2:
                w = load.index(min(load))
                locations, qa_groups = self._where(chunks[next_chunk])
                table_ref, meta_ref = self.actors[w].render.options(num_returns=2).remote(
                    chunks[next_chunk], locations, qa_groups, stage, cfg.concat, tok_hash)
                in_flight[meta_ref] = (next_chunk, table_ref, w)
                load[w] += 1
                next_chunk += 1
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for meta_ref in ready:
                index, table_ref, w = in_flight.pop(meta_ref)
                load[w] -= 1
                done_chunks[index] = (table_ref, ray.get(meta_ref))
            while next_in_order in done_chunks:       # shards take rows in sample order
                table_ref, (chunk_summaries, chunk_counters) = done_chunks.pop(next_in_order)
                next_in_order += 1
                summaries.extend(chunk_summaries)
                counters.update(chunk_counters)
                n = sum(1 for x in chunk_summaries if x.built)
                if n:
                    carry.append([table_ref, 0, n])
                    carry_rows += n
                flush(final=False)
        flush(final=True)
        ray.get(writes)
        _swap_in(tmp, folder)
        return _stage_report(stage, stage_stats(stage, plan, summaries, counters), files)

    def _write_stage_here(self, folder: Path, stage: StageConfig, plan: StagePlan, cfg: SynthConfig,
                          tok_hash: str) -> dict:
        """The same rows and shards, rendered one after another in this process (reads from disk as it goes)."""
        tmp = _fresh(folder)
        per = cfg.output.rows_per_shard
        summaries: list[SampleSummary] = []
        counters: Counter = Counter()
        rows: list[dict] = []
        files: list[str] = []
        source = self.local.source
        source.add(*self._where(plan.samples))
        for rp in plan.samples:
            row = render_planned(rp, [source.get(i) for i in rp.doc_ids], stage, cfg.concat, self.local.tokenizer,
                                 tok_hash, counters)
            summaries.append(SampleSummary.of(rp.index, row))
            if row is not None:
                rows.append(row)
            if len(rows) == per:
                pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), tmp / _shard_name(len(files)))
                files.append(_shard_name(len(files)))
                rows = []
        if rows:
            pq.write_table(pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA), tmp / _shard_name(len(files)))
            files.append(_shard_name(len(files)))
        _swap_in(tmp, folder)
        return _stage_report(stage, stage_stats(stage, plan, summaries, counters), files)


def _more_documents(report: SynthReport) -> str:
    """How this run could have had more documents: the input, and the input keys that left some out."""
    cfg, skipped = report.config.input, report.skipped
    ways = ["add documents to input.path"]
    if skipped.get("over_limit"):
        ways.append(f"raise input.limit (now {cfg.limit}; {skipped['over_limit']} records were left out by it)")
    if skipped.get("too_long"):
        ways.append(f"raise input.max_document_tokens (now {cfg.max_document_tokens}; {skipped['too_long']} records "
                    f"were too long)")
    return ", or ".join(ways)


def _notes(report: SynthReport) -> list[str]:
    notes = []
    path = report.config.input.path
    local = path != BUILTIN_KJV and "://" not in path
    if note := id_conflict_note(report.id_conflicts, report.config.input.id_field,
                                os.path.abspath(path) if local else ""):
        notes.append(note)
    overall = report.grounding.get("overall", {})
    total, rate = overall.get("total", 0), overall.get("rate", 0.0)
    policy = report.config.grounding.on_ungrounded
    if total and policy == "flag":
        ungrounded = total - overall.get("grounded", 0)
        notes.append(f"grounding.on_ungrounded=flag: {ungrounded} of the {total} QA pairs checked for grounding had "
                     f"no evidence quote found in their evidence; those that passed the other checks were KEPT, "
                     f"flagged (grounded: false), in the QA table and the samples.")
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
        if note := document_reuse_note(st, _more_documents(report)):
            notes.append(note)
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
                      "temperature": cfg.generator.temperature, "top_p": cfg.generator.top_p,
                      "repetition_penalty": cfg.generator.repetition_penalty},
        "tokenizer": {"spec": cfg.target.tokenizer, "path": report.tokenizer_path, "hash": report.tokenizer_hash},
        "input": {"records_read": report.records_read, "documents": report.documents,
                  "skipped_by_reason": report.skipped, "boilerplate_stripped": report.boilerplate,
                  "files_read_as": report.files_read_as, "id_conflicts": report.id_conflicts},
        "chunking": {"small_chunks": report.chunks, "sections": report.sections, "document_tokens": report.tokens},
        "estimate": report.estimate,
        "requests": {
            "by_pass": {name: s.to_dict() for name, s in report.passes.items()},
            "total": report.totals.to_dict(),
            "cache_hits": report.totals.cache_hits,
            "cache_entries": report.cache_counts,
            # the rules every verdict above was decided by in this run (cached raw outputs are judged again)
            "verdict_rules": rules_fingerprint(cfg.checks.model_dump(mode="json"), cfg.generator.max_attempts,
                                               cfg.grounding.model_dump(mode="json")),
        },
        "failures_by_reason": dict(report.totals.failures),
        "qa": {"generated_by_type": report.qa_generated, "dropped": report.qa_dropped, "kept": report.qa_kept},
        "grounding": {**report.grounding, "policy": cfg.grounding.on_ungrounded, "min_score": cfg.grounding.min_score},
        "stages": report.stages,
        "projection": report.projection,
        "accounting": report.accounting,
        "timings_s": {k: round(v, 2) for k, v in report.timings.items()},
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
    # passes overlap when documents stream: the generation phase's wall time, not the sum of the passes'
    gen_s = max(report.timings.get("generate_s", t.wall_s), 1e-9)
    rows = [
        ("documents (records read)", f"{report.documents} ({report.records_read})"),
        ("skipped records", ", ".join(f"{k}={v}" for k, v in report.skipped.items()) or "0"),
        ("input files read as", ", ".join(f"{k}={len(v)}" for k, v in report.files_read_as.items()) or "-"),
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
    if report.accounting:
        console.print(accounting_table(report))
    for note in report.notes:
        console.print(f"[bold yellow]note:[/] {note}")


def accounting_table(report: SynthReport):
    """Per pass: requests, tokens, generating time and cost; the caption has the engines' load / idle time."""
    from rich.table import Table

    acc = report.accounting
    e, t = acc["engines"], acc["total"]
    gpus = e["gpus_per_engine"]

    def amount(seconds: float) -> str:
        return f"{seconds * gpus / 3600:,.3f}" if gpus else f"{seconds:,.1f}"

    unit = "GPU-h" if gpus else "engine-s"
    caption = (f"{e['engines']} engines ({e['loads']} loads, {e['lost']} lost); {unit}: loading "
               f"{amount(t['engine_load_s'])}, generating {amount(t['engine_generating_s'])}, idle "
               f"{amount(t['engine_idle_s'])} (busy {e['busy_fraction']:.0%}); cost ${t['cost_usd']:,.2f}")
    table = Table(title="generation accounting", caption=caption, show_header=True)
    for col in ("pass", "requests", "sent", "prompt tok", "compl. tok", f"gen. {unit}", "cost $"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    rows = [(name, p) for name, p in acc["by_pass"].items()] + [("total", {**t, "engine_generating_s": t["engine_generating_s"]})]
    for name, p in rows:
        table.add_row(name, f"{p['requests']:,}", f"{p['sent']:,}", f"{p['prompt_tokens']:,}",
                      f"{p['completion_tokens']:,}", amount(p["engine_generating_s"]), f"{p['cost_usd']:,.2f}")
    return table
