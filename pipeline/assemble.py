"""Answered plans -> QA records: grounding, answer support, judge verdicts, duplicates, orphans, summaries.

Per answered question, in plan order (base hierarchical in reading order, then follow-ups, then
diverse), the checks and what happens when one fails (grounding.on_ungrounded = drop | flag):
  orphaned_followup    its parent QA was dropped: a follow-up leaves with its parent (always dropped)
  hidden_reference     the question names what the student never sees; counted per type, dropped when
                       checks.hidden_references = drop
  duplicate_question   rapidfuzz token_set_ratio to a kept question of the document >= qa.duplicate_threshold
  ungrounded_dropped   the quote is not in the evidence (questions over several passages: not in at least
                       grounding.min_evidence_chunks of them)
  unsupported_dropped  the answer's content words are not in the evidence the student reads
  judged_unsupported_dropped  the judge said no (grounding.judge)
Each document also yields its summary turns (the global summary, the section summaries) when they are
supported by the text they summarize (checks.min_summary_support).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from rapidfuzz import fuzz

from ctxforge.pipeline.checks import refers_to_hidden_structure
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.grounding import GroundingStats, ground_quote, lexical_support, normalize, quote_chunks
from ctxforge.pipeline.qaplan import MULTI_PASSAGE_TYPES
from ctxforge.pipeline.records import DocumentQA, QARecord, SectionBound


class QAAssembler:
    """Turns answered plans into QA records; counts what it generated, dropped and why."""

    def __init__(self, cfg: SynthConfig):
        self.cfg = cfg
        self.grounding = GroundingStats()
        self.generated = Counter()      # by kind/qtype, before any check
        self.dropped = Counter()        # by reason (see the module docstring)

    def assemble(self, doc) -> tuple[DocumentQA, list[QARecord]]:
        g = self.cfg.grounding
        records: list[QARecord] = []
        kept_keys: set[str] = set()
        kept_questions: list[str] = []
        reading_order: dict[str, float] = {}
        chunk_section = {c.chunk_id: c.section_index for c in doc.chunks}
        for item in doc.plan:
            ans = doc.answers.get(item.key)
            if ans is None:
                continue
            self.generated[f"{item.kind}/{item.qtype}"] += 1
            record = self._check(doc, item, ans, chunk_section)
            reading_order[record.qa_id] = item.order
            if item.parent and item.parent not in kept_keys:
                self.dropped["orphaned_followup"] += 1
                continue
            hidden = refers_to_hidden_structure(record.question)
            self.grounding.type_extra[(item.qtype, "hidden_reference")] += hidden
            if hidden and self.cfg.checks.hidden_references == "drop":
                self.dropped["hidden_reference"] += 1
                continue
            qnorm = normalize(record.question)
            if any(_same_question(qnorm, q, self.cfg.qa.duplicate_threshold) for q in kept_questions):
                self.dropped["duplicate_question"] += 1
                continue
            if not record.grounded and g.on_ungrounded == "drop":
                reason = ("ungrounded_dropped" if not record.quote_grounded else
                          "judged_unsupported_dropped" if record.judge == "no" else "unsupported_dropped")
                self.dropped[reason] += 1
                continue
            kept_questions.append(qnorm)
            kept_keys.add(item.key)
            records.append(record)
        hier = sorted((r for r in records if r.kind == "hierarchical"), key=lambda r: reading_order[r.qa_id])
        diverse = [r for r in records if r.kind == "diverse"]
        for n, r in enumerate(hier):
            r.order = n
        for n, r in enumerate(diverse):
            r.order = n
        summaries = self._summaries(doc)
        bounds = [SectionBound(s.index, s.char_end, s.token_end) for s in doc.sections]
        doc_qa = DocumentQA(doc.doc_id, doc.title, doc.text, doc.n_tokens, hier, diverse, summaries, bounds)
        return doc_qa, hier + diverse + summaries

    def _check(self, doc, item, ans: dict, chunk_section: dict[str, int]) -> QARecord:
        """The record of one answer with its quote grounding, answer support and judge verdict."""
        g = self.cfg.grounding
        # NFC: tokenizers that normalize (Qwen2's does) would otherwise train on text other than the record's
        ans = {k: unicodedata.normalize("NFC", v) if isinstance(v, str) else v for k, v in ans.items()}
        quotes = list(ans.get("evidence_quotes") or [ans.get("evidence_quote", "")])
        chunk_ids = [e for e in item.evidence_ids if e in chunk_section]
        document_texts = doc.document_texts(item.evidence_ids)
        if item.qtype in MULTI_PASSAGE_TYPES and len(chunk_ids) >= 2:
            found: set[int] = set()
            for q in quotes:
                found |= quote_chunks(q, document_texts, g.min_score, g.min_quote_chars)
            need = min(g.min_evidence_chunks, len(chunk_ids))
            quote_ok = len(found) >= need
            reason = "multi_chunk" if quote_ok else ("single_chunk" if found else "not_found")
            score, basis = (100.0 * len(found) / len(chunk_ids)), ("document" if found else "none")
        else:
            quote_ok, score, reason = ground_quote(quotes[0], document_texts, g.min_score, g.min_quote_chars)
            basis = "document" if quote_ok else "none"
            summary_texts = [doc.summaries[e] for e in item.evidence_ids if e in doc.summaries]
            if not quote_ok and summary_texts:
                # written from summaries: a quote found only there proves agreement with a generated text
                quote_ok, score, reason = ground_quote(quotes[0], summary_texts, g.min_score, g.min_quote_chars)
                basis = "summary" if quote_ok else "none"
                reason = f"summary_{reason}" if quote_ok else reason
        support = lexical_support(ans["answer"], document_texts)
        supported = support >= g.min_answer_support
        verdict = doc.judged.get(item.key)
        self.grounding.add(doc.doc_id, item.qtype, quote_ok, reason, basis=basis, support=support,
                           supported=supported, judged=verdict)
        sections = [chunk_section[e] for e in chunk_ids]
        return QARecord(
            qa_id=f"{doc.doc_id}:{item.key}", doc_id=doc.doc_id, kind=item.kind, qtype=item.qtype, order=0,
            question=ans["question"], answer=ans["answer"], evidence_ids=list(item.evidence_ids),
            evidence_quote=quotes[0], grounded=quote_ok and supported and verdict is not False,
            grounding_score=float(score), parent_qa_id=f"{doc.doc_id}:{item.parent}" if item.parent else "",
            quote_grounded=quote_ok, grounding_basis=basis, answer_support=support,
            judge="" if verdict is None else ("yes" if verdict else "no"), evidence_quotes=quotes,
            section_end=max(sections) if sections else -1,
        )

    def _summaries(self, doc) -> list[QARecord]:
        """Summary turns: the global summary, then (configurable) each section's, when supported by their text."""
        mode = self.cfg.concat.summary_turns
        if mode == "none":
            return []
        wanted = [(doc.global_id, "global_summary", doc.text, [doc.global_id], -1, self.cfg.concat.summary_question)]
        if mode == "global_and_sections" and len(doc.sections) > 1:
            for s in doc.sections:
                text = doc.text[s.char_start:s.char_end]
                start, end = _edge_words(text)
                question = self.cfg.concat.section_summary_question.format(start=start, end=end)
                ids = [c.chunk_id for c in doc.chunks[s.chunk_start:s.chunk_end]]
                wanted.append((doc.section_summary_id(s.index), "section_summary", text, ids, s.index, question))
        out = []
        for sid, qtype, source, evidence, section, question in wanted:
            summary = unicodedata.normalize("NFC", doc.summaries.get(sid) or "")
            if not summary:
                continue
            self.generated[f"summary/{qtype}"] += 1
            support = lexical_support(summary, [source])
            if self.cfg.checks.enabled and support < self.cfg.checks.min_summary_support:
                self.dropped["unsupported_summary"] += 1
                continue
            tag = "global" if section < 0 else f"m{section:04d}"
            out.append(QARecord(
                qa_id=f"{doc.doc_id}:sum-{tag}", doc_id=doc.doc_id, kind="summary", qtype=qtype, order=len(out),
                question=question, answer=summary, evidence_ids=evidence, evidence_quote="", grounded=True,
                grounding_score=0.0, quote_grounded=False, grounding_basis="document", answer_support=support,
                section_end=section))
        return out


def _same_question(a: str, b: str, threshold: float) -> bool:
    if threshold >= 100:
        return a == b
    return a == b or fuzz.token_set_ratio(a, b, score_cutoff=threshold) >= threshold


_EDGE_WORDS = 6


def _edge_words(text: str) -> tuple[str, str]:
    """The first and last few words of a text, markup stripped: how a student can find a section."""
    words = re.sub(r"[*_#>`\[\]]+", " ", text).split()
    return " ".join(words[:_EDGE_WORDS]), " ".join(words[-_EDGE_WORDS:])
