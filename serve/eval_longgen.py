"""Long-output generation as an evaluation benchmark (section `longgen`): LonGen-style word-count constraints.

Each request is a long-writing instruction plus a constraint with a word-count target (default 2K-8K words):
about N, between A and B (N ± N/4), at least N, at most N. An answer is scored with LonGen's length score
(length_control.length_score: 100 inside the constraint's interval, falling linearly to 0 at half the lower
bound and at 1.5x the upper bound). Optionally a judge on any OpenAI-compatible endpoint rates each answer's
quality (1-10 on seven dimensions, as Self-Lengthen's quality_eval; length is explicitly not judged). The
summary reports the score per constraint type and per target, and the output-length distribution.

Requests go through serve.client.EvalClient (bounded concurrency, retries, the per-sample result cache),
so a rerun resends nothing already answered or judged. Word counts, constraints and the score come from
ctxforge.lengthen (the same rules the Self-Lengthen loop writes its length suffixes with). A failed
request scores 0 and is counted. This module reads no environment variables (the judge's key arrives
in ctx.api_keys["longgen_judge"]).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.lengthen.checks import count_words, length_stats
from ctxforge.lengthen.length_control import TYPES, Constraint, constraint, length_score
from ctxforge.lengthen.prompts import load_instructions
from ctxforge.serve import report
from ctxforge.serve.benchmarks import Benchmark, EndpointContext, mean_with_failures, register
from ctxforge.serve.client import EvalClient, EvalItem

MAX_JUDGED_CHARS = 60000  # longer answers are cut before judging (and marked "cut")
JUDGE_DIMENSIONS = ("relevance", "coherence", "accuracy", "consistency", "clarity", "creativity", "engagement")
JUDGE_PROMPT = (
    "You are a strict judge of writing quality. Rate the response below to a request for a long text on each "
    "dimension from 1 (worst) to 10 (best): relevance (it addresses the request), coherence (logical, easy to "
    "follow), accuracy (facts are correct), consistency (tone and style hold throughout), clarity (precise, "
    "clear language), creativity (original thinking), engagement (holds the reader's interest). Do not judge "
    "whether the length requirement is met.\n\n<request>\n{query}\n</request>\n\n<response>\n{response}\n"
    "</response>\n\nReply with JSON only: {{\"analysis\": \"...\", " +
    ", ".join(f'"{d}": <1-10>' for d in JUDGE_DIMENSIONS) + "}}"
)


def eval_constraint(kind: str, target: int) -> Constraint:
    if kind == "range":
        return constraint("range", target - target // 4, target + target // 4)
    return constraint(kind, target)


def longgen_items(cfg, tokenizer, window: int, out: dict) -> list[EvalItem]:
    """The EvalItems (cfg: the `longgen` section) of every (target, type, sample) cell that fits the window;
    skipped cells noted in `out`."""
    instructions = load_instructions(cfg.instructions, "longgen_instructions.jsonl")
    items, skipped, n = [], {}, 0
    for target in cfg.targets:
        for kind in cfg.types:
            c = eval_constraint(kind, target)
            for j in range(cfg.samples):
                query = f"{instructions[n % len(instructions)]} {c.text}"
                messages = [{"role": "user", "content": query}]
                prompt = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                           return_dict=True)["input_ids"])
                budget = min(math.ceil(1.5 * c.upper * cfg.tokens_per_word), window - prompt)
                if budget < 16:
                    skipped[f"{kind}@{target}"] = f"prompt of {prompt} tokens leaves no room in the window ({window})"
                    continue
                body = {"messages": messages, "max_tokens": budget, "temperature": cfg.temperature,
                        "top_p": cfg.top_p, "seed": cfg.seed + n}
                meta = {"benchmark": "longgen", "type": kind, "target": target, "index": j, "query": query,
                        "constraint": c.to_dict(), "max_tokens": budget}
                items.append(EvalItem(body, meta, lambda pred, c=c: length_score(count_words(pred), c.lower, c.upper)))
                n += 1
    out["skipped"] = skipped
    return items


def parse_judgement(text: str) -> float:
    """Mean of the seven 1-10 dimension scores in a judge's JSON reply; NaN when it has none."""
    match = re.search(r"\{.*\}", text or "", re.S)
    try:
        obj = json.loads(match.group(0)) if match else {}
    except json.JSONDecodeError:
        obj = {}
    obj = {str(k).lower(): v for k, v in obj.items()} if isinstance(obj, dict) else {}
    vals = [float(obj[d]) for d in JUDGE_DIMENSIONS if isinstance(obj.get(d), (int, float)) and 1 <= obj[d] <= 10]
    return sum(vals) / len(vals) if vals else float("nan")


