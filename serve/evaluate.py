"""Evaluation orchestration: for each model, reach (or start) its endpoint, build RULER / InfiniteBench
requests with its tokenizer, send them through the caching client, and aggregate scores.

A model whose `base_url` is null is served here with Ray Serve (one at a time, deleted afterwards);
otherwise the endpoint is used as is. The endpoint's window comes from /v1/models (`max_model_len`,
which both our CPU deployment and vLLM report) unless set in the config; RULER lengths beyond it are
reported as skipped. Results go to `results.json` + report (report.py); per-request records with
latency go to `<output_dir>/<model>/predictions.jsonl`. This module reads no environment variables:
API keys are passed in by the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path

from ctxforge.serve import infinitebench as ib
from ctxforge.serve import ruler_metrics as rm
from ctxforge.serve.client import EvalClient, EvalItem, Record, ResultCache, list_models
from ctxforge.serve.config import EndpointConfig, EvalConfig, checkpoint_context_length
from ctxforge.serve.ruler_tasks import TASKS, PromptSizer, RulerSources, generate_task

log = logging.getLogger(__name__)
IB_SYSTEM = "You are a helpful assistant"
JUDGE_KEY = "longgen.judge"  # api_keys entry of the long-output quality judge


def ruler_groups(cfg: EvalConfig, window: int, out: dict) -> list[tuple[int, str]]:
    """The (length, task) pairs that can run; skipped tasks and lengths are noted in `out`."""
    rc = cfg.ruler
    sources = RulerSources(rc.haystack, rc.squad_path, rc.hotpotqa_path)
    out["skipped"] = {t: r for t in rc.tasks if (r := sources.skipped(t))}
    out["skipped_lengths"] = {str(n): f"longer than the endpoint's window ({window})" for n in rc.lengths if n > window}
    return [(n, t) for n in rc.lengths if n <= window for t in rc.tasks if t not in out["skipped"]]


def ruler_items(cfg: EvalConfig, tokenizer, length: int, task: str) -> list[EvalItem]:
    """One (length, task) group of RULER requests: the prompt + answer prefix as a prefilled assistant turn."""
    rc = cfg.ruler
    t0 = time.perf_counter()
    samples = generate_task(task, length, rc.num_samples, rc.seed, PromptSizer(tokenizer),
                            RulerSources(rc.haystack, rc.squad_path, rc.hotpotqa_path), rc.depths)
    log.info("RULER %s @ %d: %d samples built in %.1fs", task, length, len(samples), time.perf_counter() - t0)
    items = []
    for s in samples:
        body = {"messages": [{"role": "user", "content": s.input}, {"role": "assistant", "content": s.answer_prefix}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": s.tokens_to_generate, "temperature": cfg.client.temperature, "top_p": cfg.client.top_p}
        meta = {"benchmark": "ruler", "task": task, "length": length, "index": s.index, "outputs": s.outputs,
                "depths": s.depths, "prompt_tokens": s.prompt_tokens}
        items.append(EvalItem(body, meta, lambda pred, t=task, g=s.outputs: rm.score_sample(t, pred, g)))
    return items


async def run_ruler(cfg: EvalConfig, client: EvalClient, tokenizer, window: int, out: dict) -> list[Record]:
    """Build and send RULER group by group; the next group is built (a CPU thread: tokenizing up to 1M-token
    prompts) while the current one is being answered, and only two groups of prompts are held at a time."""
    groups = ruler_groups(cfg, window, out)
    records: list[Record] = []
    if not groups:
        return records
    building = asyncio.create_task(asyncio.to_thread(ruler_items, cfg, tokenizer, *groups[0]))
    for i in range(len(groups)):
        items = await building
        if i + 1 < len(groups):
            building = asyncio.create_task(asyncio.to_thread(ruler_items, cfg, tokenizer, *groups[i + 1]))
        records += await client.run(items)
    return records


def infinitebench_items(cfg: EvalConfig, tokenizer, window: int, out: dict) -> list[EvalItem]:
    ic = cfg.infinitebench
    items = []
    out["skipped"] = {}
    for task in ic.tasks:
        path = Path(ic.data_dir) / f"{task}.jsonl"
        if not path.is_file():
            out["skipped"][task] = f"{path} not found"
            continue
        gen = ib.generation_tokens(task, window)
        budget = ic.max_length or ib.prompt_budget(tokenizer, window, gen)
        for ex in ib.load_task(path, task, ic.num_samples):
            prompt = ib.truncate_middle(ib.build_prompt(task, ex), tokenizer, budget)
            system = [] if task == "math_calc" else [{"role": "system", "content": IB_SYSTEM}]
            body = {"messages": system + [{"role": "user", "content": prompt}], "max_tokens": gen,
                    "temperature": cfg.client.temperature, "top_p": cfg.client.top_p}
            meta = {"benchmark": "infinitebench", "task": task, "id": ex["id"]}
            items.append(EvalItem(body, meta, lambda pred, t=task, e=ex: ib.score(t, pred, e)))
    return items


def summarize_ruler(records: list[Record], out: dict) -> None:
    by: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        by.setdefault((r.meta["task"], r.meta["length"]), []).append(r)
    tasks: dict[str, dict] = {}
    scores: dict[str, dict[int, float]] = {}
    for (task, length), recs in sorted(by.items()):
        ok = [r for r in recs if r.error is None]
        entry = {"n": len(ok), "errors": len(recs) - len(ok), "metric": rm.metric_name(task)}
        if ok:
            entry["score"] = sum(r.score for r in ok) / len(ok)
            scores.setdefault(task, {})[length] = entry["score"]
        tasks.setdefault(task, {})[str(length)] = entry
    agg = rm.aggregate(scores)
    out.update(tasks={t: tasks[t] for t in TASKS if t in tasks}, label=agg["label"], complete=agg["complete"],
               per_length={str(k): v for k, v in agg["per_length"].items()}, average=agg["average"])
    out["niah_depth"] = [{"task": r.meta["task"], "length": r.meta["length"], "depth": d, "score": r.score}
                         for r in records if r.error is None and r.meta["task"].startswith("niah")
                         for d in r.meta["depths"][:1] if len(r.meta["depths"]) == 1]


def summarize_infinitebench(records: list[Record], out: dict) -> None:
    tasks = {}
    for task in ib.TASK_ORDER:
        recs = [r for r in records if r.meta["task"] == task]
        if not recs:
            continue
        ok = [r for r in recs if r.error is None]
        tasks[task] = {"n": len(ok), "errors": len(recs) - len(ok), "metric": ib.METRIC[task],
                       "score": sum(r.score for r in ok) / len(ok) if ok else None}
    vals = [t["score"] for t in tasks.values() if t["score"] is not None]
    out.update(tasks=tasks, average=sum(vals) / len(vals) if vals else None)


def _latency(records: list[Record]) -> dict:
    lat = sorted(r.latency_s for r in records if r.latency_s is not None and not r.cached)
    if not lat:
        return {"count": 0}
    return {"count": len(lat), "median_s": statistics.median(lat), "mean_s": statistics.fmean(lat),
            "p90_s": lat[min(len(lat) - 1, int(0.9 * len(lat)))], "max_s": lat[-1]}


async def _evaluate_endpoint(cfg: EvalConfig, entry: EndpointConfig, base_url: str, api_key: str | None,
                             cache: ResultCache, judge_api_key: str | None = None) -> dict:
    from ctxforge.models import load_tokenizer, resolve_model_path

    cards = await list_models(base_url, api_key)
    card = next((c for c in cards if c["id"] == entry.served_model_name), cards[0]) if cards else None
    if card is None:
        raise RuntimeError(f"models.{entry.name}: {base_url}/models lists no model")
    model_id = entry.served_model_name or card["id"]
    window = entry.max_model_len or card.get("max_model_len") or checkpoint_context_length(resolve_model_path(entry.model))
    tokenizer = load_tokenizer(entry.tokenizer or entry.model)
    client = EvalClient(base_url, model_id, entry.name, cfg.client, api_key, cache)
    result = {"endpoint": base_url, "model_id": model_id, "max_model_len": window}
    records: list[Record] = []
    if cfg.ruler.enabled:
        ruler: dict = {}
        recs = await run_ruler(cfg, client, tokenizer, window, ruler)
        summarize_ruler(recs, ruler)
        result["ruler"] = ruler
        records += recs
    if cfg.infinitebench.enabled:
        inf: dict = {}
        recs = await client.run(infinitebench_items(cfg, tokenizer, window, inf))
        summarize_infinitebench(recs, inf)
        result["infinitebench"] = inf
        records += recs
    if cfg.longgen.enabled:
        from ctxforge.lengthen.longgen import run_longgen
        longgen: dict = {}
        records += await run_longgen(cfg.longgen, client, tokenizer, window, longgen, cache, cfg.client, judge_api_key)
        result["longgen"] = longgen
    result["latency"] = _latency(records)
    result["requests"] = {"total": len(records), "cached": sum(r.cached for r in records),
                          "errors": sum(r.error is not None for r in records)}
    pred_dir = Path(cfg.output_dir) / entry.name
    pred_dir.mkdir(parents=True, exist_ok=True)
    with open(pred_dir / "predictions.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    return result


def evaluate(cfg: EvalConfig, api_keys: dict[str, str | None] | None = None, config_label: str = "") -> dict:
    """Evaluate every model in `cfg`, write the report, return the results dict."""
    from ctxforge.serve.report import write_report

    api_keys = api_keys or {}
    judge_key = api_keys.get(JUDGE_KEY)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = ResultCache(out_dir / "cache.sqlite")
    results = {"config": cfg.model_dump(mode="json"), "config_label": config_label,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}
    try:
        for entry in cfg.models:
            t0 = time.perf_counter()
            if entry.base_url:
                res = asyncio.run(_evaluate_endpoint(cfg, entry, entry.base_url, api_keys.get(entry.name), cache,
                                                     judge_key))
            else:
                res = _evaluate_served_here(cfg, entry, cache, judge_key)
            res["wall_s"] = time.perf_counter() - t0
            results["models"][entry.name] = res
            log.info("model %s done in %.1fs", entry.name, res["wall_s"])
    finally:
        cache.close()
    results["references"] = [r.model_dump() for r in cfg.references]
    write_report(results, out_dir)
    return results


def _evaluate_served_here(cfg: EvalConfig, entry: EndpointConfig, cache: ResultCache,
                          judge_api_key: str | None = None) -> dict:
    from ray import serve

    from ctxforge.raycluster import init_ray
    from ctxforge.serve.app import run_app

    init_ray(num_cpus=cfg.ray_num_cpus or None, progress=False)
    serve_cfg = cfg.serve.model_copy(update={"model": entry.model, "app_name": f"eval-{entry.name}",
                                             "served_model_name": entry.served_model_name})
    base_url = run_app(serve_cfg, api_key=None)
    try:
        return asyncio.run(_evaluate_endpoint(cfg, entry, base_url, None, cache, judge_api_key))
    finally:
        serve.delete(serve_cfg.app_name)
