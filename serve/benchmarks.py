"""The evaluation's benchmark registry: what `ctxforge eval` runs against each endpoint.

A benchmark is a `Benchmark` subclass registered under its config section's name (`cfg.<key>`, a
pydantic section with an `enabled` field). For each model, evaluate.py runs every enabled benchmark
in registry order with an `EndpointContext` (the reached endpoint, its window, the tokenizer that
sizes prompts, a caching client) and stores what `run` returns under results["models"][name][key].
report.py asks each benchmark for its Markdown section and plots; the CLI prints its `summary`.

To add one (e.g. a long-output task): a module with a `Benchmark` subclass decorated `@register`, its
config section added to `EvalConfig` (eval_config.py), and the module named in `BUILTIN` below.
Each failed request counts as a score of 0 in the task's mean and is reported (RULER's protocol).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctxforge.serve.client import EvalClient, Record

BUILTIN = ("ctxforge.serve.eval_ruler", "ctxforge.serve.eval_infinitebench", "ctxforge.serve.lmeval",
           "ctxforge.serve.longbench_chat", "ctxforge.serve.eval_longgen")


@dataclass
class EndpointContext:
    cfg: Any                   # EvalConfig
    entry: Any                 # EndpointConfig
    index: int                 # N of models.N (for error messages)
    base_url: str              # .../v1
    model_id: str              # what requests send as `model`
    window: int                # max_model_len of the endpoint
    tokenizer: Any             # sizes prompts exactly as the endpoint counts them
    tokenizer_path: str        # where that tokenizer lives (for tools that load their own, e.g. lm-eval)
    client: EvalClient         # caching, retrying chat client for this endpoint
    api_key: str | None
    out_dir: Path              # output.dir/<model name>
    api_keys: dict             # other keys the CLI read (e.g. "judge")


class Benchmark(ABC):
    key: str = ""      # config section and results key
    title: str = ""    # report heading

    def enabled(self, cfg) -> bool:
        return bool(getattr(cfg, self.key).enabled)

    def preflight(self, cfg, api_keys: dict) -> None:
        """Check this benchmark's data before any work; raise PreflightError naming the key."""

    @abstractmethod
    async def run(self, ctx: EndpointContext) -> tuple[dict, list[Record]]:
        """(result dict for results.json, the records of every request sent)."""

    def summary(self, result: dict) -> str:
        return ""

    def markdown(self, results: dict) -> list[str]:
        """Report lines for all models (results["models"][name][self.key])."""
        return []

    def plots(self, results: dict, plot_dir: Path) -> list[str]:
        return []


REGISTRY: dict[str, Benchmark] = {}


def register(cls: type[Benchmark]) -> type[Benchmark]:
    REGISTRY[cls.key] = cls()
    return cls


def benchmarks() -> list[Benchmark]:
    """Every registered benchmark, built-in ones first, in registry order."""
    for module in BUILTIN:
        importlib.import_module(module)
    return list(REGISTRY.values())


def mean_with_failures(records: list[Record]) -> dict:
    """A task's score with failed requests counted as 0: {n, errors, score}."""
    if not records:
        return {"n": 0, "errors": 0, "score": None}
    errors = sum(r.error is not None for r in records)
    return {"n": len(records), "errors": errors, "score": sum(r.score or 0.0 for r in records) / len(records)}
