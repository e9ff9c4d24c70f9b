"""Algorithm 1 over a wave of documents: the generation passes, then QA records with grounding.

Each pass collects every document's requests, runs them as one Ray Data job (PassRunner), and
writes the answers back into the documents' state; the next pass plans from that state. Questions
and follow-ups run in rounds of the requests that are ready (a repeated question waits for the one
before it); the optional judge pass runs last. QA records are assembled in assemble.py.
"""

from __future__ import annotations

import logging

from ctxforge.pipeline.assemble import QAAssembler
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import DocState, Planner
from ctxforge.pipeline.judge import judge_requests, record_verdicts
from ctxforge.pipeline.passes import PassRunner, PassStats
from ctxforge.pipeline.requests import Request

log = logging.getLogger(__name__)

__all__ = ["PASSES", "QAAssembler", "WaveGenerator"]  # QAAssembler lives in assemble.py; run.py imports it here

PASSES = ("summary_small", "summary_section", "summary_global", "qa", "followup", "judge")


class WaveGenerator:
    def __init__(self, cfg: SynthConfig, planner: Planner, runner: PassRunner, generator_model: str):
        self.cfg = cfg
        self.planner = planner
        self.runner = runner
        self.model = generator_model
        self.prompt_hash = planner.prompts.hash
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
        by_id = {d.doc_id: d for d in docs}
        round_, progress = 0, True
        while progress and any(p.qa_requests_pending(d) for d in docs):
            # rounds of the ready requests: a repeated question waits for the one before it
            round_ += 1
            asked_before = sum(len(d.asked) for d in docs)
            for pass_name, build, what in (("qa", p.qa_requests, "questions"), ("followup", p.followup_requests, "follow-ups")):
                reqs = [r for d in docs for r in build(d)]
                if reqs:
                    got = self._run(pass_name, reqs, f"{wave_label} {what} (round {round_})")
                    for r in reqs:
                        p.record(by_id[r.doc_id], r.key, got.get((r.doc_id, r.key)))
            progress = sum(len(d.asked) for d in docs) > asked_before
        if self.cfg.grounding.judge:
            got = self._run("judge", [r for d in docs for r in judge_requests(p, d)], f"{wave_label} judge")
            per_doc: dict[str, dict] = {}
            for (doc_id, key), a in got.items():
                per_doc.setdefault(doc_id, {})[key] = a
            for d in docs:
                record_verdicts(d, per_doc.get(d.doc_id, {}))
