"""Algorithm 1 for one document: which requests each pass sends, and how answers fill the document.

Passes, in dependency order (each reads answers of the earlier ones):
  summary_small   one summary per small chunk
  summary_section one per medium chunk: from its text when it fits the generator, else from its
                  small summaries (a section of one chunk reuses that chunk's summary)
  summary_global  the global summary from the section summaries, merged recursively in rounds when
                  they do not fit in one prompt (a one-section document reuses the section summary)
  qa              hierarchical base questions (global -> section -> chunk, reading order) and the
                  diverse questions (typed, with their evidence), all independent of each other
  followup        follow-ups conditioned on a base hierarchical QA
The plan is seeded per document (qa.seed, doc_id), so a rerun asks exactly the same requests.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Callable

from ctxforge.pipeline import prompts
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.records import Chunk, Section
from ctxforge.pipeline.requests import Request

PROMPT_OVERHEAD_TOKENS = 400  # system prompt, instructions and chat template around the evidence


@dataclass
class PlannedQA:
    key: str               # "h003" (hierarchical) or "d017" (diverse)
    kind: str              # hierarchical | diverse
    qtype: str
    evidence_ids: list[str]
    order: float           # reading-order position for hierarchical QA
    variant: int = 0
    section: int = -1      # section index the question is about (-1 = whole document)
    parent: str = ""       # follow-ups: key of the base QA


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


class Planner:
    """Builds each pass's requests for a document; `count_tokens` sizes prompts for the generator."""

    def __init__(self, cfg: SynthConfig, count_tokens: Callable[[str], int]):
        self.cfg = cfg
        self.count_tokens = count_tokens
        self.summary_schema = prompts.summary_schema(cfg.limits)
        self.qa_schema = prompts.qa_schema(cfg.limits)
        gen = cfg.generator
        self.prompt_budget = gen.max_model_len - max(gen.summary_max_tokens, gen.qa_max_tokens) - PROMPT_OVERHEAD_TOKENS

    # -- requests -------------------------------------------------------------------------------
    def _summary(self, doc: DocState, pass_name: str, key: str, user: str) -> Request:
        return Request(pass_name, doc.doc_id, key, prompts.messages(user), "summary", self.summary_schema,
                       self.cfg.generator.summary_max_tokens)

    def _qa(self, doc: DocState, pass_name: str, item: PlannedQA, user: str) -> Request:
        return Request(pass_name, doc.doc_id, item.key, prompts.messages(user), "qa", self.qa_schema,
                       self.cfg.generator.qa_max_tokens, meta={"qtype": item.qtype})

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
        return [
            self._summary(doc, "summary_small", doc.chunk_summary_id(c.index),
                          prompts.SUMMARY_CHUNK.format(title=doc.title, text=self._clip(c.text)))
            for c in doc.chunks
        ]

    # -- pass 2: section summaries --------------------------------------------------------------
    def section_summary_requests(self, doc: DocState) -> list[Request]:
        reqs = []
        for s in doc.sections:
            sid = doc.section_summary_id(s.index)
            if s.chunk_end - s.chunk_start == 1:
                continue  # filled from the chunk summary in fill_section_summaries
            text = doc.text[s.char_start:s.char_end]
            if self.fits(text):
                user = prompts.SUMMARY_SECTION_TEXT.format(title=doc.title, section=s.index + 1,
                                                           sections=len(doc.sections), text=text)
            else:
                parts = [doc.summaries.get(doc.chunk_summary_id(i)) for i in range(s.chunk_start, s.chunk_end)]
                if any(p is None for p in parts):
                    continue  # a chunk summary failed: this section falls back to what exists
                user = prompts.SUMMARY_SECTION_PARTS.format(title=doc.title, section=s.index + 1,
                                                            sections=len(doc.sections), text=_numbered(parts))
            reqs.append(self._summary(doc, "summary_section", sid, user))
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
        scope = "document" if len(groups) == 1 else "stretch of the document"
        return [
            self._summary(doc, "summary_global", f"global:r{doc.global_round}:g{g}",
                          prompts.SUMMARY_GLOBAL.format(title=doc.title, scope=scope, text=_numbered(group)))
            for g, group in enumerate(groups)
        ]

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
        rng = random.Random(_seed(self.cfg.qa.seed, doc.doc_id))
        doc.plan = self._hierarchical_plan(doc, rng) + self._diverse_plan(doc, rng)

    def _hierarchical_plan(self, doc: DocState, rng: random.Random) -> list[PlannedQA]:
        qa = self.cfg.qa
        total = qa.hierarchical_per_document
        n_follow = math.floor(total * qa.followup_ratio)
        base = total - n_follow
        n_global = max(1, round(base * qa.global_ratio))
        rest = base - n_global
        n_sec = len(doc.sections)
        n_section = min(n_sec, math.ceil(rest / 2)) if rest > 0 else 0
        n_chunk = rest - n_section
        items: list[PlannedQA] = []
        global_ev = [doc.global_id] + [doc.section_summary_id(j) for j in range(n_sec)]
        for v in range(n_global):
            items.append(PlannedQA("", "hierarchical", "global", global_ev, order=-1 + v * 1e-3, variant=v))
        # sections spread evenly over the document so the whole of it is reached
        chosen_sections = _spread(n_sec, n_section)
        for j in chosen_sections:
            s = doc.sections[j]
            ev = [doc.chunks[i].chunk_id for i in range(s.chunk_start, s.chunk_end)]
            items.append(PlannedQA("", "hierarchical", "section", ev, order=s.chunk_start - 0.5, section=j))
        # chunk questions: round-robin over sections (coverage), a random chunk within each
        per_chunk_count: dict[int, int] = {}
        for q in range(n_chunk):
            s = doc.sections[q % n_sec]
            i = rng.randrange(s.chunk_start, s.chunk_end)
            variant = per_chunk_count.get(i, 0)
            per_chunk_count[i] = variant + 1
            items.append(PlannedQA("", "hierarchical", "chunk", [doc.chunks[i].chunk_id],
                                   order=i + 0.01 * variant, variant=variant, section=s.index))
        items.sort(key=lambda p: p.order)
        for n, item in enumerate(items):
            item.key = f"h{n:03d}"
        # follow-ups hang off base questions spread along the sequence
        follow: list[PlannedQA] = []
        parents = _spread(len(items), min(n_follow, len(items))) if items else []
        for k in range(n_follow):
            if not parents:
                break
            parent = items[parents[k % len(parents)]]
            variant = k // len(parents)
            follow.append(PlannedQA(f"f{k:03d}", "hierarchical", "followup", parent.evidence_ids,
                                    order=parent.order + 0.001 * (variant + 1), variant=variant,
                                    section=parent.section, parent=parent.key))
        return items + follow

    def _diverse_plan(self, doc: DocState, rng: random.Random) -> list[PlannedQA]:
        weights = self.cfg.qa.diverse_type_weights
        types = [t for t in weights if weights[t] > 0]
        n_chunks = len(doc.chunks)
        items = []
        seen: dict[tuple, int] = {}
        for n in range(self.cfg.qa.diverse_per_document):
            qtype = rng.choices(types, weights=[weights[t] for t in types])[0]
            idx = _diverse_evidence(qtype, n_chunks, rng)
            if qtype == "thematic":
                ev = [doc.global_id] + [doc.section_summary_id(j) for j in range(len(doc.sections))]
            else:
                if idx is None:  # the document is too short for this type's evidence
                    qtype, idx = "local_specific", [rng.randrange(n_chunks)]
                ev = [doc.chunks[i].chunk_id for i in idx]
            sig = (qtype, tuple(ev))
            variant = seen.get(sig, 0)
            seen[sig] = variant + 1
            items.append(PlannedQA(f"d{n:03d}", "diverse", qtype, ev, order=n, variant=variant))
        return items

    def qa_requests(self, doc: DocState) -> list[Request]:
        reqs = []
        gsum = doc.summaries.get(doc.global_id, "")
        for item in doc.plan:
            if item.qtype == "followup":
                continue
            if item.kind == "hierarchical":
                if item.qtype == "global":
                    if not gsum:
                        continue  # no global summary: nothing to ask from
                    secs = _numbered([doc.summaries.get(e, "") for e in item.evidence_ids[1:]])
                    user = prompts.QA_GLOBAL.format(title=doc.title, summary=gsum, text=self._clip(secs),
                                                    variant=prompts.variant_note(item.variant))
                elif item.qtype == "section":
                    s = doc.sections[item.section]
                    user = prompts.QA_SECTION.format(
                        title=doc.title, summary=gsum or "(unavailable)", section=s.index + 1,
                        sections=len(doc.sections), text=self._clip(doc.text[s.char_start:s.char_end]),
                        variant=prompts.variant_note(item.variant))
                else:
                    ctx = doc.summaries.get(doc.section_summary_id(item.section), gsum) or "(unavailable)"
                    user = prompts.QA_CHUNK.format(title=doc.title, summary=ctx, section=item.section + 1,
                                                   text=self._clip(doc.evidence_text(item.evidence_ids[0])),
                                                   variant=prompts.variant_note(item.variant))
            else:
                if item.qtype == "thematic" and not gsum:
                    continue
                texts = doc.available_texts(item.evidence_ids)
                what = "summaries" if item.qtype == "thematic" else ("passages" if len(texts) > 1 else "passage")
                body = "\n\n".join(f"<passage {k + 1}>\n{t}\n</passage {k + 1}>" for k, t in enumerate(texts))
                user = prompts.QA_DIVERSE.format(what=what, title=doc.title,
                                                 instruction=prompts.DIVERSE_INSTRUCTIONS[item.qtype],
                                                 text=self._clip(body), variant=prompts.variant_note(item.variant))
            reqs.append(self._qa(doc, "qa", item, user))
        return reqs

    # -- pass 5: follow-ups ---------------------------------------------------------------------
    def followup_requests(self, doc: DocState) -> list[Request]:
        reqs = []
        for item in doc.plan:
            if item.qtype != "followup" or item.parent not in doc.answers:
                continue  # a follow-up whose parent failed is not asked
            parent = doc.answers[item.parent]
            text = "\n\n".join(doc.available_texts(item.evidence_ids))
            user = prompts.QA_FOLLOWUP.format(title=doc.title, question=parent["question"], answer=parent["answer"],
                                              text=self._clip(text), variant=prompts.variant_note(item.variant))
            reqs.append(self._qa(doc, "followup", item, user))
        return reqs


def _numbered(parts: list[str]) -> str:
    return "\n\n".join(f"[{k + 1}] {p}" for k, p in enumerate(parts))


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({min(n - 1, int((q + 0.5) * n / k)) for q in range(k)})


def _diverse_evidence(qtype: str, n_chunks: int, rng: random.Random) -> list[int] | None:
    """Small-chunk indices for a diverse question type; None when the document is too short for it."""
    if qtype in ("local_specific", "cause_effect", "counting"):
        return [rng.randrange(n_chunks)]
    if qtype in ("multi_hop", "entity_tracking"):
        if n_chunks < 3:
            return None
        # one chunk from each third of the document: far apart, in reading order
        bands = [(n_chunks * b // 3, n_chunks * (b + 1) // 3) for b in range(3)]
        return [rng.randrange(lo, max(lo + 1, hi)) for lo, hi in bands]
    if qtype in ("comparison", "temporal_order"):
        if n_chunks < 2:
            return None
        half = n_chunks // 2
        return [rng.randrange(0, half), rng.randrange(half, n_chunks)]
    return []  # thematic: summaries


def _seed(seed: int, doc_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:12], 16)
