"""Algorithm 1: the passes each document goes through, driven per document (streaming) or per wave (passes).

`PASSES` is the per-document state machine, in order. Each pass says which requests a document sends
now (`ask`, from the Planner), how their answers fill the document's state (`absorb`), what to do
when the pass starts (`start`), and, for a pass that runs in rounds, whether another round is needed
(`again`). Both drivers below walk the same table:
  - StreamingGenerator (run.scheduler=streaming): each document advances to its next pass as soon as
    its own answers are in; requests of documents at different passes share the engines through one
    scheduler queue; finished documents leave the driver at once (their QA go to `on_done`).
  - WaveGenerator (run.scheduler=passes): every document of a wave finishes a pass before any starts
    the next; each pass (and each round of it) is one Ray Data job. The earlier design, kept for
    comparison.
Both send exactly the same requests (ids and seeds) for the same documents, so their outputs agree.

Adding a pass (e.g. a judge after the questions) is one entry in PASSES, in dependency order:
    Pass("judge", ask=lambda p, d: p.judge_requests(d), absorb=lambda p, d, got: p.absorb_judgements(d, got))
with the Planner methods it names; its requests, statistics, cache entries and manifest rows follow.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.grounding import GroundingStats, ground_quote, normalize
from ctxforge.pipeline.hierarchy import DocState, Planner
from ctxforge.pipeline.passes import PassRunner, PassStats
from ctxforge.pipeline.prompts import prompt_set_hash
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.pipeline.requests import Request

log = logging.getLogger(__name__)

Answers = dict  # request key -> validated answer object (failed requests are absent)


def _nothing(planner: Planner, doc: DocState) -> None:
    return None


@dataclass(frozen=True)
class Pass:
    name: str
    ask: Callable[[Planner, DocState], list[Request]]
    absorb: Callable[[Planner, DocState, Answers], None]
    start: Callable[[Planner, DocState], None] = _nothing
    again: Callable[[DocState], bool] | None = None   # None: one round; else rounds while it holds


def _absorb_small(p: Planner, d: DocState, got: Answers) -> None:
    for c in d.chunks:
        a = got.get(d.chunk_summary_id(c.index))
        if a:
            d.summaries[d.chunk_summary_id(c.index)] = a["summary"]


def _absorb_sections(p: Planner, d: DocState, got: Answers) -> None:
    for s in d.sections:
        a = got.get(d.section_summary_id(s.index))
        if a:
            d.summaries[d.section_summary_id(s.index)] = a["summary"]
    p.fill_section_summaries(d)
    p.start_global(d)


def _absorb_global(p: Planner, d: DocState, got: Answers) -> None:
    p.finish_global_round(d, {key: a["summary"] for key, a in got.items()})


def _absorb_answers(p: Planner, d: DocState, got: Answers) -> None:
    for item in d.plan:
        a = got.get(item.key)
        if a:
            d.answers[item.key] = a


PASSES: tuple[Pass, ...] = (
    Pass("summary_small", ask=lambda p, d: p.small_summary_requests(d), absorb=_absorb_small),
    Pass("summary_section", ask=lambda p, d: p.section_summary_requests(d), absorb=_absorb_sections),
    Pass("summary_global", ask=lambda p, d: p.global_summary_requests(d), absorb=_absorb_global,
         again=lambda d: bool(d.global_parts)),
    Pass("qa", ask=lambda p, d: p.qa_requests(d), absorb=_absorb_answers, start=lambda p, d: p.make_plan(d)),
    Pass("followup", ask=lambda p, d: p.followup_requests(d), absorb=_absorb_answers),
)
PASS_NAMES = tuple(p.name for p in PASSES)


class DocumentFlow:
    """One document walking PASSES: `advance()` returns the requests it waits for next ([] = finished)."""

    def __init__(self, doc: DocState, rank: int, planner: Planner, passes: tuple[Pass, ...] = PASSES):
        self.doc = doc
        self.rank = rank
        self.planner = planner
        self.passes = passes
        self.index = -1          # the pass being run
        self.waiting = 0         # answers still to come for the current round
        self.got: Answers = {}
        self.done = False

    @property
    def pass_name(self) -> str:
        return self.passes[self.index].name if 0 <= self.index < len(self.passes) else ""

    def advance(self) -> list[Request]:
        """Absorb the round that just finished (if any), then move on until some requests are needed."""
        p, d = self.planner, self.doc
        if self.index >= 0:
            step = self.passes[self.index]
            step.absorb(p, d, self.got)
            self.got = {}
            if step.again is not None and step.again(d):
                reqs = step.ask(p, d)
                if reqs:
                    return self._wait(reqs)
                return self.advance_round_without_requests(step)
        while self.index + 1 < len(self.passes):
            self.index += 1
            step = self.passes[self.index]
            step.start(p, d)
            if step.again is not None:
                if not step.again(d):
                    continue  # nothing to do in this pass for this document (no rounds at all)
                reqs = step.ask(p, d)
                if reqs:
                    return self._wait(reqs)
                return self.advance_round_without_requests(step)
            reqs = step.ask(p, d)
            if reqs:
                return self._wait(reqs)
            step.absorb(p, d, {})  # a pass with nothing to ask still updates the state (e.g. fills sections)
        self.done = True
        return []

    def advance_round_without_requests(self, step: Pass) -> list[Request]:
        # A round that asks nothing ends like a round whose requests all failed (keeps rounds finite).
        self.got = {}
        return self.advance()

    def _wait(self, reqs: list[Request]) -> list[Request]:
        self.waiting = len(reqs)
        return reqs

    def answer(self, req: Request, obj: dict | None) -> bool:
        """Record one answer; True when the round is complete."""
        if obj is not None:
            self.got[req.key] = obj
        self.waiting -= 1
        return self.waiting == 0


class StreamingGenerator:
    """Every document advances on its own answers; all documents' requests share one scheduler queue.

    Documents are admitted in order while fewer than `max_documents` are in flight and the scheduler's
    queue is shorter than what the engines can take (about twice the pool's capacity), so the driver
    holds a bounded window of documents whatever the corpus size. `on_done(rank, doc)` gets each
    finished document, in completion order.
    """

    def __init__(self, planner: Planner, scheduler, max_documents: int, passes: tuple[Pass, ...] = PASSES):
        self.planner = planner
        self.scheduler = scheduler
        self.max_documents = max_documents
        self.passes = passes
        self.active: dict[int, DocumentFlow] = {}

    def _ask(self, flow: DocumentFlow, reqs: list[Request]) -> None:
        self.scheduler.ask(reqs, flow.rank, lambda req, obj, flow=flow: self._answered(flow, req, obj))

    def _answered(self, flow: DocumentFlow, req: Request, obj: dict | None) -> None:
        if flow.answer(req, obj):
            self._advance(flow)

    def _advance(self, flow: DocumentFlow) -> None:
        reqs = flow.advance()
        if reqs:
            self._ask(flow, reqs)
        else:
            del self.active[flow.rank]
            self.on_done(flow.rank, flow.doc)

    def run(self, documents: Iterable[DocState], on_done: Callable[[int, DocState], None]) -> None:
        self.on_done = on_done
        docs: Iterator[tuple[int, DocState]] = iter(enumerate(documents))
        exhausted = False
        want_queue = 2 * self.scheduler.pool.capacity()
        last_log = time.monotonic()
        while True:
            while (not exhausted and len(self.active) < self.max_documents
                   and self.scheduler.outstanding() < want_queue):
                nxt = next(docs, None)
                if nxt is None:
                    exhausted = True
                    break
                rank, doc = nxt
                flow = DocumentFlow(doc, rank, self.planner, self.passes)
                self.active[rank] = flow
                self._advance(flow)
                self.scheduler.deliver()  # cached answers advance documents at once
            if exhausted and not self.active:
                break
            self.scheduler.step()
            if time.monotonic() - last_log > 30:
                last_log = time.monotonic()
                at = Counter(f.pass_name for f in self.active.values())
                log.info("documents in flight %d (%s); requests queued %d, at engines %d",
                         len(self.active), dict(at), self.scheduler.queued(), self.scheduler.pool.in_flight())


class WaveGenerator:
    """Passes mode: every document of the wave finishes a pass (each round one Ray Data job) before the next."""

    def __init__(self, cfg: SynthConfig, planner: Planner, runner: PassRunner, generator_model: str,
                 passes: tuple[Pass, ...] = PASSES):
        self.cfg = cfg
        self.planner = planner
        self.runner = runner
        self.model = generator_model
        self.passes = passes
        self.prompt_hash = prompt_set_hash()
        self.pass_stats: dict[str, PassStats] = {p.name: PassStats() for p in passes}

    def _run(self, pass_name: str, requests: list[Request], label: str) -> dict[tuple[str, str], dict]:
        """Answers keyed by (doc_id, request key)."""
        gen = self.cfg.generator
        for req in requests:
            req.finalize(self.model, gen.temperature, gen.top_p, self.prompt_hash)
        answers, stats = self.runner.run(requests, label)
        self.pass_stats[pass_name].merge(stats)
        return {(r.doc_id, r.key): answers[r.request_id] for r in requests if r.request_id in answers}

    def run_wave(self, docs: list[DocState], wave_label: str) -> None:
        p = self.planner
        for step in self.passes:
            for d in docs:
                step.start(p, d)
            rounds = itertools.count(1)
            active = [d for d in docs if step.again is None or step.again(d)]
            while active:
                n = next(rounds)
                label = f"{wave_label} {step.name}" + (f" (round {n})" if step.again is not None else "")
                got = self._run(step.name, [r for d in active for r in step.ask(p, d)], label)
                for d in active:
                    step.absorb(p, d, {key: a for (doc_id, key), a in got.items() if doc_id == d.doc_id})
                if step.again is None:
                    break
                active = [d for d in active if step.again(d)]


class QAAssembler:
    """Turns answered plans into QA records: grounding check, duplicate removal, ordering."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.grounding = GroundingStats()
        self.generated = Counter()      # by kind/qtype, before grounding and dedup
        self.dropped = Counter()        # ungrounded_dropped, duplicate_question

    def assemble(self, doc: DocState) -> tuple[DocumentQA, list[QARecord]]:
        g = self.cfg.grounding
        records: list[QARecord] = []
        seen_questions: set[str] = set()
        reading_order: dict[str, float] = {}
        for item in doc.plan:
            ans = doc.answers.get(item.key)
            if ans is None:
                continue
            self.generated[f"{item.kind}/{item.qtype}"] += 1
            grounded, score, reason = ground_quote(ans["evidence_quote"], doc.available_texts(item.evidence_ids),
                                                   g.min_score, g.min_quote_chars)
            self.grounding.add(doc.doc_id, item.qtype, grounded, reason)
            record = QARecord(
                qa_id=f"{doc.doc_id}:{item.key}", doc_id=doc.doc_id, kind=item.kind, qtype=item.qtype,
                order=0, question=ans["question"], answer=ans["answer"], evidence_ids=list(item.evidence_ids),
                evidence_quote=ans["evidence_quote"], grounded=grounded, grounding_score=float(score),
                parent_qa_id=f"{doc.doc_id}:{item.parent}" if item.parent else "",
            )
            reading_order[record.qa_id] = item.order
            qnorm = normalize(record.question)
            if qnorm in seen_questions:
                self.dropped["duplicate_question"] += 1
                continue
            if not grounded and g.on_ungrounded == "drop":
                self.dropped["ungrounded_dropped"] += 1
                continue
            seen_questions.add(qnorm)
            records.append(record)
        hier = sorted((r for r in records if r.kind == "hierarchical"), key=lambda r: reading_order[r.qa_id])
        diverse = [r for r in records if r.kind == "diverse"]
        for n, r in enumerate(hier):
            r.order = n
        for n, r in enumerate(diverse):
            r.order = n
        return DocumentQA(doc.doc_id, doc.title, doc.text, doc.n_tokens, hier, diverse), hier + diverse
