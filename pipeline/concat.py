"""Algorithm 2 (He et al. 2025): several documents and their QA in one multi-turn conversation.

The plan (documents, cuts, turns; pure and seeded) is sample_plan.py's SamplePlanner. `plan_stage_samples` runs
it over a stage from document sketches (`PoolDocument`: sizes and ids, no text), in the driver, and
keeps of each sample what a renderer needs: its documents' ids, where each was cut, and its seed
(`RenderPlan`). Each planned sample is then rendered with the target tokenizer's chat template
(render.py) and fitted: when it is longer than the stage's target, the optional rest-of-last-document
turns go first, then whole turns from the end, then documents from the end (re-planned).
`render_sample` is a pure function of the plan and the documents, so any number of workers can run it
(write.py's RenderPool); `build_stage_samples` runs plan, render and `stage_stats` in this process.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

from ctxforge.config import PreflightError

from .config import ConcatConfig, StageConfig
from .records import DocumentQA
from .render import Rendered, render_detailed
from .sample_plan import (  # the sample plan's names are part of this module's interface (__all__)
    PART_DIVERSE,
    PART_EARLIER,
    PART_FOLLOWUP,
    PART_HIERARCHICAL,
    PART_REST_DIVERSE,
    PART_REST_HIERARCHICAL,
    PART_SUMMARY,
    REST_PARTS,
    PlannedTurn,
    PoolDocument,
    QASketch,
    SamplePlan,
    SamplePlanner,
    build_messages,
    cut_document,
    plan_conversation,
    stable_int,
)

__all__ = [
    "PART_DIVERSE", "PART_EARLIER", "PART_FOLLOWUP", "PART_HIERARCHICAL", "PART_REST_DIVERSE",
    "PART_REST_HIERARCHICAL", "PART_SUMMARY", "REST_PARTS", "EmptyStageError", "PlannedTurn", "PoolDocument",
    "QASketch", "RenderPlan", "SamplePlan", "SampleSummary", "StagePlan", "SamplePlanner", "build_messages",
    "build_stage_samples", "cut_document", "plan_conversation", "plan_stage_samples", "render_planned", "render_sample",
    "document_reuse_note", "sample_id", "stable_int", "stage_failure", "stage_stats",
]
HISTOGRAM_BINS = 10


class EmptyStageError(PreflightError):
    """A stage that built none of its samples: the run fails (after writing what it made) naming the stage,
    the reason and the key to change."""


def sample_id(stage_name: str, seed: int, index: int) -> str:
    return hashlib.sha256(f"sample\x1f{stage_name}\x1f{seed}\x1f{index}".encode("utf-8")).hexdigest()[:24]


def _turn_costs(rendered: Rendered) -> list[int]:
    """Tokens each turn adds: from the end of the previous answer to the end of its own."""
    ends = [rendered.tokens_before(end) for _, end in rendered.assistant_spans]
    return [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]


def _drop_rest(docs, turns, cfg, tokenizer, target, counters):
    """Drop rest-of-last-document turns (diverse first, each from its end) until the sample fits or none is left."""
    while True:
        messages, opened = build_messages(docs, turns, cfg)
        rendered = render_detailed(messages, tokenizer, contents_as_text=cfg.special_tokens == "as_text")
        excess = len(rendered.input_ids) - target
        rest = [i for i in reversed(range(len(turns))) if turns[i].part == PART_REST_DIVERSE]
        rest += [i for i in reversed(range(len(turns))) if turns[i].part == PART_REST_HIERARCHICAL]
        if excess <= 0 or not rest:
            return turns, messages, opened, rendered
        costs = _turn_costs(rendered)
        gone, freed = set(), 0
        for i in rest:
            gone.add(i)
            freed += costs[i]
            if freed >= excess:
                break
        counters["rest_turns_dropped_to_fit"] += len(gone)
        turns = [t for i, t in enumerate(turns) if i not in gone]


def _fit(plan: SamplePlan, cfg: ConcatConfig, tokenizer: Any, target: int, counters: Counter):
    """Render and trim until the sample fits; drop documents from the end when not even one turn fits."""
    docs = plan.documents
    for k in range(len(docs), 0, -1):
        sub = docs[:k]
        shortfalls: Counter = Counter()
        turns = plan_conversation(sub, cfg, random.Random(plan.seed), shortfalls)
        turns, messages, opened, rendered = _drop_rest(sub, turns, cfg, tokenizer, target, counters)
        j = len(turns)
        while j >= 1:
            if j < len(turns):
                messages, opened = build_messages(sub, turns[:j], cfg)
                rendered = render_detailed(messages, tokenizer, contents_as_text=cfg.special_tokens == "as_text")
            if len(rendered.input_ids) <= target:
                counters["turns_dropped_to_fit"] += len(turns) - j
                counters["documents_dropped_to_fit"] += len(docs) - len(opened)
                for part, n in shortfalls.items():
                    counters[f"shortfall:{part}"] += n
                return [sub[i] for i in opened], turns[:j], messages, rendered
            # Jump to the longest prefix of whole turns whose end falls within the target (one render);
            # the template may add a few tokens after the cut, so the next render verifies it.
            j = min(j - 1, _turns_within(rendered, target))
        # Not even the documents and one QA fit: drop the last document (and its QA) and re-plan.
    return None


def _turns_within(rendered: Rendered, target: int) -> int:
    n = 0
    for _, end in rendered.assistant_spans:
        if rendered.tokens_before(end) > target:
            break
        n += 1
    return n


def render_sample(plan: SamplePlan, stage: StageConfig, cfg: ConcatConfig, tokenizer: Any, tokenizer_hash: str,
                  counters: Counter) -> dict | None:
    """One sample row (ctxforge.schema.SAMPLE_SCHEMA) from its plan, or None when not even one turn fits."""
    fitted = _fit(plan, cfg, tokenizer, stage.target_tokens, counters)
    if fitted is None:
        return None
    in_context, turns, messages, rendered = fitted
    chunks = list(dict.fromkeys(e for t in turns for e in t.qa.evidence_ids))
    # in_context is always a prefix of the planned documents, so doc_index addresses it directly
    counters["documents_unasked"] += len(in_context) - len({t.doc_index for t in turns})
    counters["documents_cut"] += plan.cut
    counters["qa_left_out_by_cuts"] += plan.qa_cut
    for t in turns:
        counters[f"part:{t.part}"] += 1
    return {
        "sample_id": sample_id(stage.name, cfg.seed, plan.index),
        "stage": stage.name,
        "target_tokens": stage.target_tokens,
        "num_tokens": len(rendered.input_ids),
        "num_loss_tokens": int(sum(rendered.loss_mask)),
        "input_ids": rendered.input_ids,
        "loss_mask": rendered.loss_mask,
        "messages": messages,
        "documents": [d.doc_id for d in in_context],
        "chunks": chunks,
        "qa_ids": [t.qa.qa_id for t in turns],
        "num_questions": len(turns),
        "ungrounded_questions": sum(1 for t in turns if not t.qa.grounded),
        "tokenizer_hash": tokenizer_hash,
    }


def _summary(values: list[float]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


@dataclass(frozen=True)
class RenderPlan:
    """What a renderer needs of planned sample `index`: its documents in order, the section each was cut
    after (-1 = whole), the schedule's seed, and the plan's cut counts."""

    index: int
    doc_ids: tuple[str, ...]
    last_sections: tuple[int, ...]
    seed: int
    cut: int
    qa_cut: int

    @classmethod
    def of(cls, plan: SamplePlan, pool: dict[str, PoolDocument]) -> "RenderPlan":
        # a cut keeps fewer sections than the document has (SamplePlanner cuts before the last one)
        last = tuple(len(d.sections) - 1 if len(d.sections) < len(pool[d.doc_id].sections) else -1
                     for d in plan.documents)
        return cls(plan.index, tuple(d.doc_id for d in plan.documents), last, plan.seed, plan.cut, plan.qa_cut)


@dataclass
class StagePlan:
    samples: list[RenderPlan]
    skip_reasons: Counter       # samples not planned at all (no_document_fits)
    pool: dict                  # pool statistics for the manifest
    counters: Counter           # the planner's counters (samples_short_of_documents)


def plan_stage_samples(stage: StageConfig, pool: Sequence[PoolDocument], cfg: ConcatConfig) -> StagePlan:
    """The seeded, sequential part of Algorithm 2 (SamplePlanner) over document sketches: which documents
    each sample gets, cut where, and its schedule seed. Cheap (no text, no tokenizer), in sample order.

    concat.special_tokens=skip_document needs sketches made with a tokenizer (PoolDocument.of(doc, tok)).
    """
    by_id = {d.doc_id: d for d in pool}

    def exclude(doc: PoolDocument) -> str:
        if cfg.special_tokens != "skip_document":
            return ""
        if doc.special_tokens is None:
            raise ValueError(f"document {doc.doc_id}: concat.special_tokens=skip_document needs PoolDocument.of(doc, "
                             f"tokenizer)")
        return "special_tokens" if doc.special_tokens else ""

    planner = SamplePlanner(stage, pool, cfg, exclude)
    samples: list[RenderPlan] = []
    skip_reasons: Counter = Counter()
    for index in range(stage.samples):
        plan = planner.plan(index)
        if plan is None:
            skip_reasons["no_document_fits"] += 1
            continue
        samples.append(RenderPlan.of(plan, by_id))
    uses = [planner.cycler.uses.get(d.doc_id, 0) for d in planner.eligible]
    pool_stats = {
        "documents": len(pool),
        "eligible": len(planner.eligible),
        "too_long": planner.pool["too_long"],
        "without_qa": planner.pool["without_qa"],
        "special_tokens": planner.pool["special_tokens"],
        "used_distinct": sum(1 for u in uses if u),
        "uses": _summary(uses),
    }
    return StagePlan(samples, skip_reasons, pool_stats, Counter(planner.counters))


@dataclass(frozen=True)
class SampleSummary:
    """What the stage statistics need of a rendered sample (the row itself may live in another process)."""

    index: int
    built: bool
    num_tokens: int = 0
    num_documents: int = 0
    num_questions: int = 0
    ungrounded_questions: int = 0
    documents: tuple[str, ...] = ()   # the ids of the documents in its context, in order

    @classmethod
    def of(cls, index: int, row: dict | None) -> "SampleSummary":
        if row is None:
            return cls(index, False)
        return cls(index, True, row["num_tokens"], len(row["documents"]), row["num_questions"],
                   row["ungrounded_questions"], tuple(row["documents"]))


def render_planned(plan: RenderPlan, docs: Sequence[DocumentQA], stage: StageConfig, cfg: ConcatConfig,
                   tokenizer: Any, tokenizer_hash: str, counters: Counter) -> dict | None:
    """`render_sample` of a RenderPlan, given its full documents (in plan order), cut where the plan cut them.
    A pure function of its arguments: the same plan gives the same row in any process."""
    views = [cut_document(d, last)[0] if last >= 0 else d for d, last in zip(docs, plan.last_sections)]
    sample = SamplePlan(plan.index, views, [], plan.seed, plan.cut, plan.qa_cut)
    return render_sample(sample, stage, cfg, tokenizer, tokenizer_hash, counters)


def stage_stats(stage: StageConfig, plan: StagePlan, summaries: Sequence[SampleSummary], counters: Counter) -> dict:
    """The stage's statistics from its plan, its samples' summaries (in sample order) and the renders' counters.

    samples_built/skipped (+ skip_reasons), documents_per_sample histogram, qa_turns_per_sample and fill
    (min/mean/max), turns by schedule part, summary turns, token_length_histogram (10 bins over [0, target]),
    shortfalls per schedule part, documents/turns dropped to fit, documents cut (and the QA they left out),
    documents_unasked, pool usage, and document_reuse (how far the corpus fell short of the stage: see
    `document_reuse`).
    """
    counters = Counter(counters)
    counters.update(plan.counters)
    target = stage.target_tokens
    skip_reasons = Counter(plan.skip_reasons)
    built = [s for s in summaries if s.built]
    skip_reasons["no_qa_turn_fits"] += sum(1 for s in summaries if not s.built)
    skip_reasons = Counter({k: v for k, v in skip_reasons.items() if v})
    docs_hist = Counter(s.num_documents for s in built)
    bin_width = target / HISTOGRAM_BINS
    hist = [0] * HISTOGRAM_BINS
    for s in built:
        hist[min(int(s.num_tokens / bin_width), HISTOGRAM_BINS - 1)] += 1
    return {
        "stage": stage.name,
        "target_tokens": target,
        "samples_requested": stage.samples,
        "samples_built": len(built),
        "samples_skipped": sum(skip_reasons.values()),
        "skip_reasons": dict(skip_reasons),
        "documents_per_sample_requested": stage.documents_per_sample,
        "documents_per_sample": {str(k): v for k, v in sorted(docs_hist.items())},
        "samples_short_of_documents": counters["samples_short_of_documents"],
        "qa_turns_per_sample": _summary([s.num_questions for s in built]),
        "turns_by_part": {k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("part:")},
        "summary_turns": counters[f"part:{PART_SUMMARY}"],
        "fill": _summary([s.num_tokens / target for s in built]),
        "token_length_histogram": {
            "edges": [round(i * bin_width) for i in range(HISTOGRAM_BINS + 1)],
            "counts": hist,
        },
        "shortfalls": {k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("shortfall:") and v},
        "documents_dropped_to_fit": counters["documents_dropped_to_fit"],
        "turns_dropped_to_fit": counters["turns_dropped_to_fit"],
        "rest_turns_dropped_to_fit": counters["rest_turns_dropped_to_fit"],
        "documents_cut": counters["documents_cut"],
        "qa_left_out_by_cuts": counters["qa_left_out_by_cuts"],
        "documents_unasked": counters["documents_unasked"],
        "ungrounded_questions": sum(s.ungrounded_questions for s in built),
        "pool": plan.pool,
        "document_reuse": document_reuse(stage, plan.pool["eligible"], built),
    }


def document_reuse(stage: StageConfig, usable: int, built: Sequence[SampleSummary]) -> dict:
    """How often the stage's built samples hold a document an earlier sample of the stage already holds.

    The planner never puts one document twice in a sample, but when the stage asks for more documents
    (samples x documents_per_sample) than its pool has, it cycles through the pool again: later samples repeat
    earlier ones' texts (with other questions). {"documents_needed": samples x documents_per_sample,
    "usable_documents": the pool's eligible documents, "distinct_documents_used", "samples_reusing_a_document",
    "most_samples_per_document", "samples_short_of_documents_for_lack_of_documents": built samples holding fewer
    than documents_per_sample because the pool has fewer}."""
    seen: set[str] = set()
    uses: Counter = Counter()
    reusing = 0
    for s in built:
        reusing += any(d in seen for d in s.documents)
        seen.update(s.documents)
        uses.update(s.documents)
    k = stage.documents_per_sample
    lacking = sum(1 for s in built if s.num_documents < k) if usable < k else 0
    return {
        "documents_needed": stage.samples * k,
        "usable_documents": usable,
        "distinct_documents_used": len(seen),
        "samples_reusing_a_document": reusing,
        "most_samples_per_document": max(uses.values(), default=0),
        "samples_short_of_documents_for_lack_of_documents": lacking,
    }


def _count(n: int, singular: str, plural: str = "") -> str:
    """n and the noun, plural when n != 1 ("1 usable document", "2 usable documents"); `plural` for irregular words."""
    if plural:
        return f"{n} {singular if n == 1 else plural}"
    return f"{n} {singular}{'' if n == 1 else 's'}"


def document_reuse_note(stats: dict, more_documents: str) -> str:
    """The summary's warning for a stage whose corpus is too small for it ("" when no sample repeats a document
    and none is short of documents for lack of them): what happened, the arithmetic, and what to change.
    `more_documents` says how to get more documents ("add documents to input.path", "raise input.limit ...")."""
    reuse, name = stats.get("document_reuse", {}), stats["stage"]
    reusing = reuse.get("samples_reusing_a_document", 0)
    lacking = reuse.get("samples_short_of_documents_for_lack_of_documents", 0)
    if not reusing and not lacking:
        return ""
    k, n, built = stats["documents_per_sample_requested"], stats["samples_requested"], stats["samples_built"]
    pool = stats.get("pool", {})
    of = f" of {pool['documents']}" if pool.get("documents", 0) > reuse["usable_documents"] else ""
    what = []
    if reusing:
        what.append(f"{reusing} of {built} samples repeat a document that an earlier sample of the stage holds (one "
                    f"document is in up to {reuse['most_samples_per_document']} samples; at most the choice and order "
                    f"of its questions differ, and two such samples can be identical), so training sees the same texts "
                    f"again")
    usable = reuse["usable_documents"]
    if lacking:
        what.append(f"{lacking} of {built} samples hold fewer than {k} documents, as only "
                    f"{_count(usable, 'is', 'are')} usable")
    fixes = [more_documents]
    if pool.get("too_long"):   # documents of the corpus this stage could not use: a longer target takes them
        fixes.append(f"raise concat.stages[{name}].target_tokens (now {stats['target_tokens']}; "
                     f"{_count(pool['too_long'], 'document')} did not fit it with their QA)")
    return (f"stage {name}: {'; '.join(what)} ({n} samples x {_count(k, 'document')} call for "
            f"{reuse['documents_needed']} distinct documents; the stage had {_count(usable, 'usable document')}{of}). "
            f"To fix: {', or '.join(fixes)}; or lower concat.stages[{name}].samples (now {n}) or "
            f"concat.stages[{name}].documents_per_sample (now {k}).")


def build_stage_samples(
    stage: StageConfig, documents: Sequence[DocumentQA], cfg: ConcatConfig, tokenizer: Any, tokenizer_hash: str
) -> tuple[list[dict], dict]:
    """Build `stage.samples` rows (ctxforge.schema.SAMPLE_SCHEMA) and the stage's statistics, in this process.

    `plan_stage_samples` over the documents' sketches, then `render_planned` for each planned sample in order, then
    `stage_stats`; the parallel path (write.py's RenderPool) runs the same three with the renders spread
    over workers. No row exceeds `stage.target_tokens`. Cost is dominated by tokenizing each rendered
    sample once (about 8 s per 1M tokens for Qwen2's BPE on one core), a few times when it had to be trimmed.
    """
    by_id = {d.doc_id: d for d in documents}
    special = tokenizer if cfg.special_tokens == "skip_document" else None
    plan = plan_stage_samples(stage, [PoolDocument.of(d, special) for d in documents], cfg)
    rows: list[dict] = []
    summaries: list[SampleSummary] = []
    counters: Counter = Counter()
    for rp in plan.samples:
        row = render_planned(rp, [by_id[i] for i in rp.doc_ids], stage, cfg, tokenizer, tokenizer_hash, counters)
        summaries.append(SampleSummary.of(rp.index, row))
        if row is not None:
            rows.append(row)
    return rows, stage_stats(stage, plan, summaries, counters)


def stage_failure(stats: dict, cfg: ConcatConfig) -> str:
    """The one-line error of a stage that built no sample although some were requested ("" otherwise):
    the stage, the reason, and the keys to change."""
    if not stats["samples_requested"] or stats["samples_built"]:
        return ""
    name, pool = stats["stage"], stats["pool"]
    reasons = dict(stats["skip_reasons"])
    why = ", ".join(f"{k}: {v}" for k, v in reasons.items()) or "no sample planned"
    if pool["eligible"] == 0:
        parts = [f"{pool[k]} {k.replace('_', ' ')}" for k in ("too_long", "without_qa", "special_tokens") if pool[k]]
        why += f"; no usable document ({', '.join(parts) or 'none given'})"
    hints = [f"raise concat.stages[{name}].target_tokens (now {stats['target_tokens']})"]
    if pool["too_long"]:
        hints.append("set concat.cut_long_documents=true" if not cfg.cut_long_documents else
                     "lower chunking.small_tokens or chunking.smalls_per_medium (smaller sections can be cut to fit)")
    if pool["without_qa"]:
        hints.append("check grounding.on_ungrounded and the generator (documents without kept QA)")
    if pool["special_tokens"]:
        hints.append("set concat.special_tokens=as_text")
    return f"stage {name}: built 0 of {stats['samples_requested']} samples ({why}). To fix: " + "; or ".join(hints)
