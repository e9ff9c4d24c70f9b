"""lm-evaluation-harness tasks through the endpoint (the `lmeval` section; the lmeval extra).

lm-eval's own `local-completions` model talks to our /v1/completions: log-likelihood requests
(multiple-choice tasks such as MMLU) as batches of token-id prompts with echo + logprobs,
generation tasks with max_tokens and stop strings. Prompts are tokenized with the served model's
tokenizer (a local path, no hub), datasets come from the user's task YAMLs (`include_path`, local
`dataset_path` / `data_files`), and lm-eval's request cache under <output.dir>/<model>/ makes a
rerun resume. He et al. report MMLU beside RULER and InfiniteBench to show that short-task ability is
kept; here any lm-eval task can be, in the same report.

lm-eval runs its own event loop, so it runs in a worker thread. A run that fails (an endpoint that
keeps failing, a task that breaks) is recorded as failed for that model; other benchmarks' results
stay.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.serve import report
from ctxforge.serve.benchmarks import Benchmark, EndpointContext, register
from ctxforge.serve.client import Record

log = logging.getLogger(__name__)


def _task_manager(lc):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(lc.include_path).expanduser()) if lc.include_path else None,
                       include_defaults=lc.builtin_tasks or not lc.include_path)


def run_lmeval(lc, base_url: str, model_id: str, tokenizer_path: str, window: int, api_key: str | None,
               cache_dir: Path) -> dict:
    """lm-eval's simple_evaluate against the endpoint; returns {task: {metric: value}} plus sample counts."""
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    # The header is passed explicitly: lm-eval would otherwise read $OPENAI_API_KEY itself.
    header = {"Authorization": f"Bearer {api_key}"} if api_key else {"Content-Type": "application/json"}
    lm = LocalCompletionsAPI(
        base_url=f"{base_url.rstrip('/')}/completions", model=model_id, tokenizer=tokenizer_path,
        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=lc.concurrency, max_retries=3,
        batch_size=lc.batch_size, max_length=lc.max_length or window, max_gen_toks=lc.max_gen_toks, seed=lc.seed,
        header=header)
    cache_dir.mkdir(parents=True, exist_ok=True)
    limit = None if lc.limit is None else (int(lc.limit) if lc.limit >= 1 else lc.limit)
    out = simple_evaluate(model=lm, tasks=list(lc.tasks), num_fewshot=lc.num_fewshot, limit=limit,
                          task_manager=_task_manager(lc), use_cache=str(cache_dir / "requests"),
                          bootstrap_iters=lc.bootstrap_iters, log_samples=False, random_seed=lc.seed,
                          numpy_random_seed=lc.seed, torch_random_seed=lc.seed, fewshot_random_seed=lc.seed)
    metrics = {}
    for task, values in out["results"].items():
        metrics[task] = {k: float(v) for k, v in values.items()
                         if isinstance(v, (int, float)) and "_stderr" not in k and k != "samples"}
    return {"tasks": metrics, "n_samples": {t: v.get("effective", v.get("original"))
                                            for t, v in (out.get("n-samples") or {}).items()},
            "versions": {t: str(v) for t, v in (out.get("versions") or {}).items()}}


def check(cfg) -> None:
    """Preflight of the lmeval section. Raises PreflightError naming the key when lm-eval is not installed,
    lmeval.tasks is empty or names an unknown task or one whose data cannot load, or include_path is not a
    directory."""
    lc = cfg.lmeval
    if not lc.enabled:
        return
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise PreflightError("lmeval.enabled needs lm-evaluation-harness: pip install 'ctxforge[lmeval]'")
    if not lc.tasks:
        raise PreflightError("lmeval.tasks is empty: name the lm-eval tasks to run, e.g. lmeval.tasks=[mmlu]")
    if lc.include_path and not Path(lc.include_path).expanduser().is_dir():
        raise PreflightError(f"lmeval.include_path {lc.include_path!r}: no such directory")
    from lm_eval.tasks import get_task_dict

    manager = _task_manager(lc)
    unknown = [t for t in lc.tasks if not manager.match_tasks([t])]
    if unknown:
        raise PreflightError(f"lmeval.tasks: unknown task(s) {unknown} (not in lm-eval's registry"
                             f"{' nor in ' + lc.include_path if lc.include_path else ''})")
    try:  # builds every task, which loads its dataset: a missing data file is found here, not mid-run
        get_task_dict(list(lc.tasks), manager)
    except Exception as exc:
        raise PreflightError(f"lmeval.tasks: a task cannot load its data ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]})") from None


