"""Plain records passed between the synthesis modules (chunking, planning, grounding, concatenation).

They are the in-memory form; Parquet rows are their `asdict`. Ids are stable strings so lineage in
samples can point back at documents, chunks and QA pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Chunk:
    """A small chunk: the unit of detail questions. Nested exactly inside one medium chunk (section)."""

    chunk_id: str        # f"{doc_id}:s{index:05d}"
    doc_id: str
    index: int           # position among the document's small chunks
    section_index: int   # the medium chunk (section) holding it
    token_start: int     # [token_start, token_end) in the document's target-tokenizer ids
    token_end: int
    char_start: int      # [char_start, char_end) in the document text; text == doc_text[char_start:char_end]
    char_end: int
    text: str


@dataclass(frozen=True)
class Section:
    """A medium chunk: `smalls_per_medium` consecutive small chunks, boundaries shared exactly."""

    section_id: str      # f"{doc_id}:m{index:04d}"
    doc_id: str
    index: int
    chunk_start: int     # [chunk_start, chunk_end) small-chunk indices
    chunk_end: int
    token_start: int
    token_end: int
    char_start: int
    char_end: int


@dataclass
class QARecord:
    qa_id: str
    doc_id: str
    kind: str                 # "hierarchical" | "diverse" | "summary"
    qtype: str                # hierarchical: global | section | chunk | followup; diverse: see config.DIVERSE_TYPES;
                              # summary: global_summary | section_summary
    order: int                # hierarchical: position in the document's reading-order sequence; diverse: plan index
    question: str
    answer: str
    evidence_ids: list[str]   # chunk ids, or summary ids (f"{doc_id}:summary:global", f"{section_id}:summary")
    evidence_quote: str
    grounded: bool = False    # passed every check: quote grounded, answer supported, judge (when asked) said yes
    grounding_score: float = 0.0
    parent_qa_id: str = ""    # follow-ups: the QA they continue
    request_id: str = ""
    quote_grounded: bool = False
    grounding_basis: str = ""  # document | summary | none: where the quote was found
    answer_support: float = 0.0  # share of the answer's content words found in the evidence the student reads
    judge: str = ""            # yes | no | "" (not judged)
    evidence_quotes: list[str] = field(default_factory=list)  # every quote (questions over several passages)
    section_end: int = -1      # last section index the evidence lies in (-1 = whole document: summaries)

    @property
    def chars(self) -> int:
        """Characters of the turn's contents (question + answer): what Algorithm 2 estimates sizes from."""
        return len(self.question) + len(self.answer)


@dataclass(frozen=True)
class SectionBound:
    """Where a section ends, so Algorithm 2 can cut a long document at a section boundary."""

    index: int
    char_end: int
    token_end: int


@dataclass
class DocumentQA:
    """What Algorithm 2 needs of one document: its text, size, QA lists, summaries and section ends."""

    doc_id: str
    title: str
    text: str
    n_tokens: int
    hierarchical: list[QARecord] = field(default_factory=list)  # reading order (global -> section -> chunk, follow-ups after parents)
    diverse: list[QARecord] = field(default_factory=list)
    summaries: list[QARecord] = field(default_factory=list)     # summary turns: the global one, then sections in order
    sections: list[SectionBound] = field(default_factory=list)

    @property
    def n_chars(self) -> int:
        return len(self.text)
