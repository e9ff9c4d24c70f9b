"""`ctxforge synth`: preflight -> read + chunk -> Algorithm 1 per wave -> grounding -> Algorithm 2 -> write.

Everything written is either content-addressed (the request cache) or a deterministic function of
it and the config (QA table, samples, manifest), written to a temporary name and renamed into place.
So a killed run started again with the same command redoes no finished request, and its output
equals an uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.models import TINY_MODEL_SPEC, load_tokenizer, resolve_model_path, tokenizer_hash
from ctxforge.pipeline.cache import RequestCache
from ctxforge.pipeline.concat import EmptyStageError, stage_failure
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.documents import (boilerplate_counts, build_documents_table, load_doc_states, no_document_error,
                                         select_documents)
from ctxforge.pipeline.generate import PASSES, QAAssembler, WaveGenerator
from ctxforge.pipeline.hierarchy import Planner
from ctxforge.pipeline.passes import PassRunner, PassStats
from ctxforge.pipeline.prompts import PromptSetError, load_prompt_set
from ctxforge.pipeline.write import SynthReport, write_qa_table, write_stage_samples, write_manifest
from ctxforge.raycluster import init_ray

log = logging.getLogger(__name__)


@dataclass
class Preflight:
    target_path: str
    generator_path: str
    tokenizer: object
    tokenizer_hash: str
    budget_tokenizer: object   # counts tokens for the generator's prompt budget
    cache_dir: str


def cache_dir() -> str:
    return os.environ.get("CTXFORGE_CACHE", str(Path.home() / ".cache" / "ctxforge"))


def preflight(cfg: SynthConfig) -> Preflight:
    try:
        load_prompt_set(cfg.generator.prompts)  # every template's placeholders, before any work
    except PromptSetError as exc:
        raise PreflightError(str(exc)) from None
    try:
        target_path = resolve_model_path(cfg.target.tokenizer, cache_dir())
    except FileNotFoundError as exc:
        raise PreflightError(f"target.tokenizer: {exc}") from None
    try:
        generator_path = resolve_model_path(cfg.generator.model, cache_dir())
    except FileNotFoundError as exc:
        raise PreflightError(f"generator.model: {exc}") from None
    if cfg.generator.backend == "hf" and not Path(generator_path).is_dir():
        raise PreflightError(
            f"generator.model {cfg.generator.model!r}: the hf backend needs a local model directory "
            f"(no model hub is reached at run time); download it first or use generator.backend=vllm/http")
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
    if cfg.input.path != "builtin:kjv" and "://" not in cfg.input.path and not Path(cfg.input.path).exists():
        raise PreflightError(f"input.path {cfg.input.path!r} does not exist")
    if cfg.generator.backend == "http" and not os.environ.get(cfg.generator.api_key_env):
        log.warning("generator.api_key_env: $%s is not set; requests go without an API key", cfg.generator.api_key_env)
    return Preflight(target_path, generator_path, tokenizer, tokenizer_hash(tokenizer), budget, cache_dir())


def make_backend(cfg: SynthConfig, model_path: str):
    if cfg.generator.backend == "hf":
        from ctxforge.pipeline.generators.hf import HFBackend
        return HFBackend(cfg.generator, model_path)
    if cfg.generator.backend == "http":
        from ctxforge.pipeline.generators.http import HTTPBackend
        # the endpoint knows the model by its served name, not by a resolved path
        return HTTPBackend(cfg.generator, cfg.generator.model)
    from ctxforge.pipeline.generators.vllm import VLLMBackend
    return VLLMBackend(cfg.generator, model_path)


def estimate_requests(cfg: SynthConfig, docs: list[dict]) -> dict:
    """The cost model printed before a run: requests per document from its size and the budgets."""
    per_medium = cfg.chunking.smalls_per_medium
    small = sum(max(1, -(-d["n_tokens"] // cfg.chunking.small_tokens)) for d in docs)
    medium = sum(max(1, -(-max(1, -(-d["n_tokens"] // cfg.chunking.small_tokens)) // per_medium)) for d in docs)
    qa = len(docs) * (cfg.qa.hierarchical_per_document + cfg.qa.diverse_per_document)
    return {"documents": len(docs), "tokens": sum(d["n_tokens"] for d in docs), "small_summaries": small,
            "section_summaries<=": medium, "global_summaries>=": len(docs), "qa_requests": qa,
            "total>=": small + len(docs) + qa}


def synthesize(cfg: SynthConfig, config_label: str = "") -> SynthReport:
    started = time.time()
    pre = preflight(cfg)
    out = Path(cfg.output.dir).expanduser().resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    init_ray(cfg.run.address, cfg.run.num_cpus, cfg.run.progress)

    table, reused = build_documents_table(cfg, pre.target_path, pre.tokenizer_hash, work, pre.cache_dir)
    kept, skipped, n_records = select_documents(table, cfg.input.limit)
    if not kept:
        raise PreflightError(no_document_error(cfg, skipped, n_records))
    estimate = estimate_requests(cfg, kept)
    log.info("documents table %s; %d documents kept of %d records; estimate %s",
             "reused" if reused else "built", len(kept), n_records, estimate)

    cache = RequestCache(work / "requests.sqlite")
    backend = make_backend(cfg, pre.generator_path)
    planner = Planner(cfg, lambda text: len(pre.budget_tokenizer(text, add_special_tokens=False)["input_ids"]))
    generator = WaveGenerator(cfg, planner, PassRunner(backend, cache, cfg.generator), backend.model_path)
    assembler = QAAssembler(cfg)
    documents, qa_records, chunk_count, section_count = [], [], 0, 0
    wave = cfg.run.documents_per_wave
    for start in range(0, len(kept), wave):
        ids = [d["doc_id"] for d in kept[start:start + wave]]
        states = load_doc_states(table, ids)
        label = f"wave {start // wave + 1}/{-(-len(kept) // wave)}"
        generator.run_wave(states, label)
        for state in states:
            chunk_count += len(state.chunks)
            section_count += len(state.sections)
            doc_qa, records = assembler.assemble(state)
            documents.append(doc_qa)
            qa_records.extend(records)
    cache_counts = cache.count()
    cache.close()

    write_qa_table(out / "qa" / "qa.parquet", qa_records)
    stage_reports = {}
    for stage in cfg.concat.stages:
        stage_reports[stage.name] = write_stage_samples(out / "samples" / stage.name, stage, documents, cfg,
                                                        pre.tokenizer, pre.tokenizer_hash)
    totals = PassStats()
    for stats in generator.pass_stats.values():
        totals.merge(stats)
    report = SynthReport(
        out_dir=str(out), config=cfg, config_label=config_label, backend=backend.describe(),
        tokenizer_path=pre.target_path, tokenizer_hash=pre.tokenizer_hash, records_read=n_records,
        documents=len(documents), skipped=dict(skipped), chunks=chunk_count, sections=section_count,
        tokens=sum(d.n_tokens for d in documents), estimate=estimate,
        passes={p: generator.pass_stats[p] for p in PASSES}, totals=totals, cache_counts=cache_counts,
        qa_generated=dict(assembler.generated), qa_dropped=dict(assembler.dropped), qa_kept=len(qa_records),
        grounding=assembler.grounding.to_dict(), stages=stage_reports, wall_s=time.time() - started,
        boilerplate=boilerplate_counts(table),
        tiny_model=TINY_MODEL_SPEC in (cfg.generator.model, cfg.target.tokenizer),
    )
    write_manifest(out / "manifest.json", report)
    empty = [msg for msg in (stage_failure(st, cfg.concat) for st in stage_reports.values()) if msg]
    if empty:  # everything is written (a rerun reuses it); the run still fails, saying what to change
        raise EmptyStageError(" | ".join(empty))
    return report
