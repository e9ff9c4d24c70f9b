"""Evaluation orchestration: preflight, then for each model reach (or start) its endpoint and run every
enabled benchmark of the registry (benchmarks.py) against it.

A model whose `base_url` is null is served here with Ray Serve, one at a time, under its own
application name and route prefix (`eval-<name>`, so a model already served on the cluster at "/"
keeps running), with its RoPE override, and deleted afterwards; otherwise the endpoint is used as is.
The endpoint's window comes from /v1/models (`max_model_len` from our transformers deployment and
vLLM's own server, `metadata.max_request_context_length` from ray.serve.llm) unless set in the config. Results go to `results.json` + report (report.py); per-request
records with latency go to `<output.dir>/<model>/predictions.jsonl`. This module reads no environment
variables: API keys are passed in by the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import statistics
import time
from pathlib import Path

from ctxforge.serve.benchmarks import EndpointContext, benchmarks
from ctxforge.serve.client import EndpointError, EvalClient, Record, ResultCache, card_window, list_models
from ctxforge.serve.config import checkpoint_context_length, rope_label
from ctxforge.serve.eval_config import EndpointConfig, EvalConfig

log = logging.getLogger(__name__)


def _latency(records: list[Record]) -> dict:
    lat = sorted(r.latency_s for r in records if r.latency_s is not None and not r.cached)
    if not lat:
        return {"count": 0}
    return {"count": len(lat), "median_s": statistics.median(lat), "mean_s": statistics.fmean(lat),
            "p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max_s": lat[-1]}


def endpoint_label(entry: EndpointConfig, window: int) -> str:
    parts = [p for p in (rope_label(entry.rope, window), entry.label) if p]
    return "; ".join(parts)


async def _evaluate_endpoint(cfg: EvalConfig, index: int, entry: EndpointConfig, base_url: str,
                             api_keys: dict, cache: ResultCache) -> dict:
    from ctxforge.models import load_tokenizer, resolve_model_path

    api_key = api_keys.get(entry.name)
    try:
        cards = await list_models(base_url, api_key)
    except EndpointError as exc:
        raise EndpointError(f"models.{index} ({entry.name}): {exc}") from None
    card = next((c for c in cards if c["id"] == entry.served_model_name), cards[0]) if cards else None
    if card is None:
        raise EndpointError(f"models.{index} ({entry.name}): {base_url}/models lists no model")
    model_id = entry.served_model_name or card["id"]
    window = entry.max_model_len or card_window(card) or checkpoint_context_length(
        resolve_model_path(entry.model), entry.rope)
    tokenizer_path = resolve_model_path(entry.tokenizer or entry.model)
    tokenizer = load_tokenizer(tokenizer_path)
    ctx = EndpointContext(cfg, entry, index, base_url, model_id, window, tokenizer, tokenizer_path,
                          EvalClient(base_url, model_id, entry.name, cfg.client, api_key, cache), api_key,
                          Path(cfg.output.dir) / entry.name, api_keys)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    result = {"endpoint": base_url, "model_id": model_id, "max_model_len": window,
              "label": endpoint_label(entry, window)}
    records: list[Record] = []
    for bench in benchmarks():
        if bench.enabled(cfg):
            out, recs = await bench.run(ctx)
            result[bench.key] = out
            records += recs
    result["latency"] = _latency(records)
    result["requests"] = {"total": len(records), "cached": sum(r.cached for r in records),
                          "errors": sum(r.error is not None for r in records)}
    with open(ctx.out_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return result


def evaluate(cfg: EvalConfig, api_keys: dict[str, str | None] | None = None, config_label: str = "") -> dict:
    """Evaluate every model in `cfg`, write the report, return the results dict. Run `preflight(cfg)`
    first (the CLI does): this function assumes the data and endpoints are there."""
    from ctxforge.serve.report import write_report

    api_keys = api_keys or {}
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out_dir / "cache.sqlite")
    results = {"config": cfg.model_dump(mode="json"), "config_label": config_label,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}
    try:
        for index, entry in enumerate(cfg.models):
            t0 = time.perf_counter()
            if entry.base_url:
                res = asyncio.run(_evaluate_endpoint(cfg, index, entry, entry.base_url, api_keys, cache))
            else:
                res = _evaluate_served_here(cfg, index, entry, api_keys, cache)
            res["wall_s"] = time.perf_counter() - t0
            results["models"][entry.name] = res
            log.info("model %s done in %.1fs", entry.name, res["wall_s"])
    finally:
        cache.close()
    results["references"] = [r.model_dump() for r in cfg.references]
    write_report(results, out_dir)
    return results


def served_here_config(cfg: EvalConfig, entry: EndpointConfig):
    """The ServeConfig for a model this evaluation serves: its own app name and route prefix."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", entry.name)
    return cfg.serve.model_copy(update={
        "model": entry.model, "app_name": f"eval-{slug}", "route_prefix": f"/eval-{slug}",
        "served_model_name": entry.served_model_name, "rope": entry.rope,
        "max_model_len": entry.max_model_len or cfg.serve.max_model_len})


def _evaluate_served_here(cfg: EvalConfig, index: int, entry: EndpointConfig, api_keys: dict, cache: ResultCache) -> dict:
    from ray import serve

    from ctxforge.raycluster import init_ray
    from ctxforge.serve.app import run_app

    init_ray(num_cpus=cfg.runtime.num_cpus or None, progress=False)
    serve_cfg = served_here_config(cfg, entry)
    base_url = run_app(serve_cfg, api_key=None)
    try:
        return asyncio.run(_evaluate_endpoint(cfg, index, entry, base_url, {**api_keys, entry.name: None}, cache))
    finally:
        serve.delete(serve_cfg.app_name)
