"""Algorithm 1 for one document: which requests each pass sends, and how answers fill the document.

Passes, in dependency order (each reads answers of the earlier ones):
  summary_small   one summary per small chunk
  summary_section one per medium chunk: from its text when it fits the generator, else from its
                  small summaries (a section of one chunk reuses that chunk's summary)
  summary_global  the global summary from the section summaries, merged recursively in rounds when
                  they do not fit in one prompt (a one-section document reuses the section summary)
  qa              hierarchical base questions (global -> section -> chunk, reading order) and the
                  diverse questions (typed, with their evidence); the plan is qaplan.py's
  followup        follow-ups conditioned on a base hierarchical QA
QA and follow-up requests are handed out when READY (`qa_requests`, `followup_requests` return each
request once): a repeated question over the same evidence waits for the previous one to finish and
sees the questions already asked; a follow-up waits for its parent's answer. A driver calls them
again after recording answers (`record`) until both return nothing.
Every prompt comes from the prompt set (prompts.yaml or generator.prompts); every request carries, in
`meta`, its question type, the content-check settings and where its input lies in the user message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ctxforge.pipeline import prompts
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.qaplan import MULTI_PASSAGE_TYPES, PlannedQA, plan_questions
from ctxforge.pipeline.records import Chunk, Section
from ctxforge.generation.requests import Request

PROMPT_OVERHEAD_TOKENS = 400  # system prompt, instructions and chat template around the evidence


@dataclass
class DocState:
    doc_id: str
    title: str
    text: str
    n_tokens: int
    chunks: list[Chunk]
    sections: list[Section]
    summaries: dict[str, str] = field(default_factory=dict)   # evidence id -> summary text
    answers: dict[str, dict] = field(default_factory=dict)    # QA key -> {"question", "answer", "evidence_quote"}
    plan: list[PlannedQA] = field(default_factory=list)
    global_round: int = 0
    global_parts: list[str] = field(default_factory=list)     # summaries still to merge into the global one
    asked: set[str] = field(default_factory=set)              # QA keys handed out as requests
    finished: set[str] = field(default_factory=set)           # QA keys whose request finished (ok or failed)
    judged: dict[str, bool] = field(default_factory=dict)     # QA key -> the judge's verdict (optional pass)

    @property
    def global_id(self) -> str:
        return f"{self.doc_id}:summary:global"

    def section_summary_id(self, j: int) -> str:
        return f"{self.sections[j].section_id}:summary"

    def chunk_summary_id(self, i: int) -> str:
        return f"{self.chunks[i].chunk_id}:summary"

    def evidence_text(self, evidence_id: str) -> str:
        if evidence_id in self.summaries:
            return self.summaries[evidence_id]
        chunk = self._chunk_by_id().get(evidence_id)
        if chunk is None:
            raise KeyError(f"{self.doc_id}: unknown evidence id {evidence_id}")
        return chunk.text

    def available_texts(self, evidence_ids: list[str]) -> list[str]:
        """Texts of the evidence that exists (a summary whose request failed is left out)."""
        return [self.evidence_text(e) for e in evidence_ids if e in self.summaries or e in self._chunk_by_id()]

    def _chunk_by_id(self) -> dict[str, Chunk]:
        if not hasattr(self, "_chunk_index"):
            self._chunk_index = {c.chunk_id: c for c in self.chunks}
        return self._chunk_index


    def document_texts(self, evidence_ids: list[str]) -> list[str]:
        """What the student can read of this evidence: its chunks, or the whole document when the evidence
        is summaries (a question written from summaries is about the whole document)."""
        chunks = [self._chunk_by_id()[e].text for e in evidence_ids if e in self._chunk_by_id()]
        return chunks or [self.text]

    def item(self, key: str) -> PlannedQA | None:
        if getattr(self, "_plan_index_size", -1) != len(self.plan):
            self._plan_index = {p.key: p for p in self.plan}
            self._plan_index_size = len(self.plan)
        return self._plan_index.get(key)


_TEXT_MARK = "\ue010ctxforge-input\ue011"  # private-use characters: no template writes them


class RequestPlanner:
    """Builds each pass's requests for a document; `count_tokens` sizes prompts for the generator."""

    def __init__(self, cfg: SynthConfig, count_tokens: Callable[[str], int]):
        self.cfg = cfg
        self.count_tokens = count_tokens
        self.prompts = prompts.load_prompt_set(cfg.generator.prompts)
        self.summary_schema = prompts.summary_schema(cfg.limits)
        self.qa_schema = prompts.qa_schema(cfg.limits)
        gen = cfg.generator
        self.prompt_budget = gen.max_model_len - max(gen.summary_max_tokens, gen.qa_max_tokens) - PROMPT_OVERHEAD_TOKENS
        lim = cfg.limits
        self._rules = {
            name: self.prompts.render(name, question_chars=lim.question_chars, answer_chars=lim.answer_chars,
                                      quote_chars=lim.quote_chars)
            for name in ("qa_rules", "qa_rules_multi")
        }

    # -- requests -------------------------------------------------------------------------------
    def _render(self, name: str, text: str, **values) -> tuple[str, tuple[int, int] | None]:
        """The template filled in, and the [start, end) span of `text` in it (for input-relative checks;
        None when the template does not show the text)."""
        user = self.prompts.render(name, text=_TEXT_MARK, **values)
        at = user.find(_TEXT_MARK)
        if at < 0:
            return user, None
        return user[:at] + text + user[at + len(_TEXT_MARK):], (at, at + len(text))

    def _summary(self, doc: DocState, pass_name: str, key: str, name: str, text: str, **values) -> Request:
        user, span = self._render(name, text, title=doc.title, max_chars=self.cfg.limits.summary_chars, **values)
        return Request(pass_name, doc.doc_id, key, self.prompts.messages(user), "summary", self.summary_schema,
                       self.cfg.generator.summary_max_tokens,
                       meta={"qtype": "summary", "checks": self.cfg.checks, "input_span": span})

    def _qa(self, doc: DocState, pass_name: str, item: PlannedQA, name: str, text: str, **values) -> Request:
        multi = self._multi_passage(item)
        asked = self._asked_note(doc, item)
        user, span = self._render(
            name, text, title=doc.title, rules=self._rules["qa_rules_multi" if multi else "qa_rules"], asked=asked,
            self_contained=self.prompts.render("self_contained", title=doc.title), **values)
        schema = prompts.qa_multi_schema(self.cfg.limits, len(item.evidence_ids)) if multi else self.qa_schema
        return Request(pass_name, doc.doc_id, item.key, self.prompts.messages(user), "qa_multi" if multi else "qa",
                       schema, self.cfg.generator.qa_max_tokens,
                       meta={"qtype": item.qtype, "checks": self.cfg.checks, "input_span": span})

    @staticmethod
    def _multi_passage(item: PlannedQA) -> bool:
        return item.qtype in MULTI_PASSAGE_TYPES and len(item.evidence_ids) >= 2

    def _asked_note(self, doc: DocState, item: PlannedQA) -> str:
        """The questions already asked over the same evidence (the chain of earlier variants)."""
        questions, key = [], item.after
        while key:
            if key in doc.answers:
                questions.append(doc.answers[key]["question"])
            prev = doc.item(key)
            key = prev.after if prev is not None else ""
        if not questions:
            return ""
        return self.prompts.render("asked", questions="\n".join(f"- {q}" for q in reversed(questions)))

    def fits(self, text: str) -> bool:
        return self.count_tokens(text) <= self.prompt_budget

    def _clip(self, text: str) -> str:
        """Last resort for evidence larger than the generator's window: keep its head."""
        if self.fits(text):
            return text
        keep = int(len(text) * self.prompt_budget / max(1, self.count_tokens(text)) * 0.95)
        return text[:keep]

    # -- pass 1: small summaries ----------------------------------------------------------------
    def small_summary_requests(self, doc: DocState) -> list[Request]:
        return [self._summary(doc, "summary_small", doc.chunk_summary_id(c.index), "summary_chunk", self._clip(c.text))
                for c in doc.chunks]

    # -- pass 2: section summaries --------------------------------------------------------------
    def section_summary_requests(self, doc: DocState) -> list[Request]:
        reqs = []
        for s in doc.sections:
            sid = doc.section_summary_id(s.index)
            if s.chunk_end - s.chunk_start == 1:
                continue  # filled from the chunk summary in fill_section_summaries
            text = doc.text[s.char_start:s.char_end]
            if self.fits(text):
                reqs.append(self._summary(doc, "summary_section", sid, "summary_section_text", text))
                continue
            parts = [doc.summaries.get(doc.chunk_summary_id(i)) for i in range(s.chunk_start, s.chunk_end)]
            if any(p is None for p in parts):
                continue  # a chunk summary failed: this section falls back to what exists
            reqs.append(self._summary(doc, "summary_section", sid, "summary_section_parts", _numbered(parts)))
        return reqs

    def fill_section_summaries(self, doc: DocState) -> None:
        """Single-chunk sections reuse the chunk summary; failed sections fall back to their parts."""
        for s in doc.sections:
            sid = doc.section_summary_id(s.index)
            if sid in doc.summaries:
                continue
            parts = [doc.summaries[doc.chunk_summary_id(i)] for i in range(s.chunk_start, s.chunk_end)
                     if doc.chunk_summary_id(i) in doc.summaries]
            if parts:
                doc.summaries[sid] = " ".join(parts)

    # -- pass 3: global summary (rounds) --------------------------------------------------------
    def start_global(self, doc: DocState) -> None:
        doc.global_parts = [doc.summaries[doc.section_summary_id(j)] for j in range(len(doc.sections))
                            if doc.section_summary_id(j) in doc.summaries]
        doc.global_round = 0
        if len(doc.global_parts) == 1:
            doc.summaries[doc.global_id] = doc.global_parts[0]
            doc.global_parts = []

    def global_summary_requests(self, doc: DocState) -> list[Request]:
        """One round: groups of parts that fit one prompt; a single group yields the global summary."""
        if not doc.global_parts:
            return []
        groups = self._group_to_fit(doc.global_parts)
        scope = "whole document" if len(groups) == 1 else "stretch of the document"
        return [self._summary(doc, "summary_global", f"global:r{doc.global_round}:g{g}", "summary_global",
                              _numbered(group), scope=scope)
                for g, group in enumerate(groups)]

    def finish_global_round(self, doc: DocState, answers: dict[str, str]) -> None:
        """Merge this round's answers; done when one summary remains (failed groups are left out)."""
        n_groups = len(self._group_to_fit(doc.global_parts))
        merged = [answers[f"global:r{doc.global_round}:g{g}"] for g in range(n_groups)
                  if f"global:r{doc.global_round}:g{g}" in answers]
        doc.global_round += 1
        if len(merged) <= 1 or n_groups == 1:
            if merged:
                doc.summaries[doc.global_id] = merged[0] if n_groups == 1 else " ".join(merged)
            doc.global_parts = []
        else:
            doc.global_parts = merged

    def _group_to_fit(self, parts: list[str]) -> list[list[str]]:
        groups: list[list[str]] = [[]]
        used = 0
        for part in parts:
            n = self.count_tokens(part) + 8
            if groups[-1] and used + n > self.prompt_budget:
                groups.append([])
                used = 0
            groups[-1].append(part)
            used += n
        if len(groups) > 1 and len(groups) == len(parts):
            # every part alone fills the window: merge pairs anyway (clipped) so the rounds terminate
            groups = [parts[i:i + 2] for i in range(0, len(parts), 2)]
        return groups

    # -- pass 4: base hierarchical QA + diverse QA ----------------------------------------------
    def make_plan(self, doc: DocState) -> None:
        doc.plan = plan_questions(doc, self.cfg)

    def _ready(self, doc: DocState, item: PlannedQA) -> bool:
        return item.key not in doc.asked and (not item.after or item.after in doc.finished)

    def qa_requests(self, doc: DocState) -> list[Request]:
        """Requests of the base and diverse questions that are ready and not handed out yet (each once)."""
        reqs = []
        gsum = doc.summaries.get(doc.global_id, "")
        for item in doc.plan:
            if item.qtype == "followup" or not self._ready(doc, item):
                continue
            doc.asked.add(item.key)
            if item.qtype in ("global", "thematic") and not gsum:
                doc.finished.add(item.key)  # no global summary: nothing to ask from
                continue
            if item.qtype == "global":
                secs = _numbered([doc.summaries.get(e, "") for e in item.evidence_ids[1:]])
                reqs.append(self._qa(doc, "qa", item, "qa_global", self._clip(secs), summary=gsum))
            elif item.qtype == "section":
                s = doc.sections[item.section]
                reqs.append(self._qa(doc, "qa", item, "qa_section", self._clip(doc.text[s.char_start:s.char_end]),
                                     summary=gsum))
            elif item.qtype == "chunk":
                ctx = doc.summaries.get(doc.section_summary_id(item.section), gsum)
                reqs.append(self._qa(doc, "qa", item, "qa_chunk", self._clip(doc.evidence_text(item.evidence_ids[0])),
                                     summary=ctx))
            else:
                texts = doc.available_texts(item.evidence_ids)
                body = "\n\n".join(f"<text {k + 1}>\n{t}\n</text {k + 1}>" for k, t in enumerate(texts))
                what = ("is a summary and summaries of its parts" if item.qtype == "thematic" else
                        f"are {len(texts)} parts, in reading order" if len(texts) > 1 else "is a part")
                reqs.append(self._qa(doc, "qa", item, "qa_diverse", self._clip(body), what=what, summary=gsum,
                                     instruction=self.prompts.diverse_instructions[item.qtype]))
        return reqs

    # -- pass 5: follow-ups ---------------------------------------------------------------------
    def followup_requests(self, doc: DocState) -> list[Request]:
        """Follow-ups whose parent finished (answered) and whose earlier variant finished; a follow-up
        whose parent failed is never asked."""
        reqs = []
        for item in doc.plan:
            if item.qtype != "followup" or not self._ready(doc, item) or item.parent not in doc.finished:
                continue
            doc.asked.add(item.key)
            if item.parent not in doc.answers:
                doc.finished.add(item.key)
                continue
            parent = doc.answers[item.parent]
            text = "\n\n".join(doc.available_texts(item.evidence_ids))
            reqs.append(self._qa(doc, "followup", item, "qa_followup", self._clip(text),
                                 question=parent["question"], answer=parent["answer"], summary=""))
        return reqs

    @staticmethod
    def qa_requests_pending(doc: DocState) -> bool:
        """Whether questions or follow-ups of the plan are still to be handed out."""
        return any(item.key not in doc.asked for item in doc.plan)

    @staticmethod
    def record(doc: DocState, key: str, answer: dict | None) -> None:
        """A QA request finished: its answer (None when it failed) and the requests it unblocks."""
        doc.finished.add(key)
        if answer is not None:
            doc.answers[key] = answer


def _numbered(parts: list[str]) -> str:
    return "\n\n".join(f"[{k + 1}] {p}" for k, p in enumerate(parts))
