"""Algorithm 2 (He et al. 2025): several documents and their QA in one multi-turn conversation.

Pure Python and seeded; the Ray stage calls `build_stage_samples` once per curriculum stage.

Per sample: pick documents that fit the stage's token budget (`_DocumentCycler`), plan the QA turns
(`plan_conversation`, the published schedule: after document t, N1 hierarchical + N1 diverse QA of t,
N2 diverse QA of earlier documents, and per earlier document with probability p N3 hierarchical QA
continuing its reading-order sequence), write the messages, render them with the target tokenizer's
chat template (render.py), and trim from the end until the sample fits `target_tokens`.

Determinism: every random choice of sample i comes from `random.Random` seeded with a stable hash of
(cfg.seed, stage.name, i) (Python's `hash()` is salted per process). Document choice also depends on how
often each document was used by samples 0..i-1 (that is how usage is spread), so a stage is
reproducible as a whole, sample by sample in order.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from .config import ConcatConfig, StageConfig
from .records import DocumentQA, QARecord
from .render import Rendered, render_detailed

PART_HIERARCHICAL = "hierarchical"  # N1: next hierarchical QA of the document just read
PART_DIVERSE = "diverse"            # N1: diverse QA of the document just read
PART_EARLIER = "earlier_diverse"    # N2: diverse QA of earlier documents
PART_FOLLOWUP = "followup"          # N3: revisit, continuing an earlier document's hierarchy
TURN_OVERHEAD_TOKENS = 12           # template tokens per QA turn (role headers, end tokens), for estimates only
HISTOGRAM_BINS = 10


class PlannedTurn(NamedTuple):
    doc_index: int   # index into the sample's documents
    qa: QARecord
    block: int       # the document block t (0-based) whose schedule asked it; interleaved layout opens doc t there
    part: str        # PART_*


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from the parts, identical across processes and Python versions."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def sample_id(stage_name: str, seed: int, index: int) -> str:
    return hashlib.sha256(f"sample\x1f{stage_name}\x1f{seed}\x1f{index}".encode("utf-8")).hexdigest()[:24]


def _rng(*parts: Any) -> random.Random:
    return random.Random(stable_int(*parts))


def plan_conversation(
    docs: Sequence[DocumentQA], cfg: ConcatConfig, rng: random.Random, shortfalls: Counter | None = None
) -> list[PlannedTurn]:
    """The QA schedule of one sample, documents in the given order: one PlannedTurn per QA turn, in turn
    order (a named tuple whose first two fields are (doc_index, qa)). No QA is asked twice.

    Hierarchical QA are consumed through one cursor per document, so N1 and later revisits walk the
    document's reading-order sequence without gaps. When a document runs out, what is left is taken
    and the missing count is added to `shortfalls[part]`.
    """
    shortfalls = shortfalls if shortfalls is not None else Counter()
    cursors = [0] * len(docs)
    diverse_left = [list(d.diverse) for d in docs]
    turns: list[PlannedTurn] = []

    def next_hierarchical(s: int, n: int, block: int, part: str) -> None:
        seq = docs[s].hierarchical
        take = seq[cursors[s]: cursors[s] + n]
        cursors[s] += len(take)
        shortfalls[part] += n - len(take)
        turns.extend(PlannedTurn(s, qa, block, part) for qa in take)

    for t in range(len(docs)):
        next_hierarchical(t, cfg.n1_hierarchical, t, PART_HIERARCHICAL)
        own = diverse_left[t]
        picked = rng.sample(range(len(own)), min(cfg.n1_diverse, len(own)))
        shortfalls[PART_DIVERSE] += cfg.n1_diverse - len(picked)
        turns.extend(PlannedTurn(t, own[i], t, PART_DIVERSE) for i in picked)
        taken = set(picked)
        diverse_left[t] = [qa for i, qa in enumerate(own) if i not in taken]
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


class _DocumentCycler:
    """Spreads document usage: documents are taken from a shuffled queue; used ones go to the back of
    the next cycle (reshuffled, so combinations differ between cycles); ones that did not fit the
    remaining budget of a sample stay at the front and are tried first by the next sample."""

    def __init__(self, docs: list[DocumentQA], rng):
        order = list(docs)
        rng.shuffle(order)
        self.queue: deque[DocumentQA] = deque(order)
        self.used: list[DocumentQA] = []
        self.uses: Counter = Counter()

    def take(self, k: int, room: Callable[[int], int], header_tokens: int, rng) -> list[DocumentQA]:
        """Up to k distinct documents; the m-th is accepted when all m documents fit `room(m)` tokens
        (room shrinks with m: more documents bring more QA turns)."""
        picked: list[DocumentQA] = []
        skipped: list[DocumentQA] = []
        used_tokens = 0
        refilled = False
        while len(picked) < k:
            if not self.queue:
                if refilled or not self.used:
                    break  # every document was looked at once: the pool can't supply more
                rng.shuffle(self.used)
                self.queue.extend(self.used)
                self.used = []
                refilled = True
            doc = self.queue.popleft()
            cost = doc.n_tokens + header_tokens
            if used_tokens + cost <= room(len(picked) + 1):
                picked.append(doc)
                used_tokens += cost
            else:
                skipped.append(doc)
        self.queue.extendleft(reversed(skipped))
        self.used.extend(picked)
        self.uses.update(d.doc_id for d in picked)
        return picked


@dataclass(frozen=True)
class PoolDocument:
    """What the plan knows of a document: its size and how many QA it has, not its text or QA contents
    (those stay on disk until a worker renders the samples that use it)."""

    doc_id: str
    n_tokens: int
    n_chars: int
    n_hierarchical: int
    n_diverse: int
    qa_chars: int        # sum of len(question) + len(answer) over its QA

    @classmethod
    def of(cls, doc: DocumentQA) -> "PoolDocument":
        qa = (*doc.hierarchical, *doc.diverse)
        return cls(doc.doc_id, doc.n_tokens, len(doc.text), len(doc.hierarchical), len(doc.diverse),
                   sum(len(q.question) + len(q.answer) for q in qa))

    @property
    def has_qa(self) -> bool:
        return bool(self.n_hierarchical or self.n_diverse)


class _Estimates:
    """Token estimates used only to choose documents; the rendered length is what is enforced."""

    def __init__(self, pool: Sequence[PoolDocument], cfg: ConcatConfig):
        chars = sum(d.n_chars for d in pool)
        self.tokens_per_char = (sum(d.n_tokens for d in pool) / chars) if chars else 0.3
        n_qa = sum(d.n_hierarchical + d.n_diverse for d in pool)
        mean_chars = (sum(d.qa_chars for d in pool) / n_qa) if n_qa else 0.0
        # + ~40 chars for the "About Document i (title): " prefix
        self.turn_tokens = int((mean_chars + 40) * self.tokens_per_char) + TURN_OVERHEAD_TOKENS
        self.fixed = int(len(cfg.system_prompt) * self.tokens_per_char) + 2 * TURN_OVERHEAD_TOKENS
        self.header = 16
        self.cfg = cfg

    def qa_tokens(self, k: int) -> int:
        c = self.cfg
        turns = k * (c.n1_hierarchical + c.n1_diverse) + (k - 1) * c.n2_earlier_diverse
        turns += c.p_revisit * c.n3_followups * k * (k - 1) / 2
        return int(max(turns, 1) * self.turn_tokens)


def _fit(docs: list[DocumentQA], cfg: ConcatConfig, tokenizer: Any, target: int, plan_seed: int, counters: Counter):
    """Plan, render and trim until the sample fits; drop documents from the end when not even one QA fits."""
    for k in range(len(docs), 0, -1):
        sub = docs[:k]
        shortfalls: Counter = Counter()
        turns = plan_conversation(sub, cfg, random.Random(plan_seed), shortfalls)
        j = len(turns)
        while j >= 1:
            messages, opened = build_messages(sub, turns[:j], cfg)
            rendered = render_detailed(messages, tokenizer)
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


def _summary(values: list[float]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


@dataclass(frozen=True)
class SamplePlan:
    """Sample `index` of a stage: its documents in order and the seed of its QA schedule."""

    index: int
    doc_ids: tuple[str, ...]
    plan_seed: int
    short_of_documents: bool    # fewer documents than stage.documents_per_sample were available


@dataclass
class StagePlan:
    samples: list[SamplePlan]
    skip_reasons: Counter       # samples not planned at all (no_document_fits)
    pool: dict                  # pool statistics for the manifest
    samples_short_of_documents: int


@dataclass
class SampleResult:
    index: int
    row: dict | None            # a SAMPLE_SCHEMA row, or None when no QA turn fits
    counters: Counter           # turns/documents dropped to fit, shortfalls, documents_unasked


def plan_stage(stage: StageConfig, pool: Sequence[PoolDocument], cfg: ConcatConfig) -> StagePlan:
    """The seeded, sequential part of Algorithm 2: which documents each sample gets, and its schedule seed.

    Cheap (no text, no tokenizer). Document choice depends on how often each document was used by the
    samples before (that is how usage is spread), so this runs sample by sample, in order. The
    conversation itself (which QA, how many fit) is `render_sample`'s job, from `plan_seed`, and
    any number of workers can do that part.
    """
    est = _Estimates(pool, cfg)
    target = stage.target_tokens
    min_cost = est.fixed + est.header + est.qa_tokens(1)
    no_qa = [d for d in pool if not d.has_qa]
    too_long = [d for d in pool if d.has_qa and d.n_tokens + min_cost > target]
    eligible = [d for d in pool if d.has_qa and d.n_tokens + min_cost <= target]
    cycler = _DocumentCycler(eligible, _rng("concat-order", cfg.seed, stage.name))
    samples: list[SamplePlan] = []
    skip_reasons: Counter = Counter()
    short = 0
    k_wanted = stage.documents_per_sample
    for index in range(stage.samples):
        rng = _rng("concat-sample", cfg.seed, stage.name, index)
        chosen = cycler.take(k_wanted, lambda m: target - est.fixed - est.qa_tokens(m), est.header, rng)
        if len(chosen) < k_wanted:
            short += 1
        if not chosen:
            skip_reasons["no_document_fits"] += 1
            continue
        samples.append(SamplePlan(index, tuple(d.doc_id for d in chosen), rng.getrandbits(64), len(chosen) < k_wanted))
    uses = [cycler.uses.get(d.doc_id, 0) for d in eligible]
    pool_stats = {
        "documents": len(pool),
        "eligible": len(eligible),
        "too_long": len(too_long),
        "without_qa": len(no_qa),
        "used_distinct": sum(1 for u in uses if u),
        "uses": _summary(uses),
    }
    return StagePlan(samples, skip_reasons, pool_stats, short)


def render_sample(plan: SamplePlan, docs: Sequence[DocumentQA], stage: StageConfig, cfg: ConcatConfig, tokenizer: Any,
                  tokenizer_hash: str) -> SampleResult:
    """Schedule, render and tokenize one planned sample (docs: its documents, in plan order), trimmed to fit.

    A pure function of its arguments: the same plan gives the same row in any process.
    """
    counters: Counter = Counter()
    fitted = _fit(list(docs), cfg, tokenizer, stage.target_tokens, plan.plan_seed, counters)
    if fitted is None:
        return SampleResult(plan.index, None, counters)
    in_context, turns, messages, rendered = fitted
    chunks = list(dict.fromkeys(e for t in turns for e in t.qa.evidence_ids))
    # in_context is always a prefix of the chosen documents, so doc_index addresses it directly
    counters["documents_unasked"] += len(in_context) - len({t.doc_index for t in turns})
    n_tokens = len(rendered.input_ids)
    row = {
        "sample_id": sample_id(stage.name, cfg.seed, plan.index),
        "stage": stage.name,
        "target_tokens": stage.target_tokens,
        "num_tokens": n_tokens,
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
    return SampleResult(plan.index, row, counters)


@dataclass(frozen=True)
class SampleSummary:
    """What the stage statistics need of a rendered sample (the row itself may live in another process)."""

    index: int
    built: bool
    num_tokens: int = 0
    num_documents: int = 0
    num_questions: int = 0
    ungrounded_questions: int = 0

    @classmethod
    def of(cls, result: SampleResult) -> "SampleSummary":
        r = result.row
        if r is None:
            return cls(result.index, False)
        return cls(result.index, True, r["num_tokens"], len(r["documents"]), r["num_questions"],
                   r["ungrounded_questions"])


def stage_stats(stage: StageConfig, plan: StagePlan, summaries: Sequence[SampleSummary], counters: Counter) -> dict:
    """The stage's statistics from its plan and its samples' summaries (in sample order)."""
    target = stage.target_tokens
    skip_reasons = Counter(plan.skip_reasons)
    built = [s for s in summaries if s.built]
    skip_reasons["no_qa_turn_fits"] += sum(1 for s in summaries if not s.built)
    skip_reasons = Counter({k: v for k, v in skip_reasons.items() if v})
    docs_hist = Counter(s.num_documents for s in built)
    lengths = [s.num_tokens for s in built]
    bin_width = target / HISTOGRAM_BINS
    hist = [0] * HISTOGRAM_BINS
    for n in lengths:
        hist[min(int(n / bin_width), HISTOGRAM_BINS - 1)] += 1
    return {
        "stage": stage.name,
        "target_tokens": target,
        "samples_requested": stage.samples,
        "samples_built": len(built),
        "samples_skipped": sum(skip_reasons.values()),
        "skip_reasons": dict(skip_reasons),
        "documents_per_sample_requested": stage.documents_per_sample,
        "documents_per_sample": {str(k): v for k, v in sorted(docs_hist.items())},
        "samples_short_of_documents": plan.samples_short_of_documents,
        "qa_turns_per_sample": _summary([s.num_questions for s in built]),
        "fill": _summary([s.num_tokens / target for s in built]),
        "token_length_histogram": {
            "edges": [round(i * bin_width) for i in range(HISTOGRAM_BINS + 1)],
            "counts": hist,
        },
        "shortfalls": {k.split(":", 1)[1]: v for k, v in sorted(counters.items()) if k.startswith("shortfall:") and v},
        "documents_dropped_to_fit": counters["documents_dropped_to_fit"],
        "turns_dropped_to_fit": counters["turns_dropped_to_fit"],
        "documents_unasked": counters["documents_unasked"],
        "ungrounded_questions": sum(s.ungrounded_questions for s in built),
        "pool": plan.pool,
    }


def build_stage_samples(
    stage: StageConfig, documents: Sequence[DocumentQA], cfg: ConcatConfig, tokenizer: Any, tokenizer_hash: str
) -> tuple[list[dict], dict]:
    """Build `stage.samples` rows (ctxforge.schema.SAMPLE_SCHEMA) and the stage's statistics, in this process.

    `plan_stage`, then `render_sample` for each planned sample in order, then `stage_stats`; the
    parallel path (write.py) runs the same three with the renders spread over workers.
    No row exceeds `stage.target_tokens`. Cost is dominated by tokenizing each rendered sample once
    (about 8 s per 1M tokens for Qwen2's BPE on one core), twice when the sample had to be trimmed.
    Stats: samples_built/skipped (+ skip_reasons), documents_per_sample histogram, qa_turns_per_sample
    and fill (min/mean/max), token_length_histogram (10 bins over [0, target]), shortfalls per schedule
    part, documents/turns dropped to fit, documents_unasked, and pool usage.
    """
    by_id = {d.doc_id: d for d in documents}
    plan = plan_stage(stage, [PoolDocument.of(d) for d in documents], cfg)
    rows: list[dict] = []
    summaries: list[SampleSummary] = []
    counters: Counter = Counter()
    for sp in plan.samples:
        result = render_sample(sp, [by_id[i] for i in sp.doc_ids], stage, cfg, tokenizer, tokenizer_hash)
        counters.update(result.counters)
        summaries.append(SampleSummary.of(result))
        if result.row is not None:
            rows.append(result.row)
    return rows, stage_stats(stage, plan, summaries, counters)
