"""Algorithm 1 over a wave of documents: the five generation passes, then QA records with grounding.

Each pass collects every document's requests, runs them as one Ray Data job (PassRunner), and
writes the answers back into the documents' state; the next pass plans from that state.
"""

from __future__ import annotations

import logging
from collections import Counter

from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.grounding import GroundingStats, ground_quote, normalize
from ctxforge.pipeline.hierarchy import DocState, Planner
from ctxforge.pipeline.passes import PassRunner, PassStats
from ctxforge.pipeline.prompts import prompt_set_hash
from ctxforge.pipeline.records import DocumentQA, QARecord
from ctxforge.pipeline.requests import Request

log = logging.getLogger(__name__)

PASSES = ("summary_small", "summary_section", "summary_global", "qa", "followup")


class WaveGenerator:
    def __init__(self, cfg: SynthConfig, planner: Planner, runner: PassRunner, generator_model: str):
        self.cfg = cfg
        self.planner = planner
        self.runner = runner
        self.model = generator_model
        self.prompt_hash = prompt_set_hash()
        self.pass_stats: dict[str, PassStats] = {p: PassStats() for p in PASSES}

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
        got = self._run("summary_small", [r for d in docs for r in p.small_summary_requests(d)],
                        f"{wave_label} small-chunk summaries")
        for d in docs:
            for c in d.chunks:
                a = got.get((d.doc_id, d.chunk_summary_id(c.index)))
                if a:
                    d.summaries[d.chunk_summary_id(c.index)] = a["summary"]

        got = self._run("summary_section", [r for d in docs for r in p.section_summary_requests(d)],
                        f"{wave_label} section summaries")
        for d in docs:
            for s in d.sections:
                a = got.get((d.doc_id, d.section_summary_id(s.index)))
                if a:
                    d.summaries[d.section_summary_id(s.index)] = a["summary"]
            p.fill_section_summaries(d)
            p.start_global(d)

        rounds = 0
        while any(d.global_parts for d in docs):
            active = [d for d in docs if d.global_parts]
            got = self._run("summary_global", [r for d in active for r in p.global_summary_requests(d)],
                            f"{wave_label} global summaries (round {rounds + 1})")
            for d in active:
                mine = {key: a["summary"] for (doc_id, key), a in got.items() if doc_id == d.doc_id}
                p.finish_global_round(d, mine)
            rounds += 1

        for d in docs:
            p.make_plan(d)
        got = self._run("qa", [r for d in docs for r in p.qa_requests(d)], f"{wave_label} questions")
        self._store_answers(docs, got)
        got = self._run("followup", [r for d in docs for r in p.followup_requests(d)], f"{wave_label} follow-ups")
        self._store_answers(docs, got)

    @staticmethod
    def _store_answers(docs: list[DocState], got: dict) -> None:
        for d in docs:
            for item in d.plan:
                a = got.get((d.doc_id, item.key))
                if a:
                    d.answers[item.key] = a


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
