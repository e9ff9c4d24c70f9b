"""The evaluation report: results.json, report.md (models side by side, each benchmark's section from
the registry, published numbers as reference rows) and PNG plots (matplotlib Agg). RULER's and
InfiniteBench's sections live here: task x length tables with averages and failure counts, a
needle-in-a-haystack depth x length heatmap per model, RULER score vs length per task, and the RULER
average vs length. Scores are printed with two decimals, as RULER prints them (results.json keeps
full precision). A model served with a RoPE override is labelled with it in every row.

Input is the results dict evaluate.py builds; this module computes no scores of its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ctxforge.serve.infinitebench import TASK_ORDER as IB_TASKS
from ctxforge.serve.ruler_tasks import TASKS as RULER_TASKS

DEPTH_BINS = 10


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def row_label(name: str, m: dict) -> str:
    """A model's row name: its config name plus its label (e.g. the zero-shot RoPE override)."""
    return f"{name} [{m['label']}]" if m.get("label") else name


def _cell(entry: dict | None) -> str:
    """A task score, with its failed requests (counted as 0) when there were any."""
    if not entry:
        return "–"
    return _fmt(entry.get("score")) + (f" ({entry['errors']} failed)" if entry.get("errors") else "")


def _len_label(n: int | str) -> str:
    n = int(n)
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def ruler_lengths(results: dict) -> list[int]:
    return sorted({int(n) for m in results["models"].values() for n in (m.get("ruler") or {}).get("per_length", {})})


def markdown(results: dict, sections: list[list[str]]) -> str:
    lines = ["# ctxforge evaluation report", ""]
    if results.get("config_label"):
        lines += [f"Config: `{results['config_label']}` — created {results.get('created', '')}", ""]
    models = results["models"]
    lines += _table(["model", "endpoint", "model id", "window", "requests", "cached", "failed", "median latency (s)"],
                    [[row_label(name, m), m["endpoint"], m["model_id"], str(m["max_model_len"]), str(m["requests"]["total"]),
                      str(m["requests"]["cached"]), str(m["requests"]["errors"]), _fmt(m["latency"].get("median_s"))]
                     for name, m in models.items()]) + [""]
    lines.append("A failed request (after retries) scores 0 in its task's mean and is counted in `failed`.")
    lines.append("")
    for section in sections:
        lines += section
    return "\n".join(lines)


def ruler_markdown(results: dict) -> list[str]:
    models = results["models"]
    lengths = ruler_lengths(results)
    refs = [r for r in results.get("references", []) if r["benchmark"] == "ruler"]
    lines: list[str] = []
    if not lengths:
        return lines
    lines += ["## RULER", "", "Per-length score = unweighted mean over the tasks scored at that length (RULER's "
              "aggregation); Avg. = mean over lengths. Metrics: string_match_all (NIAH, vt, cwe, fwe), "
              "string_match_part (QA).", ""]
    rows = []
    for name, m in models.items():
        r = m.get("ruler") or {}
        rows.append([f"{row_label(name, m)} ({r.get('label', 'RULER')})"]
                    + [_fmt(r.get("per_length", {}).get(str(n))) for n in lengths] + [_fmt(r.get("average"))])
    for ref in refs:
        vals = [ref["scores"].get(str(n)) for n in lengths]
        known = [v for v in vals if v is not None]
        avg = ref["scores"].get("avg", sum(known) / len(known) if len(known) == len(vals) else None)
        rows.append([f"{ref['name']} (reference)"] + [_fmt(v) for v in vals] + [_fmt(avg)])
    lines += _table(["model"] + [_len_label(n) for n in lengths] + ["Avg."], rows) + [""]
    for name, m in models.items():
        r = m.get("ruler")
        if not r:
            continue
        lines += [f"### RULER tasks — {row_label(name, m)}", ""]
        rows = []
        for task in RULER_TASKS:
            per = r["tasks"].get(task)
            if per is None:
                reason = r.get("skipped", {}).get(task)
                if reason:
                    rows.append([task] + ["skipped"] * len(lengths) + [reason])
                continue
            vals = [per.get(str(n), {}).get("score") for n in lengths]
            known = [v for v in vals if v is not None]
            rows.append([task] + [_cell(per.get(str(n))) for n in lengths]
                        + [_fmt(sum(known) / len(known) if known else None)])
        counts = r.get("tasks_per_length", {})
        rows.append(["**mean**"] + [f"{_fmt(r['per_length'].get(str(n)))} ({counts.get(str(n), 0)} tasks)"
                                    if str(n) in r["per_length"] else "–" for n in lengths] + [_fmt(r.get("average"))])
        lines += _table(["task"] + [_len_label(n) for n in lengths] + ["Avg."], rows) + [""]
        for n, why in r.get("skipped_lengths", {}).items():
            lines.append(f"- length {n} skipped: {why}")
        lines.append("")
    return lines


