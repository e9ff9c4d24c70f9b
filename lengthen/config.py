"""`ctxforge lengthen`'s config: the Self-Lengthen loop as one validated model (see ctxforge.config).

Reuses the synthesis stage's `GeneratorConfig` (backend, engine and sampling settings; both roles use
it, each with its own current weights) and the training stage's `StageConfig` / `RuntimeConfig` (the
one short SFT stage each role is trained with). Published defaults (Quan et al. 2024, QwenLM/Self-Lengthen
run.sh and step scripts) are noted per field; sizes that only matter for cost are smaller by default.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator, model_validator

from ctxforge.config import PathStr, StrictModel, check_weights
from ctxforge.lengthen.length_control import TYPES
from ctxforge.generation.config import REMOVED_GENERATOR_KEYS, GeneratorConfig
from ctxforge.train.config import RuntimeConfig, StageConfig


class OutputConfig(StrictModel):
    dir: PathStr = Field("runs/lengthen", description="Output directory: iter_NNN/ per iteration, final/ (the long-output "
                                                  "sample set), work/requests.sqlite (request cache), manifest.json.")
    rows_per_shard: int = Field(256, ge=1, description="Samples per Parquet shard.")


class SeedsConfig(StrictModel):
    path: PathStr = Field("builtin", description="Seed instructions: builtin (40 long-writing instructions shipped with "
                                             "ctxforge), a .jsonl file with an 'instruction' field per row, or a text "
                                             "file with one instruction per line.")


class SelfInstructConfig(StrictModel):
    count: int = Field(64, ge=0, description="New instructions to write per iteration (published: 5000). 0 = no "
                                             "self-instruct: the seed instructions themselves are answered.")
    examples: int = Field(2, ge=1, description="Seed instructions shown as examples in each request (published: 2).")
    max_tokens: int = Field(256, ge=16, description="Completion budget of a self-instruct request.")
    max_chars: int = Field(1000, ge=20, description="Max characters of an instruction (JSON schema bound).")
    min_words: int = Field(4, ge=1, description="Instructions with fewer words are rejected (published: more than 3).")
    max_words: int = Field(499, ge=1, description="Instructions with more words are rejected (published: fewer than 500).")
    max_similarity: float = Field(90.0, ge=0, le=100, description="An instruction whose rapidfuzz ratio to a seed or an "
                                                                  "earlier instruction exceeds this is a duplicate and dropped.")
    judge: bool = Field(False, description="Ask the generator whether each new instruction asks for a long text and "
                                           "drop those it rejects (published: yes).")
    max_tries: int = Field(3, ge=1, description="Requests per wanted instruction before giving up (published: 10).")


class ResponsesConfig(StrictModel):
    per_instruction: int = Field(2, ge=1, description="Initial responses per instruction (published: 2).")
    max_tokens: int = Field(1024, ge=16, description="Completion budget of an initial response.")
    max_tries: int = Field(3, ge=1, description="Requests per response until one passes the checks (published: 20).")


class ExtendConfig(StrictModel):
    rounds: int = Field(3, ge=1, description="Extension rounds per try: extend the first half of the paragraphs, keep "
                                             "the first part of that, complete the rest (published: 3).")
    keep_fraction: float = Field(2 / 3, gt=0, le=1, description="Share of the extended first half's paragraphs kept "
                                                                "before the completion (published: 2/3).")
    attempts: int = Field(2, ge=1, description="Independent extension attempts per initial response (published: 2).")
    max_tries: int = Field(3, ge=1, description="Tries per attempt; a try that ends at most min_ratio x the initial "
                                                "length starts over from the initial response (published: 20).")
    min_ratio: float = Field(1.2, ge=0, description="An extension is kept only when it has more than min_ratio x the "
                                                    "initial response's words (published: 1.2).")
    max_tokens: int = Field(2048, ge=16, description="Completion budget of each extension request.")


class ChecksConfig(StrictModel):
    repeat_ngram: int = Field(13, ge=0, description="A text in which any word n-gram of this size occurs twice is "
                                                    "repetitive and rejected (published: 13); 0 = off.")
    end_punctuation: bool = Field(True, description="A text must end with sentence-final or closing punctuation, "
                                                    "else it is truncated and rejected (published check).")


class AcceptConfig(StrictModel):
    min_words: int = Field(0, ge=0, description="Extended responses with fewer words are dropped (0 = no bound; "
                                                "the published final set keeps 2,000-8,000).")
    max_words: int = Field(0, ge=0, description="Extended responses with more words are dropped (0 = no bound).")
    drop_short: bool = Field(True, description="Drop short outliers from initial and extended responses (published "
                                               "drop_short: the shortest ~21% always, longer ones less often; seeded).")


class DataConfig(StrictModel):
    system_prompt: str = Field("", description="System message of every generation request and training sample "
                                               "('' = none; the chat template may add its default).")
    line_drop: float = Field(0.2, ge=0, lt=1, description="Extender SFT: share of the initial response's lines dropped "
                                                          "at random (seeded per sample) in its prompt (published: 0.2).")
    seed: int = Field(0, description="Seed of self-instruct examples and topics, drop_short, line-dropping and "
                                     "length-control choices.")


class LengthControlConfig(StrictModel):
    probability: float = Field(1.0, ge=0, le=1, description="Share of the final long-output samples whose query gets "
                                                            "a word-count suffix derived from its response.")
    type_weights: dict[str, float] = Field(
        default_factory=lambda: {"about": 0.4, "range": 0.25, "above": 0.1, "below": 0.25},
        description=f"Sampling weights of the suffix types ({', '.join(TYPES)}); published: 0.4/0.25/0.1/0.25.")

    @field_validator("type_weights")
    @classmethod
    def _known(cls, v: dict[str, float]):
        return check_weights(v, TYPES, "constraint type")


def _default_stage() -> StageConfig:
    return StageConfig(name="sft", max_seq_len=8192, lr=1e-5, schedule="cosine", epochs=1, workers=1, sp_degree=1,
                       batching="pack")


class RoleTrainingConfig(StrictModel):
    enabled: bool = Field(True, description="Train both roles after each iteration's data (false: one round of data "
                                            "from the initial model only).")
    stage: StageConfig = Field(default_factory=_default_stage,
                               description="The one SFT stage each role is trained with (ctxforge train's StageConfig; "
                                           "name and data_stage are set per role). max_seq_len also bounds the samples.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="ctxforge train's runtime section.")


class RunConfig(StrictModel):
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS if set, else an embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray (null = all).")
    progress: bool = Field(True, description="Show progress bars.")


class LengthenConfig(StrictModel):
    deprecated_keys: ClassVar[dict[str, str]] = {"run": "runtime"}   # `runtime` as in synth, train and eval
    removed_keys: ClassVar[dict[str, str]] = REMOVED_GENERATOR_KEYS

    iterations: int = Field(3, ge=1, description="Generator/extender iterations (published: 3).")
    output: OutputConfig = Field(default_factory=OutputConfig)
    generator: GeneratorConfig = Field(
        default_factory=GeneratorConfig,
        description="Engine for both roles; generator.model holds the initial weights of both (later iterations use "
                    "the trained checkpoints). summary_max_tokens and qa_max_tokens are not used here.")
    tokenizer: str | None = Field(None, description="Tokenizer rendering the training samples (null = generator.model).")
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    self_instruct: SelfInstructConfig = Field(default_factory=SelfInstructConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    extend: ExtendConfig = Field(default_factory=ExtendConfig)
    checks: ChecksConfig = Field(default_factory=ChecksConfig)
    accept: AcceptConfig = Field(default_factory=AcceptConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    length_control: LengthControlConfig = Field(default_factory=LengthControlConfig)
    train: RoleTrainingConfig = Field(default_factory=RoleTrainingConfig)
    runtime: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _cross_checks(self):
        gen = self.generator
        if gen.backend == "http" and not gen.base_url:
            raise ValueError("generator.base_url is required when generator.backend = http")
        if gen.backend == "http" and self.iterations > 1 and self.train.enabled:
            raise ValueError(f"generator.backend = http reaches one fixed served model, but iterations = "
                             f"{self.iterations} with training needs the trained checkpoints from iteration 2 on: "
                             f"use backend hf or vllm (they load each checkpoint), or iterations = 1")
        budgets = {"self_instruct.max_tokens": self.self_instruct.max_tokens,
                   "responses.max_tokens": self.responses.max_tokens, "extend.max_tokens": self.extend.max_tokens}
        key, most = max(budgets.items(), key=lambda kv: kv[1])
        if gen.max_model_len <= most:
            raise ValueError(f"generator.max_model_len = {gen.max_model_len} leaves no room for a prompt after "
                             f"{key} = {most}")
        if self.self_instruct.min_words > self.self_instruct.max_words:
            raise ValueError(f"self_instruct.min_words {self.self_instruct.min_words} > max_words "
                             f"{self.self_instruct.max_words}")
        if self.accept.max_words and self.accept.min_words > self.accept.max_words:
            raise ValueError(f"accept.min_words {self.accept.min_words} > accept.max_words {self.accept.max_words}")
        return self