@register
class LmEval(Benchmark):
    key = "lmeval"
    title = "lm-evaluation-harness"

    def preflight(self, cfg, api_keys: dict) -> None:
        check(cfg)

    async def run(self, ctx: EndpointContext):
        lc = ctx.cfg.lmeval
        try:
            out = await asyncio.to_thread(run_lmeval, lc, ctx.base_url, ctx.model_id, ctx.tokenizer_path, ctx.window,
                                          ctx.api_key, ctx.out_dir / "lmeval")
            return out, []
        except Exception as exc:  # recorded for this model; the other benchmarks' results stay
            log.exception("lm-eval failed for %s", ctx.entry.name)
            msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            return {"tasks": {}, "error": msg}, [Record("lmeval", {"benchmark": "lmeval"}, None, None, error=msg)]

    def summary(self, result: dict) -> str:
        if result.get("error"):
            return f"lm-eval failed ({result['error'][:80]})"
        return "lm-eval " + ", ".join(f"{t} {_main(m)}" for t, m in result["tasks"].items())

    def markdown(self, results: dict) -> list[str]:
        from ctxforge.serve.report import _fmt, _table, row_label

        models = {n: m for n, m in results["models"].items() if m.get("lmeval")}
        if not models:
            return []
        rows_keys = sorted({(t, k) for m in models.values() for t, ms in m["lmeval"]["tasks"].items() for k in ms})
        lines = ["## lm-evaluation-harness", "", "lm-eval's metrics x 100 (acc, exact_match, ...), through the "
                 "endpoint's /v1/completions; `metric,filter` as lm-eval names them.", ""]
        header = ["task", "metric"] + [row_label(n, m) for n, m in models.items()]
        rows = [[t, k] + [_fmt(100 * v) if (v := m["lmeval"]["tasks"].get(t, {}).get(k)) is not None else "–"
                          for m in models.values()] for t, k in rows_keys]
        for ref in [r for r in results.get("references", []) if r["benchmark"] == "lmeval"]:
            lines.append(f"- reference {ref['name']}: " + ", ".join(f"{k} {v:.2f}" for k, v in ref["scores"].items()))
        lines += _table(header, rows) + [""]
        for n, m in models.items():
            if m["lmeval"].get("error"):
                lines.append(f"- {n}: lm-eval failed: {m['lmeval']['error']}")
        lines.append("")
        return lines

    def plots(self, results: dict, plot_dir: Path) -> list[str]:
        import matplotlib.pyplot as plt

        models = {n: m["lmeval"]["tasks"] for n, m in results["models"].items() if m.get("lmeval", {}).get("tasks")}
        if not models:
            return []
        bars = sorted({(t, k) for tasks in models.values() for t, ms in tasks.items() for k in ms})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(bars) * len(models)), 4))
        width = 0.8 / len(models)
        for j, (name, tasks) in enumerate(models.items()):
            ax.bar([i + j * width for i in range(len(bars))], [100 * tasks.get(t, {}).get(k, 0.0) for t, k in bars],
                   width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bars))], [f"{t}\n{k}" for t, k in bars], fontsize=7)
        ax.set_ylabel("score x 100")
        ax.set_title("lm-evaluation-harness")
        ax.legend(fontsize=8)
        plot_dir.mkdir(parents=True, exist_ok=True)
        return [report.save_figure(fig, plot_dir / "lmeval.png")]


def _main(metrics: dict) -> str:
    """The first metric of a task, for the one-line summary."""
    for key, value in metrics.items():
        return f"{key} {100 * value:.2f}"
    return "–"
