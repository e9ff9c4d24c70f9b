"""Algorithm 2's PLAN (He et al. 2025): which documents go in each sample, cut where, and which QA turns follow.

Pure Python and seeded, no tokenizer: `plan_stage_samples` plans every sample of a stage (documents, cuts,
turns); concat.py then renders and fits each plan (that part can run in parallel).

Per sample:
- Documents are taken from a seeded queue that spreads usage (`_DocumentCycler`). Within a window of
  the queue the choice favours documents that FILL the target: the last slot takes the first
  candidate whose estimated sample reaches concat.min_fill of the target, else the fullest one.
- A document longer than the room left is CUT at a section boundary (concat.cut_long_documents):
  its text ends with the last kept section, and only the QA whose evidence lies in the kept part stay
  (questions written from summaries and the global summary leave, being about the whole document).
- Turns (`plan_conversation`), the published schedule: after document t, its summary turns, N1
  hierarchical + N1 diverse QA of t, N2 diverse QA of earlier documents, and per earlier document
  with probability p N3 hierarchical QA continuing its reading-order sequence. Then the REST of the
  last document (concat.rest_of_last_document): its remaining hierarchical QA right after its N1
  ones (the reading order stays gapless) and its remaining diverse QA after its N1 diverse ones.
  These turns are marked PART_REST_*: fitting drops them first, so the schedule keeps priority.

Determinism: every random choice of sample i comes from `random.Random` seeded with a stable hash of
(cfg.seed, stage.name, i). Document choice also depends on how often each document was used by
samples 0..i-1, so a stage is reproducible as a whole, sample by sample in order.

The plan reads only sizes and ids: text and QA lengths, section bounds, and each QA's kind and
section. So it runs equally on full DocumentQA objects or on their `PoolDocument` sketches (no text,
no QA contents), which is what the driver holds for a whole corpus; render workers load the full
documents of their samples from disk and cut them where the plan says.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, NamedTuple, Sequence, Union

from .config import ConcatConfig, StageConfig
from .records import DocumentQA, QARecord, SectionBound

PART_SUMMARY = "summary"             # the document's summary turns, first in its block
PART_HIERARCHICAL = "hierarchical"   # N1: next hierarchical QA of the document just read
PART_DIVERSE = "diverse"             # N1: diverse QA of the document just read
PART_EARLIER = "earlier_diverse"     # N2: diverse QA of earlier documents
PART_FOLLOWUP = "followup"           # N3: revisit, continuing an earlier document's hierarchy
PART_REST_HIERARCHICAL = "rest_hierarchical"  # the last document's remaining hierarchical QA
PART_REST_DIVERSE = "rest_diverse"            # the last document's remaining diverse QA
REST_PARTS = (PART_REST_HIERARCHICAL, PART_REST_DIVERSE)
TURN_OVERHEAD_TOKENS = 12            # template tokens per QA turn (role headers, end tokens), for estimates only
CANDIDATE_WINDOW = 32                # queued documents considered for one slot


@dataclass(frozen=True)
class QASketch:
    """What the plan knows of a QA record: its id, its section, its size (not its text)."""

    qa_id: str
    section_end: int
    grounded: bool
    chars: int           # len(question) + len(answer)

    @classmethod
    def of(cls, qa: QARecord) -> "QASketch":
        return cls(qa.qa_id, qa.section_end, qa.grounded, qa.chars)


@dataclass(frozen=True)
class PoolDocument:
    """What the plan knows of a document (a DocumentQA without its text or QA contents): sizes, ids,
    section bounds, and whether special-token strings occur in its text (None = not looked at)."""

    doc_id: str
    title: str
    n_tokens: int
    n_chars: int
    hierarchical: list[QASketch] = field(default_factory=list)
    diverse: list[QASketch] = field(default_factory=list)
    summaries: list[QASketch] = field(default_factory=list)
    sections: list[SectionBound] = field(default_factory=list)
    special_tokens: bool | None = None

    @classmethod
    def of(cls, doc: DocumentQA, tokenizer: Any = None) -> "PoolDocument":
        """The sketch of `doc`; with a tokenizer, also whether its text holds special-token strings."""
        special = None
        if tokenizer is not None:
            from .render import special_tokens_in_contents

            special = bool(special_tokens_in_contents([{"content": doc.text}], tokenizer))
        return cls(doc.doc_id, doc.title, doc.n_tokens, doc.n_chars,
                   [QASketch.of(q) for q in doc.hierarchical], [QASketch.of(q) for q in doc.diverse],
                   [QASketch.of(q) for q in doc.summaries], list(doc.sections), special)


PlanDocument = Union[DocumentQA, PoolDocument]


class PlannedTurn(NamedTuple):
    doc_index: int   # index into the sample's documents
    qa: QARecord
    block: int       # the document block t (0-based) whose schedule asked it; interleaved layout opens doc t there
    part: str        # PART_*


class SamplePlan(NamedTuple):
    index: int                   # sample index in the stage
    documents: list[DocumentQA]  # in context order; a cut document is a shortened copy
    turns: list[PlannedTurn]
    seed: int                    # re-plans with fewer documents when fitting must drop one
    cut: int                     # documents cut at a section boundary
    qa_cut: int                  # QA left out with the cut parts


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from the parts, identical across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def _rng(*parts: Any) -> random.Random:
    return random.Random(stable_int(*parts))


def plan_conversation(
    docs: Sequence[DocumentQA], cfg: ConcatConfig, rng: random.Random, shortfalls: Counter | None = None
) -> list[PlannedTurn]:
    """The QA schedule of one sample, documents in the given order: one PlannedTurn per turn, in turn
    order (a named tuple whose first two fields are (doc_index, qa)). No QA is asked twice.

    Hierarchical QA are consumed through one cursor per document, so N1, the rest and later revisits walk
    the document's reading-order sequence without gaps. When a document runs out, what is left is taken
    and the missing count is added to `shortfalls[part]`.
    """
    shortfalls = shortfalls if shortfalls is not None else Counter()
    cursors = [0] * len(docs)
    diverse_left = [list(d.diverse) for d in docs]
    turns: list[PlannedTurn] = []
    last = len(docs) - 1
    rest = cfg.rest_of_last_document

    def next_hierarchical(s: int, n: int, block: int, part: str) -> None:
        seq = docs[s].hierarchical
        take = seq[cursors[s]: cursors[s] + n]
        cursors[s] += len(take)
        shortfalls[part] += n - len(take)
        turns.extend(PlannedTurn(s, qa, block, part) for qa in take)

    for t in range(len(docs)):
        if cfg.summary_turns != "none":
            turns.extend(PlannedTurn(t, qa, t, PART_SUMMARY) for qa in docs[t].summaries)
        next_hierarchical(t, cfg.n1_hierarchical, t, PART_HIERARCHICAL)
        if rest and t == last:
            seq = docs[t].hierarchical
            turns.extend(PlannedTurn(t, qa, t, PART_REST_HIERARCHICAL) for qa in seq[cursors[t]:])
            cursors[t] = len(seq)
        own = diverse_left[t]
        picked = rng.sample(range(len(own)), min(cfg.n1_diverse, len(own)))
        shortfalls[PART_DIVERSE] += cfg.n1_diverse - len(picked)
        turns.extend(PlannedTurn(t, own[i], t, PART_DIVERSE) for i in picked)
        taken = set(picked)
        diverse_left[t] = [qa for i, qa in enumerate(own) if i not in taken]
        if rest and t == last:
            turns.extend(PlannedTurn(t, qa, t, PART_REST_DIVERSE) for qa in diverse_left[t])
            diverse_left[t] = []
        if t > 0:
            # N2 is drawn from the union of the earlier documents' unused diverse QA (uniform over QA).
            pool = [(s, i) for s in range(t) for i in range(len(diverse_left[s]))]
            chosen = rng.sample(pool, min(cfg.n2_earlier_diverse, len(pool)))
            shortfalls[PART_EARLIER] += cfg.n2_earlier_diverse - len(chosen)
            turns.extend(PlannedTurn(s, diverse_left[s][i], t, PART_EARLIER) for s, i in chosen)
            gone = set(chosen)
            for s in range(t):
                diverse_left[s] = [qa for i, qa in enumerate(diverse_left[s]) if (s, i) not in gone]
        for s in range(t):
            # rng.random() is drawn for every earlier document whatever p is, so p only changes the outcome.
            if rng.random() < cfg.p_revisit:
                next_hierarchical(s, cfg.n3_followups, t, PART_FOLLOWUP)
    return turns


def _doc_header(i: int, doc: DocumentQA) -> str:
    title = (doc.title or "").strip()
    return f"Document {i + 1}: {title}" if title else f"Document {i + 1}"


def _question(turn: PlannedTurn, docs: Sequence[DocumentQA]) -> str:
    q = turn.qa.question.strip()
    if len(docs) < 2:
        return q
    # The same question text could fit several documents: say which one is meant.
    title = (docs[turn.doc_index].title or "").strip()
    name = f"Document {turn.doc_index + 1} ({title})" if title else f"Document {turn.doc_index + 1}"
    return f"About {name}: {q}"


def build_messages(docs: Sequence[DocumentQA], turns: Sequence[PlannedTurn], cfg: ConcatConfig) -> tuple[list[dict], list[int]]:
    """The conversation and the indices of the documents that made it into the context, in order.

    upfront: the first user turn holds every document, then the first question. interleaved: document t
    opens the first user turn at or after its block (so a document whose block has no turn still
    appears before the next question, and a document after the last turn is left out).
    """
    messages: list[dict] = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    opened: list[int] = []
    for n, turn in enumerate(turns):
        if cfg.layout == "upfront":
            new = list(range(len(docs))) if n == 0 else []
        else:
            new = [i for i in range(len(opened), len(docs)) if i <= turn.block]
        opened.extend(new)
        parts = [f"{_doc_header(i, docs[i])}\n\n{docs[i].text.strip()}" for i in new]
        parts.append(_question(turn, docs))
        messages.append({"role": "user", "content": "\n\n".join(parts)})
        messages.append({"role": "assistant", "content": turn.qa.answer.strip()})
    return messages, opened


def cut_document(doc: DocumentQA, last_section: int) -> tuple[DocumentQA, int]:
    """The document up to and including section `last_section`, with the QA whose evidence lies there;
    returns (the cut copy, number of QA and summary turns left out)."""
    bound = doc.sections[last_section]

    def keep(qa: QARecord) -> bool:
        return 0 <= qa.section_end <= last_section

    hier = [q for q in doc.hierarchical if keep(q)]
    diverse = [q for q in doc.diverse if keep(q)]
    summaries = [q for q in doc.summaries if keep(q)]
    left_out = (len(doc.hierarchical) + len(doc.diverse) + len(doc.summaries)) - len(hier) - len(diverse) - len(summaries)
    size = {"text": doc.text[:bound.char_end]} if isinstance(doc, DocumentQA) else {"n_chars": bound.char_end}
    cut = replace(doc, **size, n_tokens=bound.token_end, hierarchical=hier, diverse=diverse,
                  summaries=summaries, sections=doc.sections[:last_section + 1])
    return cut, left_out


def has_qa(doc: DocumentQA) -> bool:
    return bool(doc.hierarchical or doc.diverse or doc.summaries)


class Estimates:
    """Token estimates used only to choose documents; the rendered length is what is enforced."""

    def __init__(self, docs: Sequence[DocumentQA], cfg: ConcatConfig):
        chars = sum(d.n_chars for d in docs)
        self.tokens_per_char = (sum(d.n_tokens for d in docs) / chars) if chars else 0.3
        self.fixed = int(len(cfg.system_prompt) * self.tokens_per_char) + 2 * TURN_OVERHEAD_TOKENS
        self.header = 16
        self.cfg = cfg

    def turn_tokens(self, qa: QARecord, multi: bool) -> int:
        # + ~40 chars for the "About Document i (title): " prefix of multi-document samples
        return int((qa.chars + (40 if multi else 0)) * self.tokens_per_char) + TURN_OVERHEAD_TOKENS

    def sample(self, docs: Sequence[DocumentQA], rng_seed: int) -> tuple[int, int]:
        """Estimated tokens of a sample of these documents: (with the scheduled turns, with every planned turn).
        The rest of the last document is optional: fitting drops it first."""
        turns = plan_conversation(docs, self.cfg, random.Random(rng_seed))
        multi = len(docs) > 1
        base = self.fixed + sum(d.n_tokens + self.header for d in docs)
        core = sum(self.turn_tokens(t.qa, multi) for t in turns if t.part not in REST_PARTS)
        rest = sum(self.turn_tokens(t.qa, multi) for t in turns if t.part in REST_PARTS)
        return base + core, base + core + rest


class _DocumentCycler:
    """Spreads document usage: documents are taken from a shuffled queue; used ones go to the back of the
    next cycle (reshuffled, so combinations differ between cycles); candidates not taken stay where they
    are and are tried first by the next sample."""

    def __init__(self, docs: list[DocumentQA], rng):
        order = list(docs)
        rng.shuffle(order)
        self.queue: deque[DocumentQA] = deque(order)
        self.used: list[DocumentQA] = []
        self.uses: Counter = Counter()

    def window(self, rng, refill: bool) -> list[DocumentQA]:
        if refill and not self.queue and self.used:
            rng.shuffle(self.used)
            self.queue.extend(self.used)
            self.used = []
        return list(self.queue)[:CANDIDATE_WINDOW]

    def take(self, doc: DocumentQA) -> None:
        del self.queue[next(i for i, d in enumerate(self.queue) if d is doc)]
        self.used.append(doc)
        self.uses[doc.doc_id] += 1


class SamplePlanner:
    """Plans the samples of one stage in order (document choice depends on earlier samples' usage).

    The pool leaves out, counted in `pool`: documents without QA (without_qa), documents that do not fit
    the target even cut at their first section with one turn (too_long), and those `exclude` names a
    reason for (e.g. special_tokens)."""

    def __init__(self, stage: StageConfig, documents: Sequence[DocumentQA], cfg: ConcatConfig,
                 exclude: Callable[[DocumentQA], str] | None = None):
        self.stage, self.cfg = stage, cfg
        self.est = Estimates(documents, cfg)
        self.pool: Counter = Counter()
        eligible = []
        for d in documents:
            reason = (exclude(d) if exclude else "") or ("without_qa" if not has_qa(d) else "")
            if not reason and self._fit_view([], d, stage.target_tokens, 0) is None:
                reason = "too_long"
            if reason:
                self.pool[reason] += 1
            else:
                eligible.append(d)
        self.eligible = eligible
        self.cycler = _DocumentCycler(eligible, _rng("concat-order", cfg.seed, stage.name))
        self.counters: Counter = Counter()

    def _fit_view(self, picked: list[DocumentQA], doc: DocumentQA, room: int, seed: int) -> tuple[DocumentQA, int] | None:
        """`doc` as it fits after `picked` within `room` tokens: whole, or cut at the latest section boundary
        that fits; None when not even its first section (with one turn) fits."""
        if self.est.sample(picked + [doc], seed)[0] <= room:
            return doc, 0
        if not self.cfg.cut_long_documents or len(doc.sections) < 2:
            return None
        lo, hi, best = 0, len(doc.sections) - 2, None
        while lo <= hi:  # the estimate grows with the kept sections: bisect for the last one that fits
            mid = (lo + hi) // 2
            view, left_out = cut_document(doc, mid)
            if has_qa(view) and self.est.sample(picked + [view], seed)[0] <= room:
                best, lo = (view, left_out), mid + 1
            else:
                hi = mid - 1
        return best

    def plan(self, index: int) -> SamplePlan | None:
        stage, cfg = self.stage, self.cfg
        rng = _rng("concat-sample", cfg.seed, stage.name, index)
        seed = rng.getrandbits(64)
        k = stage.documents_per_sample
        target = stage.target_tokens
        picked: list[DocumentQA] = []
        originals: list[DocumentQA] = []
        cut = qa_cut = 0
        min_cost = self.est.fixed + self.est.header + 2 * TURN_OVERHEAD_TOKENS
        for m in range(k):
            reserve = (k - m - 1) * min_cost  # leave room for the slots still to fill
            candidates = self.cycler.window(rng, refill=len(self.cycler.queue) < k - m)
            choice, best = None, -1
            for doc in candidates:
                if any(doc is o for o in originals):
                    continue
                fitted = self._fit_view(picked, doc, target - reserve, seed)
                if fitted is None:
                    continue
                if m < k - 1:  # earlier slots: queue order, which spreads usage
                    choice = (doc, *fitted)
                    break
                filled = min(self.est.sample(picked + [fitted[0]], seed)[1], target)
                if filled >= cfg.min_fill * target:  # last slot: the first candidate that fills the sample
                    choice = (doc, *fitted)
                    break
                if filled > best:
                    choice, best = (doc, *fitted), filled
            if choice is None:
                break
            doc, view, left_out = choice
            self.cycler.take(doc)
            originals.append(doc)
            picked.append(view)
            if view is not doc:
                cut, qa_cut = cut + 1, qa_cut + left_out
        if len(picked) < k:
            self.counters["samples_short_of_documents"] += 1
        if not picked:
            return None
        return SamplePlan(index, picked, plan_conversation(picked, cfg, random.Random(seed)), seed, cut, qa_cut)