def infinitebench_markdown(results: dict) -> list[str]:
    models = results["models"]
    ib_models = {n: m["infinitebench"] for n, m in models.items() if m.get("infinitebench")}
    if not ib_models:
        return []
    tasks = [t for t in IB_TASKS if any(t in m["tasks"] for m in ib_models.values())]
    lines = ["## InfiniteBench", "", "Scores in %, each task with its own metric; Avg. over the tasks run.", ""]
    rows = [[row_label(name, models[name])] + [_cell(m["tasks"].get(t)) for t in tasks] + [_fmt(m.get("average"))]
            for name, m in ib_models.items()]
    for ref in [r for r in results.get("references", []) if r["benchmark"] == "infinitebench"]:
        rows.append([f"{ref['name']} (reference)"] + [_fmt(ref["scores"].get(t)) for t in tasks] + [_fmt(ref["scores"].get("avg"))])
    lines += _table(["model"] + tasks + ["Avg."], rows) + [""]
    rules = {t: cell["rule"] for m in ib_models.values() for t, cell in m["tasks"].items() if cell.get("rule")}
    if rules:
        lines += ["Scoring rule per task:", ""] + [f"- {t}: {rules[t]}" for t in tasks if t in rules] + [""]
    for name, m in ib_models.items():
        for t, why in m.get("skipped", {}).items():
            lines.append(f"- {name}: {t} skipped: {why}")
    lines.append("")
    return lines


def save_figure(fig, path: Path) -> str:
    """Write a matplotlib figure as a PNG (100 dpi, tight layout), close it, and return the path as text."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def ruler_plots(results: dict, plot_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    lengths = ruler_lengths(results)
    models = {n: m["ruler"] for n, m in results["models"].items() if m.get("ruler")}
    if not lengths or not models:
        return written
    for name, r in models.items():  # depth x length heatmap of single-needle NIAH samples
        grid = [[[] for _ in lengths] for _ in range(DEPTH_BINS)]
        for rec in r.get("niah_depth", []):
            row = min(int(rec["depth"] / 100 * DEPTH_BINS), DEPTH_BINS - 1)
            grid[row][lengths.index(int(rec["length"]))].append(rec["score"])
        data = [[sum(c) / len(c) if c else float("nan") for c in row] for row in grid]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 5))
        im = ax.imshow(data, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [_len_label(n) for n in lengths])
        ax.set_yticks(range(DEPTH_BINS), [f"{int(100 * i / DEPTH_BINS)}–{int(100 * (i + 1) / DEPTH_BINS)}%" for i in range(DEPTH_BINS)])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"Needle in a haystack — {name}")
        fig.colorbar(im, ax=ax, label="score")
        written.append(save_figure(fig, plot_dir / f"niah_heatmap_{name}.png"))
    tasks = [t for t in RULER_TASKS if any(t in r["tasks"] for r in models.values())]
    cols = min(4, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for name, r in models.items():
            per = r["tasks"].get(task, {})
            xs = [n for n in lengths if per.get(str(n), {}).get("score") is not None]
            ax.plot(xs, [per[str(n)]["score"] for n in xs], marker="o", label=name)
        ax.set_title(task)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-5, 105)
        ax.set_xticks(lengths, [_len_label(n) for n in lengths])
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("RULER score vs length, per task")
    written.append(save_figure(fig, plot_dir / "ruler_tasks_vs_length.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in models.items():
        xs = [n for n in lengths if str(n) in r["per_length"]]
        ax.plot(xs, [r["per_length"][str(n)] for n in xs], marker="o",
                label=f"{row_label(name, results['models'][name])} ({r['label']})")
    for ref in [x for x in results.get("references", []) if x["benchmark"] == "ruler"]:
        pts = sorted((int(k), v) for k, v in ref["scores"].items() if k.isdigit())
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="--", marker="x", label=f"{ref['name']} (reference)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-5, 105)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("RULER average")
    ax.legend(fontsize=8)
    ax.set_title("RULER average vs length")
    written.append(save_figure(fig, plot_dir / "ruler_average_vs_length.png"))
    return written


def write_report(results: dict, out_dir: str | Path) -> dict:
    """Write results.json, report.md and plots/*.png under out_dir; returns their paths."""
    from ctxforge.serve.benchmarks import benchmarks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    plots: list[str] = []
    sections = []
    for bench in benchmarks():
        plots += bench.plots(results, out / "plots")
        sections.append(bench.markdown(results))
    results["plots"] = [str(Path(p).relative_to(out)) for p in plots]
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    md = markdown(results, sections)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).relative_to(out)})" for p in plots) + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    return {"results": str(out / "results.json"), "report": str(out / "report.md"), "plots": plots}
