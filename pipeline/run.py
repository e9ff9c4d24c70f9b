"""`ctxforge synth`: preflight -> read + chunk -> Algorithm 1 -> grounding -> Algorithm 2 -> write.

Algorithm 1 streams: documents are admitted from the documents table a few at a time, each advances
through its passes as its own answers come back, on engines that load once for the whole run (a
client of ctxforge.generation: document_passes.py hands its requests to a scheduler of `Generation`); a finished document's QA go to the QA table and its state
leaves the driver. Algorithm 2 plans in the driver and renders in parallel workers (write.py).

Everything written is either content-addressed (the request cache) or a deterministic function of
it and the config (QA table, samples, manifest), written to a temporary name and renamed into place.
So a killed run started again with the same command redoes no finished request, and its output
equals an uninterrupted run's. Nothing is written before preflight has passed, so a typo costs
nothing: the corrected command runs as if the first had never been.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.generation.accounting import accounting
from ctxforge.generation.backends.base import GeneratorBackend
from ctxforge.generation.cache import RequestCache
from ctxforge.generation.preflight import generator_backend
from ctxforge.generation.session import Generation
from ctxforge.generation.stats import PassStats
from ctxforge.models import TINY_MODEL_SPEC, load_tokenizer, resolve_model_path, tokenizer_hash
from ctxforge.pipeline.checks import check_output
from ctxforge.pipeline.concat import EmptyStageError, PoolDocument, plan_stage_samples, stage_failure
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.docstore import DocumentStore, QAWriter
from ctxforge.pipeline.documents import (boilerplate_counts, build_documents_table, files_read_as, no_document_error,
                                         select_documents)
from ctxforge.pipeline.document_passes import PASS_NAMES, QAAssembler, StreamingGenerator
from ctxforge.pipeline.hierarchy import DocState, RequestPlanner
from ctxforge.pipeline.projection import projection, projection_line
from ctxforge.pipeline.prompts import PromptSetError, answer_schemas, load_prompt_set
from ctxforge.pipeline.read import holds_a_file
from ctxforge.pipeline.write import RenderPool, SynthReport, render_workers, write_manifest
from ctxforge.raycluster import init_ray
from ctxforge.schema_keywords import unenforceable

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    target_path: str
    generator_path: str
    tokenizer: object
    tokenizer_hash: str
    budget_tokenizer: object   # counts tokens for the generator's prompt budget
    cache_dir: str
    backend: GeneratorBackend


def cache_dir() -> str:
    return os.environ.get("CTXFORGE_CACHE", str(Path.home() / ".cache" / "ctxforge"))


def preflight(cfg: SynthConfig) -> Preflight:
    try:
        load_prompt_set(cfg.generator.prompts)  # every template's placeholders, before any work
    except PromptSetError as exc:
        raise PreflightError(str(exc)) from None
    for prompts_using, schema in answer_schemas(cfg.limits).items():  # enforced exactly or not run at all
        if (err := unenforceable(schema)) is not None:
            raise PreflightError(f"answer schema of prompt {prompts_using}: {err}")
    try:
        target_path = resolve_model_path(cfg.target.tokenizer, cache_dir())
    except FileNotFoundError as exc:
        raise PreflightError(f"target.tokenizer: {exc}") from None
    try:
        generator_path = resolve_model_path(cfg.generator.model, cache_dir())
    except FileNotFoundError as exc:
        raise PreflightError(f"generator.model: {exc}") from None
    try:
        tokenizer = load_tokenizer(target_path)
    except Exception as exc:  # an unreadable tokenizer must stop the run before any work
        raise PreflightError(f"target.tokenizer {cfg.target.tokenizer!r} could not be loaded: {exc}") from None
    budget = tokenizer
    if Path(generator_path).is_dir():
        try:
            budget = load_tokenizer(generator_path)
        except Exception as exc:
            raise PreflightError(f"generator.model {cfg.generator.model!r}: tokenizer could not be loaded: {exc}") from None
    if cfg.input.path != "builtin:kjv" and "://" not in cfg.input.path:
        local = Path(cfg.input.path)
        if not local.exists():
            raise PreflightError(f"input.path {cfg.input.path!r} does not exist")
        if local.is_dir() and not holds_a_file(local):
            raise PreflightError(f"input.path {cfg.input.path!r} holds no files")
    if "://" not in cfg.output.dir and Path(cfg.output.dir).exists() and not Path(cfg.output.dir).is_dir():
        raise PreflightError(f"output.dir {cfg.output.dir!r} is a file, not a directory")
    backend = generator_backend(cfg.generator, cache_dir(), cfg.runtime.address)
    return Preflight(target_path, generator_path, tokenizer, tokenizer_hash(tokenizer), budget, cache_dir(), backend)


def estimate_requests(cfg: SynthConfig, docs: list[dict]) -> dict:
    """The cost model printed before a run: requests per document from its size and the budgets."""
    per_medium = cfg.chunking.smalls_per_medium
    small = sum(max(1, -(-d["n_tokens"] // cfg.chunking.small_tokens)) for d in docs)
    medium = sum(max(1, -(-max(1, -(-d["n_tokens"] // cfg.chunking.small_tokens)) // per_medium)) for d in docs)
    qa = len(docs) * (cfg.qa.hierarchical_per_document + cfg.qa.diverse_per_document)
    return {"documents": len(docs), "tokens": sum(d["n_tokens"] for d in docs), "small_summaries": small,
            "section_summaries<=": medium, "global_summaries>=": len(docs), "qa_requests": qa,
            "total>=": small + len(docs) + qa}


class _Finished:
    """Takes finished documents (any order): QA records to the QA table (in order), sizes for Algorithm 2."""

    def __init__(self, cfg: SynthConfig, n_documents: int, qa_path: Path, tokenizer):
        self.assembler = QAAssembler(cfg)
        # documents with special-token strings are looked for only when they are to be left out
        self.tokenizer = tokenizer if cfg.concat.special_tokens == "skip_document" else None
        self.writer = QAWriter(qa_path)
        self.pool: list[PoolDocument | None] = [None] * n_documents
        self.chunks = self.sections = self.tokens = self.qa_kept = 0

    def __call__(self, rank: int, state: DocState) -> None:
        self.chunks += len(state.chunks)
        self.sections += len(state.sections)
        self.tokens += state.n_tokens
        doc_qa, records = self.assembler.assemble(state)
        self.qa_kept += len(records)
        self.pool[rank] = PoolDocument.of(doc_qa, self.tokenizer)
        self.writer.add(rank, state.doc_id, records)


def _generate(cfg: SynthConfig, pre: Preflight, planner: RequestPlanner, cache: RequestCache,
              store: DocumentStore, ids: list[str], finished: _Finished) -> tuple[dict, list[dict], dict]:
    """Algorithm 1 over the documents `ids`: (statistics per pass, engine snapshots, engine counts)."""
    with Generation.open(pre.backend, cfg.generator, cache) as generation:
        scheduler = generation.scheduler(planner.prompts.hash, PASS_NAMES, content_check=check_output)
        StreamingGenerator(planner, scheduler, cfg.runtime.documents_in_flight).run(store.load(ids), finished)
    pool = generation.pool
    log.info("generation done: %d engines started, %d lost, %d requests sent again after a loss",
             pool.started, pool.lost_engines, scheduler.lost_resent)
    return scheduler.finish(), generation.engine_records(), pool.counts()


def synthesize(cfg: SynthConfig, config_label: str = "") -> SynthReport:
    started = time.time()
    pre = preflight(cfg)   # nothing is written before this passes
    out = Path(cfg.output.dir).expanduser().resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.runtime.address, cfg.runtime.num_cpus, cfg.runtime.progress)
    timings: dict[str, float] = {}

    table, reused = build_documents_table(cfg, pre.target_path, pre.tokenizer_hash, work, pre.cache_dir)
    kept, skipped, n_records, id_conflicts = select_documents(table, cfg.input.limit)
    if not kept:
        raise PreflightError(no_document_error(cfg, skipped, n_records))
    estimate = estimate_requests(cfg, kept)
    backend = pre.backend
    proj = projection(cfg, [d["n_tokens"] for d in kept], backend.gpus_per_engine(), backend.engine_range()[1])
    log.info("documents table %s; %d documents kept of %d records; estimate %s",
             "reused" if reused else "built", len(kept), n_records, estimate)
    log.info(projection_line(proj))
    store = DocumentStore.index(table)
    ids = [d["doc_id"] for d in kept]
    del kept
    timings["read_s"] = time.time() - started

    cache = RequestCache(work / "requests.sqlite")
    planner = RequestPlanner(cfg, lambda text: len(pre.budget_tokenizer(text, add_special_tokens=False)["input_ids"]))
    finished = _Finished(cfg, len(ids), out / "qa" / "qa.parquet", pre.tokenizer)
    t = time.time()
    pass_stats, engine_records, engine_counts = _generate(cfg, pre, planner, cache, store, ids, finished)
    timings["generate_s"] = time.time() - t
    qa_index = finished.writer.close()
    cache_counts = cache.count()
    cache.close()

    t = time.time()
    stage_reports = {}
    workers = render_workers(cfg.runtime.render_workers, cfg.concat.stages)
    render = RenderPool(workers, pre.target_path, {i: store.locations[i] for i in ids}, qa_index, pre.tokenizer)
    try:
        for stage in cfg.concat.stages:
            plan = plan_stage_samples(stage, finished.pool, cfg.concat)
            stage_reports[stage.name] = render.write_stage(out / "samples" / stage.name, stage, plan, cfg,
                                                           pre.tokenizer_hash)
    finally:
        render.close()
    timings["samples_s"] = time.time() - t
    timings["render_workers"] = workers
    passes = {p: pass_stats.get(p, PassStats()) for p in PASS_NAMES}
    passes.update({p: s for p, s in pass_stats.items() if p not in passes})
    totals = PassStats()
    for stats in passes.values():
        totals.merge(stats)
    assembler = finished.assembler
    report = SynthReport(
        out_dir=str(out), config=cfg, config_label=config_label, backend=backend.describe(),
        tokenizer_path=pre.target_path, tokenizer_hash=pre.tokenizer_hash, records_read=n_records,
        documents=len(ids), skipped=dict(skipped), chunks=finished.chunks, sections=finished.sections,
        tokens=finished.tokens, estimate=estimate, passes=passes, totals=totals, cache_counts=cache_counts,
        qa_generated=dict(assembler.generated), qa_dropped=dict(assembler.dropped), qa_kept=finished.qa_kept,
        grounding=assembler.grounding.to_dict(), stages=stage_reports, wall_s=time.time() - started,
        boilerplate=boilerplate_counts(table), files_read_as=files_read_as(table), id_conflicts=id_conflicts,
        tiny_model=TINY_MODEL_SPEC in (cfg.generator.model, cfg.target.tokenizer),
        accounting=accounting(passes, engine_records, backend.gpus_per_engine(), cfg.cost, engine_counts),
        projection=proj,
        timings=timings,
    )
    write_manifest(out / "manifest.json", report)
    empty = [msg for msg in (stage_failure(st, cfg.concat) for st in stage_reports.values()) if msg]
    if empty:  # everything is written (a rerun reuses it); the run still fails, saying what to change
        raise EmptyStageError(" | ".join(empty))
    return report
