"""Which questions Algorithm 1 asks of one document: fixed budgets, coverage, reading order, variants.

`plan_questions` returns the document's plan, seeded per document (qa.seed, doc_id), from its chunk
tree alone (no generated text), so a rerun plans exactly the same questions:
  hierarchical (qa.hierarchical_per_document, follow-ups included)
    global    from the global summary (at least 1, qa.global_ratio of the base budget)
    section   one per chosen section, spread over the document
    chunk     detail questions; sections no section question reached come first, so with a budget
              of at least one question per section EVERY section is reached; with fewer questions than
              sections, section and chunk questions alternate over sections spread evenly over the
              whole document
    followup  qa.followup_ratio of the budget, hanging off base questions spread along the sequence
  diverse (qa.diverse_per_document): a sampled type, then its evidence (1 chunk, 2-3 chunks far apart,
    or the summaries for thematic questions)
A question that repeats an earlier one's type and evidence (a "variant") depends on it (`after`): it is
asked once that one has finished, and its prompt lists the questions already asked.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from ctxforge.pipeline.config import SynthConfig

MULTI_PASSAGE_TYPES = ("multi_hop", "comparison", "temporal_order", "entity_tracking")


@dataclass
class PlannedQA:
    key: str               # "h003" (hierarchical), "f001" (follow-up) or "d017" (diverse)
    kind: str              # hierarchical | diverse
    qtype: str
    evidence_ids: list[str]
    order: float           # reading-order position for hierarchical QA
    variant: int = 0
    section: int = -1      # section index the question is about (-1 = whole document)
    parent: str = ""       # follow-ups: key of the base QA
    after: str = ""        # key of the earlier question over the same evidence that this one must follow


def plan_questions(doc, cfg: SynthConfig) -> list[PlannedQA]:
    """The plan of one document (`doc` has doc_id, chunks, sections, global_id, section_summary_id)."""
    rng = random.Random(_seed(cfg.qa.seed, doc.doc_id))
    plan = _hierarchical_plan(doc, cfg, rng) + _diverse_plan(doc, cfg, rng)
    _link_variants(plan)
    return plan


def _hierarchical_plan(doc, cfg: SynthConfig, rng: random.Random) -> list[PlannedQA]:
    qa = cfg.qa
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
    if 0 < rest <= n_sec:
        # fewer questions than sections: one each for sections spread over the whole document, alternating types
        targets = _spread(n_sec, rest)
        section_set, chunk_sections = targets[::2], targets[1::2]
    else:
        section_set = _spread(n_sec, n_section)
        chunk_sections = chunk_question_sections(n_sec, set(section_set), n_chunk)
    for j in section_set:
        s = doc.sections[j]
        ev = [doc.chunks[i].chunk_id for i in range(s.chunk_start, s.chunk_end)]
        items.append(PlannedQA("", "hierarchical", "section", ev, order=s.chunk_start - 0.5, section=j))
    per_chunk_count: dict[int, int] = {}
    for j in chunk_sections:
        s = doc.sections[j]
        # a chunk of the section not asked about yet, when there is one
        fresh = [i for i in range(s.chunk_start, s.chunk_end) if i not in per_chunk_count]
        i = rng.choice(fresh) if fresh else rng.randrange(s.chunk_start, s.chunk_end)
        variant = per_chunk_count.get(i, 0)
        per_chunk_count[i] = variant + 1
        items.append(PlannedQA("", "hierarchical", "chunk", [doc.chunks[i].chunk_id],
                               order=i + 0.01 * variant, variant=variant, section=j))
    items.sort(key=lambda p: p.order)
    for n, item in enumerate(items):
        item.key = f"h{n:03d}"
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


def chunk_question_sections(n_sections: int, covered: set[int], n_questions: int) -> list[int]:
    """The section of each chunk question: first the sections no section question covers (spread evenly
    over them when there are more of them than questions), then round-robin over all sections in an
    order that spreads consecutive questions over the document."""
    uncovered = [j for j in range(n_sections) if j not in covered]
    if n_questions <= len(uncovered):
        return [uncovered[k] for k in _spread(len(uncovered), n_questions)]
    out = list(uncovered)
    order = _interleaved(n_sections)
    k = 0
    while len(out) < n_questions and order:
        out.append(order[k % len(order)])
        k += 1
    return sorted(out)


def _diverse_plan(doc, cfg: SynthConfig, rng: random.Random) -> list[PlannedQA]:
    weights = cfg.qa.diverse_type_weights
    types = [t for t in weights if weights[t] > 0]
    n_chunks = len(doc.chunks)
    items = []
    seen: dict[tuple, int] = {}
    for n in range(cfg.qa.diverse_per_document):
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


def _link_variants(plan: list[PlannedQA]) -> None:
    """Each variant > 0 follows the previous question with the same signature (type + evidence, or parent)."""
    last: dict[tuple, str] = {}
    for item in sorted(plan, key=lambda p: (p.key[0], p.variant, p.key)):
        sig = (item.kind, item.qtype, tuple(item.evidence_ids), item.parent)
        if item.variant > 0 and sig in last:
            item.after = last[sig]
        last[sig] = item.key


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n)."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted({min(n - 1, int((q + 0.5) * n / k)) for q in range(k)})


def _interleaved(n: int) -> list[int]:
    """range(n) in an order whose every prefix is spread over the whole range (0, n/2, n/4, 3n/4, ...)."""
    order, seen = [], set()
    step = 1
    while len(order) < n:
        for q in range(step):
            j = min(n - 1, int((q + 0.5) * n / step))
            if j not in seen:
                seen.add(j)
                order.append(j)
        step *= 2
    return order


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