async def judge_records(cfg, records: list, label: str, client_cfg, api_key: str | None, cache) -> dict:
    """Judge (cfg: eval_config.JudgeConfig) every answered record; adds meta['quality'] and returns
    {n, mean, errors, unparsed}."""
    answered = [r for r in records if r.error is None and r.prediction]
    items = []
    for r in answered:
        response = r.prediction[:MAX_JUDGED_CHARS]
        body = {"messages": [{"role": "user", "content": JUDGE_PROMPT.format(query=r.meta["query"], response=response)}],
                "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
        items.append(EvalItem(body, {"benchmark": "longgen-judge", "of": r.key, "cut": len(r.prediction) > len(response)},
                              parse_judgement))
    client_cfg = client_cfg.model_copy(update={"concurrency": cfg.concurrency})
    client = EvalClient(cfg.base_url, cfg.model, f"judge:{cfg.model}:{label}", client_cfg, api_key, cache)
    judged = await client.run(items)
    scores = []
    for r, j in zip(answered, judged):
        r.meta["quality"] = j.score if j.error is None else None
        if j.error is None and j.score is not None and not math.isnan(j.score):
            scores.append(j.score)
    return {"model": cfg.model, "n": len(scores), "mean": sum(scores) / len(scores) if scores else None,
            "errors": sum(j.error is not None for j in judged),
            "unparsed": sum(j.error is None and (j.score is None or math.isnan(j.score)) for j in judged)}


def summarize(records: list, out: dict) -> None:
    """Scores per type / target / overall and the output-length distribution (words) into `out`."""
    ok = [r for r in records if r.error is None]
    out["n"], out["errors"] = len(records), len(records) - len(ok)

    def mean(rs):  # a failed request counts 0 (mean_with_failures)
        return mean_with_failures(rs)["score"]

    out["by_type"] = {t: mean([r for r in records if r.meta["type"] == t]) for t in TYPES
                      if any(r.meta["type"] == t for r in records)}
    targets = sorted({r.meta["target"] for r in records})
    out["by_target"] = {str(n): mean([r for r in records if r.meta["target"] == n]) for n in targets}
    out["score"] = mean(records)
    words = [count_words(r.prediction or "") for r in ok]
    out["words"] = length_stats(words)
    out["words_by_target"] = {str(n): length_stats([count_words(r.prediction or "") for r in ok
                                                    if r.meta["target"] == n]) for n in targets}
    out["word_counts"] = words
    out["budget_bound"] = sum(1 for r in ok if (r.usage or {}).get("completion_tokens", 0) >= r.meta["max_tokens"])




def longgen_markdown(results: dict) -> list[str]:
    """The report section: length score per type and target, quality, and the output-length distribution."""
    models = {n: m["longgen"] for n, m in results["models"].items() if m.get("longgen")}
    if not models:
        return []
    fmt = lambda x: "–" if x is None else f"{x:.1f}"  # noqa: E731
    types = [t for t in TYPES if any(t in m["by_type"] for m in models.values())]
    targets = sorted({int(n) for m in models.values() for n in m["by_target"]})
    lines = ["## Long-output generation (LonGen length score)", "",
             "Score 0-100: 100 inside the constraint's interval (about N: 0.8N-1.2N; range; above N: N-1.5N; below N: "
             "0.5N-N), falling linearly to 0 at half the lower bound and 1.5x the upper bound. Quality: judge's mean "
             "of seven 1-10 dimensions.", ""]
    header = ["model"] + types + [f"{n} words" for n in targets] + ["overall", "quality"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in models.items():
        q = (m.get("quality") or {}).get("mean")
        lines.append("| " + " | ".join([name] + [fmt(m["by_type"].get(t)) for t in types]
                                       + [fmt(m["by_target"].get(str(n))) for n in targets]
                                       + [fmt(m.get("score")), fmt(q)]) + " |")
    lines += ["", "Output length in words:", "", "| model | n | median | p10 | p90 | max | hit token budget |",
              "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        w = m["words"]
        lines.append(f"| {name} | {w.get('n', 0)} | {w.get('median', '–')} | {w.get('p10', '–')} | {w.get('p90', '–')} "
                     f"| {w.get('max', '–')} | {m.get('budget_bound', 0)} |")
    return lines + [""]


def longgen_plots(results: dict, plot_dir: Path) -> list[str]:
    """plots/longgen_lengths.png: the output-length distribution (words) per model, targets marked."""
    models = {n: m["longgen"] for n, m in results["models"].items() if m.get("longgen") and m["longgen"].get("word_counts")}
    if not models:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max(max(m["word_counts"]) for m in models.values()) or 1
    bins = [top * i / 20 for i in range(21)]
    for name, m in models.items():
        ax.hist(m["word_counts"], bins=bins, alpha=0.5, label=f"{name} (median {m['words'].get('median')})")
    for n in sorted({int(t) for m in models.values() for t in m["by_target"]}):
        if n <= top:
            ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("output length (words)")
    ax.set_ylabel("answers")
    ax.set_title("Long-output generation: output length per model (dotted: targets)")
    ax.legend(fontsize=8)
    return [report.save_figure(fig, plot_dir / "longgen_lengths.png")]


@register
class LongGen(Benchmark):
    key = "longgen"
    title = "Long-output generation"

    def preflight(self, cfg, api_keys: dict) -> None:
        """The instructions load and the judge is complete. Raises PreflightError naming longgen.instructions
        when they cannot be read, or longgen.judge.model when a judge URL is set without a model."""
        lg = cfg.longgen
        try:
            load_instructions(lg.instructions, "longgen_instructions.jsonl")
        except ValueError as exc:
            raise PreflightError(f"longgen.instructions: {exc}") from None
        if lg.judge.base_url and not lg.judge.model:
            raise PreflightError("longgen.judge.base_url is set but longgen.judge.model is not")

    async def run(self, ctx: EndpointContext):
        lg, out = ctx.cfg.longgen, {}
        records = await ctx.client.run(longgen_items(lg, ctx.tokenizer, ctx.window, out))
        summarize(records, out)
        if lg.judge.base_url:
            out["quality"] = await judge_records(lg.judge, records, ctx.entry.name, ctx.cfg.client,
                                                 ctx.api_keys.get("longgen_judge"), ctx.client.cache)
        return out, records

    def summary(self, result: dict) -> str:
        if result.get("score") is None:
            return "long-output: no scores"
        quality = (result.get("quality") or {}).get("mean")
        return (f"long-output length score {result['score']:.1f}, median {result['words'].get('median')} words"
                + (f", quality {quality:.1f}" if quality is not None else ""))

    def markdown(self, results: dict) -> list[str]:
        return longgen_markdown(results)

    def plots(self, results: dict, plot_dir: Path) -> list[str]:
        return longgen_plots(results, plot_dir)
