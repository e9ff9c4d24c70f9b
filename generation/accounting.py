"""Where synthesis spends engine time and money, per pass and in total; and the projection before a run.

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

from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import PROMPT_OVERHEAD_TOKENS
from ctxforge.generation.validation import PassStats

CHARS_PER_TOKEN = 4.0   # for the projection's completion sizes from the schemas' character bounds


def _api_cost(prompt: int, completion: int, cfg: SynthConfig) -> float:
    c = cfg.cost
    return prompt / 1e6 * c.prompt_usd_per_mtok + completion / 1e6 * c.completion_usd_per_mtok


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


def accounting(passes: dict[str, PassStats], records: list[dict], gpus_per_engine: float, cfg: SynthConfig) -> dict:
    """The manifest's `accounting` section: per pass, total, engines, measured rates, cost."""
    totals = engine_totals(records, gpus_per_engine)
    price = cfg.cost.gpu_hour_usd
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
            "cost_usd": round(gpu_cost * share + _api_cost(s.prompt_tokens, s.completion_tokens, cfg), 4),
        }
    prompt = sum(s.prompt_tokens for s in passes.values())
    completion = sum(s.completion_tokens for s in passes.values())
    api_cost = _api_cost(prompt, completion, cfg)
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
            "cost_usd": round(gpu_cost + api_cost, 4),
        },
        "engines": totals,
        "measured": {
            # what cost.engine_tokens_per_s and cost.engine_load_s of the projection should be set to
            "tokens_per_engine_busy_s": round((prompt + completion) / totals["generating_s"], 1)
            if totals["generating_s"] else 0.0,
            "load_s_per_engine": round(totals["load_s"] / totals["engines"], 2) if totals["engines"] else 0.0,
        },
        "prices": cfg.cost.model_dump(),
    }


def projection(cfg: SynthConfig, doc_tokens: list[int], gpus_per_engine: float, max_engines: int) -> dict:
    """Before the run: requests and tokens per pass from the documents' sizes, and what they cost.

    Prompt tokens: each request's evidence (chunk, section or summaries) + PROMPT_OVERHEAD_TOKENS.
    Completion tokens: the schema's character bounds / 4, capped by the pass's max_tokens (an upper
    estimate). Engine time: tokens / cost.engine_tokens_per_s, plus cost.engine_load_s per engine.
    """
    ch, qa, gen, lim = cfg.chunking, cfg.qa, cfg.generator, cfg.limits
    small = ch.small_tokens
    summary_out = min(gen.summary_max_tokens, math.ceil(lim.summary_chars / CHARS_PER_TOKEN) + 8)
    qa_out = min(gen.qa_max_tokens, math.ceil((lim.question_chars + lim.answer_chars + lim.quote_chars) / CHARS_PER_TOKEN) + 16)
    n_follow = math.floor(qa.hierarchical_per_document * qa.followup_ratio)
    n_base = qa.hierarchical_per_document - n_follow + qa.diverse_per_document
    rows = {name: [0, 0, 0] for name in ("summary_small", "summary_section", "summary_global", "qa", "followup")}

    def add(name: str, n: int, prompt: int, out: int) -> None:
        rows[name][0] += n
        rows[name][1] += n * (prompt + PROMPT_OVERHEAD_TOKENS)
        rows[name][2] += n * out

    for n_tokens in doc_tokens:
        chunks = max(1, math.ceil(n_tokens / small))
        sections = max(1, math.ceil(chunks / ch.smalls_per_medium))
        add("summary_small", chunks, min(n_tokens, small), summary_out)
        if chunks > 1:
            add("summary_section", sections, min(n_tokens, small * ch.smalls_per_medium), summary_out)
        if sections > 1:
            add("summary_global", 1, sections * summary_out, summary_out)
        add("qa", n_base, min(n_tokens, small) + summary_out, qa_out)
        add("followup", n_follow, min(n_tokens, small) + qa_out, qa_out)
    by_pass = {name: {"requests": r, "prompt_tokens": p, "completion_tokens": c} for name, (r, p, c) in rows.items()}
    prompt = sum(r[1] for r in rows.values())
    completion = sum(r[2] for r in rows.values())
    out = {"documents": len(doc_tokens), "document_tokens": sum(doc_tokens), "gpus_per_engine": gpus_per_engine,
           "by_pass": by_pass,
           "requests": sum(r[0] for r in rows.values()), "prompt_tokens": prompt, "completion_tokens": completion,
           "api_cost_usd": round(_api_cost(prompt, completion, cfg), 2)}
    tps = cfg.cost.engine_tokens_per_s
    if tps > 0:
        engine_s = (prompt + completion) / tps + max_engines * cfg.cost.engine_load_s
        out["engine_hours"] = round(engine_s / 3600, 2)
        out["gpu_hours"] = round(engine_s * gpus_per_engine / 3600, 2)
        out["gpu_cost_usd"] = round(out["gpu_hours"] * cfg.cost.gpu_hour_usd, 2)
    return out


def projection_line(p: dict) -> str:
    line = (f"projection for {p['documents']} documents ({p['document_tokens']:,} tokens): {p['requests']:,} requests, "
            f"{p['prompt_tokens']:,} prompt + {p['completion_tokens']:,} completion tokens")
    if "gpu_hours" in p:
        line += f", {p['engine_hours']:,} engine-hours = {p['gpu_hours']:,} GPU-hours (${p['gpu_cost_usd']:,})"
    if p["api_cost_usd"]:
        line += f", API ${p['api_cost_usd']:,}"
    if "gpu_hours" not in p and p["gpus_per_engine"]:
        line += " (set cost.engine_tokens_per_s to project GPU-hours)"
    return line
