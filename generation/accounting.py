"""Where a run spends engine time and money, per pass and in total (the projection before a run is
pipeline/projection.py).

Engine seconds come from the engines themselves (EngineMeter): `alive` from the actor's start to its
release, of which `load` (building the engine: weights, CUDA graphs), `generating` (at least one
request inside) and `idle` (the rest: waiting for requests, the tail of the run). GPU-seconds are
engine seconds times the GPUs an engine holds (vLLM: tensor_parallel_size; hf: num_gpus). An
engine holds its GPUs while alive, so the GPU cost is charged on alive time.

Passes overlap in the streaming scheduler, so an engine's generating seconds are split among passes
in proportion to the seconds their requests spent in it (request-seconds); loading and idle belong
to the run, and a pass's share of the GPU cost follows its share of generating time. API backends
(http) are priced per token instead, exactly per pass.
"""

from __future__ import annotations

import math
from typing import Iterable

from ctxforge.generation.stats import PassStats


def api_cost(prompt: int, completion: int, cost) -> float:
    """USD of `prompt` and `completion` tokens at the prices of `cost` (a CostConfig: USD per million tokens)."""
    return prompt / 1e6 * cost.prompt_usd_per_mtok + completion / 1e6 * cost.completion_usd_per_mtok


def engine_totals(records: Iterable[dict], gpus_per_engine: float) -> dict:
    """Sums over engines (each record: alive_s, load_s, busy_s, requests, request_s, lost)."""
    records = list(records)
    alive = sum(r["alive_s"] for r in records)
    load = sum(min(r["load_s"], r["alive_s"]) for r in records)
    busy = sum(r["busy_s"] for r in records)
    return {
        "engines": len(records),
        "loads": len(records),              # an engine loads once, when its actor starts
        "lost": sum(1 for r in records if r.get("lost")),
        "gpus_per_engine": gpus_per_engine,
        "alive_s": round(alive, 2),
        "load_s": round(load, 2),
        "generating_s": round(busy, 2),
        "idle_s": round(max(0.0, alive - load - busy), 2),
        "busy_fraction": round(busy / alive, 4) if alive else 0.0,
        "requests": sum(r.get("requests", 0) for r in records),
        "request_s": round(sum(r.get("request_s", 0.0) for r in records), 2),
        "gpu_hours": round(alive * gpus_per_engine / 3600, 4),
    }


def accounting(passes: dict[str, PassStats], records: list[dict], gpus_per_engine: float, cost,
               counts: dict[str, int] | None = None) -> dict:
    """The manifest's `accounting` section: per pass, total, engines, measured rates, cost.

    `records`: engine snapshots (EngineMeter); `cost`: a CostConfig (gpu_hour_usd, *_usd_per_mtok);
    `counts`: the pool's loads, load_failures, deaths and replacements (EnginePool.counts), which
    replace the loads counted from the records (an engine that never loaded has no record)."""
    totals = {**engine_totals(records, gpus_per_engine), **(counts or {})}
    price = cost.gpu_hour_usd
    gpu_cost = totals["gpu_hours"] * price
    all_request_s = sum(s.request_s for s in passes.values())
    by_pass = {}
    for name, s in passes.items():
        share = (s.request_s / all_request_s) if all_request_s else 0.0
        generating = totals["generating_s"] * share
        by_pass[name] = {
            "requests": s.requests, "sent": s.sent, "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens, "request_s": round(s.request_s, 2),
            "engine_generating_s": round(generating, 2),
            "gpu_generating_hours": round(generating * gpus_per_engine / 3600, 4),
            "cost_usd": round(gpu_cost * share + api_cost(s.prompt_tokens, s.completion_tokens, cost), 4),
        }
    prompt = sum(s.prompt_tokens for s in passes.values())
    completion = sum(s.completion_tokens for s in passes.values())
    spent_api = api_cost(prompt, completion, cost)
    return {
        "by_pass": by_pass,
        "total": {
            "requests": sum(s.requests for s in passes.values()), "sent": sum(s.sent for s in passes.values()),
            "prompt_tokens": prompt, "completion_tokens": completion,
            "engine_alive_s": totals["alive_s"], "engine_load_s": totals["load_s"],
            "engine_generating_s": totals["generating_s"], "engine_idle_s": totals["idle_s"],
            "gpu_hours": totals["gpu_hours"],
            "gpu_hours_loading": round(totals["load_s"] * gpus_per_engine / 3600, 4),
            "gpu_hours_generating": round(totals["generating_s"] * gpus_per_engine / 3600, 4),
            "gpu_hours_idle": round(totals["idle_s"] * gpus_per_engine / 3600, 4),
            "cost_usd": round(gpu_cost + spent_api, 4),
        },
        "engines": totals,
        "measured": {
            # what cost.engine_tokens_per_s and cost.engine_load_s of the projection should be set to
            "tokens_per_engine_busy_s": round((prompt + completion) / totals["generating_s"], 1)
            if totals["generating_s"] else 0.0,
            "load_s_per_engine": round(totals["load_s"] / totals["engines"], 2) if totals["engines"] else 0.0,
        },
        "prices": cost.model_dump(),
    }
