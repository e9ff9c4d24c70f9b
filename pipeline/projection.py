"""The projection printed before a synthesis run: requests, tokens, engine time and cost from the documents'
sizes and the config (the accounting after the run is ctxforge.generation.accounting)."""

from __future__ import annotations

import math

from ctxforge.generation.accounting import api_cost
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import PROMPT_OVERHEAD_TOKENS

CHARS_PER_TOKEN = 4.0   # for the projection's completion sizes from the schemas' character bounds


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
           "api_cost_usd": round(api_cost(prompt, completion, cfg.cost), 2)}
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
