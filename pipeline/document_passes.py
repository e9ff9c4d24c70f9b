"""Algorithm 1: the passes each document goes through, each document advancing on its own answers.

`PASSES` is the per-document state machine, in order. Each pass says which requests a document sends
now (`ask`, from the RequestPlanner), how their answers fill the document's state (`absorb`), what to do
when the pass starts (`start`), and, for a pass that runs in rounds, whether another round is needed
(`again`). StreamingGenerator walks the table: each document advances to its next pass as soon as its
own answers are in; requests of documents at different passes share the engines through one
scheduler queue (ctxforge.generation); finished documents leave the driver at once (their QA go to
`on_done`). A document's requests depend only on its own answers, so the outputs do not depend on
the order in which the engines answer.

Questions and follow-ups run in rounds of the requests that are READY (hierarchy.py): a repeated
question over the same evidence waits for the one before it and sees the questions already asked; a
follow-up waits for its parent's answer. One step ("qa") hands out both kinds, each request under its
own pass name ("qa", "followup") for statistics and cache. The optional judge pass (grounding.judge,
judge.py) runs last. QA records are assembled in assemble.py.

Adding a pass is one entry in PASSES, in dependency order, with the RequestPlanner methods it names; its
requests, statistics, cache entries and manifest rows follow (list its request pass names in PASS_NAMES).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ctxforge.pipeline.assemble import QAAssembler
from ctxforge.pipeline.hierarchy import DocState, RequestPlanner
from ctxforge.pipeline.judge import judge_requests, record_verdicts
from ctxforge.generation.requests import Request

log = logging.getLogger(__name__)

__all__ = ["PASSES", "PASS_NAMES", "QAAssembler", "StreamingGenerator"]  # QAAssembler: assemble.py

Answers = dict  # request key -> validated answer object (failed requests are absent)


def _nothing(planner: RequestPlanner, doc: DocState) -> None:
    return None


@dataclass(frozen=True)
class Pass:
    name: str
    ask: Callable[[RequestPlanner, DocState], list[Request]]
    absorb: Callable[[RequestPlanner, DocState, Answers], None]
    start: Callable[[RequestPlanner, DocState], None] = _nothing
    again: Callable[[DocState], bool] | None = None   # None: one round; else rounds while it holds


def _absorb_small(p: RequestPlanner, d: DocState, got: Answers) -> None:
    for c in d.chunks:
        a = got.get(d.chunk_summary_id(c.index))
        if a:
            d.summaries[d.chunk_summary_id(c.index)] = a["summary"]


def _absorb_sections(p: RequestPlanner, d: DocState, got: Answers) -> None:
    for s in d.sections:
        a = got.get(d.section_summary_id(s.index))
        if a:
            d.summaries[d.section_summary_id(s.index)] = a["summary"]
    p.fill_section_summaries(d)
    p.start_global(d)


def _absorb_global(p: RequestPlanner, d: DocState, got: Answers) -> None:
    p.finish_global_round(d, {key: a["summary"] for key, a in got.items()})


def _ask_qa(p: RequestPlanner, d: DocState) -> list[Request]:
    return p.qa_requests(d) + p.followup_requests(d)


def _absorb_qa(p: RequestPlanner, d: DocState, got: Answers) -> None:
    """Every question or follow-up handed out in the round finished: answered, or failed (None)."""
    for item in d.plan:
        if item.key in d.asked and item.key not in d.finished:
            p.record(d, item.key, got.get(item.key))


def _qa_ready(d: DocState) -> bool:
    """Whether a question or follow-up can be handed out now (another round would ask something)."""
    for item in d.plan:
        if item.key in d.asked or (item.after and item.after not in d.finished):
            continue
        if item.qtype == "followup" and item.parent not in d.finished:
            continue
        return True
    return False


def _ask_judge(p: RequestPlanner, d: DocState) -> list[Request]:
    return judge_requests(p, d) if p.cfg.grounding.judge else []


PASSES: tuple[Pass, ...] = (
    Pass("summary_small", ask=lambda p, d: p.small_summary_requests(d), absorb=_absorb_small),
    Pass("summary_section", ask=lambda p, d: p.section_summary_requests(d), absorb=_absorb_sections),
    Pass("summary_global", ask=lambda p, d: p.global_summary_requests(d), absorb=_absorb_global,
         again=lambda d: bool(d.global_parts)),
    Pass("qa", ask=_ask_qa, absorb=_absorb_qa, start=lambda p, d: p.make_plan(d), again=_qa_ready),
    Pass("judge", ask=_ask_judge, absorb=lambda p, d, got: record_verdicts(d, got)),
)
# the pass names requests carry (statistics, cache, manifest), in order: the "qa" step sends two kinds
PASS_NAMES = ("summary_small", "summary_section", "summary_global", "qa", "followup", "judge")


class DocumentFlow:
    """One document walking PASSES: `advance()` returns the requests it waits for next ([] = finished)."""

    def __init__(self, doc: DocState, rank: int, planner: RequestPlanner, passes: tuple[Pass, ...] = PASSES):
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

    def __init__(self, planner: RequestPlanner, scheduler, max_documents: int, passes: tuple[Pass, ...] = PASSES):
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
