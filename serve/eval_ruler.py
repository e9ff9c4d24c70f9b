"""RULER as an evaluation benchmark: build each (length, task) group of samples with the endpoint's
tokenizer, send them through the caching client, score and aggregate (failed requests count 0).

The next group is built in a thread (tokenizing up to 1M-token prompts) while the current one is
being answered; only two groups of prompts are held at a time. Lengths above the endpoint's window
are reported as skipped, and so are qa_1 / qa_2 without their data files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.serve import report
from ctxforge.serve import ruler_metrics as rm
from ctxforge.serve.benchmarks import Benchmark, EndpointContext, mean_with_failures, register
from ctxforge.serve.client import EvalItem, Record
from ctxforge.serve.ruler_tasks import TASKS, PromptSizer, RulerSources, generate_task

log = logging.getLogger(__name__)


def _sources(cfg) -> RulerSources:
    rc = cfg.ruler
    return RulerSources(rc.haystack, rc.squad_path, rc.hotpotqa_path)


def ruler_groups(cfg, window: int, out: dict) -> list[tuple[int, str]]:
    """The (length, task) pairs that can run; skipped tasks and lengths are noted in `out`."""
    rc = cfg.ruler
    sources = _sources(cfg)
    out["skipped"] = {t: r for t in rc.tasks if (r := sources.skipped(t))}
    out["skipped_lengths"] = {str(n): f"longer than the endpoint's window ({window})" for n in rc.lengths if n > window}
    return [(n, t) for n in rc.lengths if n <= window for t in rc.tasks if t not in out["skipped"]]


def ruler_items(cfg, tokenizer, length: int, task: str) -> list[EvalItem]:
    """One (length, task) group of RULER requests: the prompt + answer prefix as a prefilled assistant turn."""
    rc = cfg.ruler
    t0 = time.perf_counter()
    samples = generate_task(task, length, rc.num_samples, rc.seed, PromptSizer(tokenizer), _sources(cfg), rc.depths)
    log.debug("RULER %s @ %d: %d samples built in %.1fs", task, length, len(samples), time.perf_counter() - t0)
    items = []
    for s in samples:
        body = {"messages": [{"role": "user", "content": s.input}, {"role": "assistant", "content": s.answer_prefix}],
                "continue_final_message": True, "add_generation_prompt": False,
                "max_tokens": s.tokens_to_generate, "temperature": cfg.client.temperature, "top_p": cfg.client.top_p}
        meta = {"benchmark": "ruler", "task": task, "length": length, "index": s.index, "outputs": s.outputs,
                "depths": s.depths, "prompt_tokens": s.prompt_tokens}
        items.append(EvalItem(body, meta, lambda pred, t=task, g=s.outputs: rm.score_sample(t, pred, g)))
    return items


def summarize(records: list[Record], out: dict) -> None:
    by: dict[tuple[str, int], list[Record]] = {}
    for r in records:
        by.setdefault((r.meta["task"], r.meta["length"]), []).append(r)
    tasks: dict[str, dict] = {}
    scores: dict[str, dict[int, float]] = {}
    for (task, length), recs in sorted(by.items()):
        entry = dict(mean_with_failures(recs), metric=rm.metric_name(task))
        scores.setdefault(task, {})[length] = entry["score"]
        tasks.setdefault(task, {})[str(length)] = entry
    agg = rm.aggregate(scores)
    out.update(tasks={t: tasks[t] for t in TASKS if t in tasks}, label=agg["label"], complete=agg["complete"],
               per_length={str(k): v for k, v in agg["per_length"].items()},
               tasks_per_length={str(k): v for k, v in agg["tasks_per_length"].items()}, average=agg["average"],
               errors=sum(r.error is not None for r in records))
    out["niah_depth"] = [{"task": r.meta["task"], "length": r.meta["length"], "depth": d, "score": r.score or 0.0}
                         for r in records if r.meta["task"].startswith("niah")
                         for d in r.meta["depths"][:1] if len(r.meta["depths"]) == 1]


def check_sources(cfg) -> None:
    """The essay haystack and the QA files, read now: a missing or malformed file is one line naming its key.

    Raises PreflightError naming ruler.haystack, ruler.squad_path or ruler.hotpotqa_path when that file is missing
    or malformed.
    """
    from ctxforge.serve import ruler_data as rd

    rc = cfg.ruler
    if not rc.enabled:
        return
    essay_tasks = [t for t in rc.tasks if TASKS[t].get("haystack") == "essay"]
    if essay_tasks and rc.haystack != "builtin:kjv":
        try:
            rd.essay_words(str(Path(rc.haystack).expanduser()))
        except (OSError, ValueError) as exc:
            raise PreflightError(str(exc)) from None
    for key, reader, task in (("squad_path", rd.read_squad, "qa_1"), ("hotpotqa_path", rd.read_hotpotqa, "qa_2")):
        path = getattr(rc, key)
        if path is None or task not in rc.tasks:
            continue
        if not Path(path).expanduser().is_file():
            raise PreflightError(f"ruler.{key} {path!r}: no such file (see the README's data step)")
        try:
            reader(str(Path(path).expanduser()))
        except ValueError as exc:
            raise PreflightError(str(exc)) from None


@register
class Ruler(Benchmark):
    key = "ruler"
    title = "RULER"

    def preflight(self, cfg, api_keys: dict) -> None:
        check_sources(cfg)

    async def run(self, ctx: EndpointContext):
        out: dict = {}
        groups = ruler_groups(ctx.cfg, ctx.window, out)
        records: list[Record] = []
        if groups:
            building = asyncio.create_task(asyncio.to_thread(ruler_items, ctx.cfg, ctx.tokenizer, *groups[0]))
            for i in range(len(groups)):
                items = await building
                if i + 1 < len(groups):
                    building = asyncio.create_task(asyncio.to_thread(ruler_items, ctx.cfg, ctx.tokenizer, *groups[i + 1]))
                records += await ctx.client.run(items)
        summarize(records, out)
        return out, records

    def summary(self, result: dict) -> str:
        if result.get("average") is None:
            return "RULER: no scores"
        fails = f", {result['errors']} failed" if result.get("errors") else ""
        return f"{result['label']} avg {result['average']:.2f}{fails}"

    def markdown(self, results: dict) -> list[str]:
        return report.ruler_markdown(results)

    def plots(self, results: dict, plot_dir: Path) -> list[str]:
        return report.ruler_plots(results, plot_dir)
