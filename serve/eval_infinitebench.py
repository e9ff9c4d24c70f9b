"""InfiniteBench as an evaluation benchmark: the user's JSONL files, prompts middle-truncated to the
endpoint's window, scored with the official rules (infinitebench.py); failed requests count 0."""

from __future__ import annotations

from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.serve import infinitebench as ib
from ctxforge.serve import report
from ctxforge.serve.benchmarks import Benchmark, EndpointContext, mean_with_failures, register
from ctxforge.serve.client import EvalItem

IB_SYSTEM = "You are a helpful assistant"


def infinitebench_items(cfg, tokenizer, window: int, out: dict) -> list[EvalItem]:
    ic = cfg.infinitebench
    items = []
    out["skipped"] = {}
    for task in ic.tasks:
        path = Path(ic.data_dir).expanduser() / f"{task}.jsonl"
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


def summarize(records, out: dict) -> None:
    tasks = {}
    for task in ib.TASK_ORDER:
        recs = [r for r in records if r.meta["task"] == task]
        if recs:
            tasks[task] = dict(mean_with_failures(recs), metric=ib.METRIC[task], rule=ib.SCORING_RULE[task])
    vals = [t["score"] for t in tasks.values()]
    out.update(tasks=tasks, average=sum(vals) / len(vals) if vals else None,
               errors=sum(r.error is not None for r in records))


def check_files(cfg) -> None:
    """data_dir exists; every task file present parses; a task named explicitly must have its file.

    Raises PreflightError naming the key when data_dir is missing, a listed task's file is absent or malformed, or
    none of the task files is there.
    """
    ic = cfg.infinitebench
    if not ic.enabled:
        return
    root = Path(ic.data_dir).expanduser()
    if not root.is_dir():
        raise PreflightError(f"infinitebench.data_dir {ic.data_dir!r}: no such directory (see the README's data step)")
    explicit = "tasks" in ic.model_fields_set
    found = 0
    for task in ic.tasks:
        path = root / f"{task}.jsonl"
        if not path.is_file():
            if explicit:
                raise PreflightError(f"infinitebench.tasks: {task} is listed but {path} does not exist")
            continue
        try:
            ib.load_task(path, task, limit=1)
        except (OSError, ValueError) as exc:
            raise PreflightError(f"infinitebench.data_dir: {exc}") from None
        found += 1
    if not found:
        raise PreflightError(f"infinitebench.data_dir {ic.data_dir!r}: none of the task files ({', '.join(t + '.jsonl' for t in ic.tasks)}) is there")


@register
class InfiniteBench(Benchmark):
    key = "infinitebench"
    title = "InfiniteBench"

    def preflight(self, cfg, api_keys: dict) -> None:
        check_files(cfg)

    async def run(self, ctx: EndpointContext):
        out: dict = {}
        records = await ctx.client.run(infinitebench_items(ctx.cfg, ctx.tokenizer, ctx.window, out))
        summarize(records, out)
        return out, records

    def summary(self, result: dict) -> str:
        if result.get("average") is None:
            return "InfiniteBench: no scores"
        fails = f", {result['errors']} failed" if result.get("errors") else ""
        return f"InfiniteBench avg {result['average']:.2f}{fails}"

    def markdown(self, results: dict) -> list[str]:
        return report.infinitebench_markdown(results)
