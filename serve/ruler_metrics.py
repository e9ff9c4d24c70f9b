"""RULER's scoring, as published (scripts/eval/synthetic/constants.py and evaluate.py).

- post-processing: strip the prediction and turn control characters (\\x00-\\x1f) into newlines;
- `string_match_all` (NIAH, vt, cwe, fwe): per sample, the fraction of golds found as case-insensitive
  substrings of the prediction; mean x 100;
- `string_match_part` (qa_1, qa_2): 1 if any gold is a case-insensitive substring, else 0; mean x 100
  (upstream RULER; lm-eval's port gives partial credit here instead, which is not what we report);
- a task's score at a length is the mean over its samples, a failed request counting 0 (as RULER's
  evaluate.py scores an empty prediction); failures are counted and reported;
- a length's score is the unweighted mean over the tasks scored at that length; `average` is the mean
  over lengths. When tasks were skipped, the mean is over the tasks scored, and the label says so.
"""

from __future__ import annotations

import re

from ctxforge.serve.ruler_tasks import TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    return _CONTROL.sub("\n", pred.strip())


def match_all(pred: str, golds: list[str]) -> float:
    """One sample's string_match_all score in [0, 1]: the share of golds found in the prediction, case-blind
    (RULER's scripts/eval/synthetic/constants.py, `string_match_all`, per sample)."""
    p = postprocess(pred).lower()
    return sum(1.0 for g in golds if g.lower() in p) / len(golds)


def match_part(pred: str, golds: list[str]) -> float:
    """One sample's string_match_part score in {0, 1}: whether any gold is in the prediction, case-blind
    (RULER's scripts/eval/synthetic/constants.py, `string_match_part`, per sample)."""
    p = postprocess(pred).lower()
    return max(1.0 if g.lower() in p else 0.0 for g in golds)


def string_match_all(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's string_match_all over a task: the mean of `match_all` x 100."""
    return sum(match_all(p, r) for p, r in zip(preds, refs)) / len(preds) * 100


def string_match_part(preds: list[str], refs: list[list[str]]) -> float:
    """RULER's string_match_part over a task: the mean of `match_part` x 100."""
    return sum(match_part(p, r) for p, r in zip(preds, refs)) / len(preds) * 100


def metric_name(task: str) -> str:
    return "string_match_part" if TASKS[task]["family"] == "qa" else "string_match_all"


def score_sample(task: str, pred: str, golds: list[str]) -> float:
    """A sample's score in [0, 100] under its task's metric (the task score is the mean of these)."""
    return 100.0 * (match_part(pred, golds) if TASKS[task]["family"] == "qa" else match_all(pred, golds))


def aggregate(task_scores: dict[str, dict[int, float]]) -> dict:
    """{task: {length: score}} -> per-length mean over the tasks scored at that length, overall mean over
    lengths, and labels that say how many tasks each mean covers (a length where some task was not
    scored is labelled with its own count, never with the overall one)."""
    lengths = sorted({n for per in task_scores.values() for n in per})
    per_length, tasks_per_length = {}, {}
    for n in lengths:
        vals = [per[n] for per in task_scores.values() if n in per]
        per_length[n] = sum(vals) / len(vals)
        tasks_per_length[n] = len(vals)
    tasks_run = [t for t in TASKS if t in task_scores]
    count = "13 tasks" if len(tasks_run) == len(TASKS) else f"{len(tasks_run)} of {len(TASKS)} tasks"
    uneven = {n: k for n, k in tasks_per_length.items() if k != len(tasks_run)}
    label = f"RULER ({count}" + "".join(f"; {n}: {k} tasks" for n, k in uneven.items()) + ")"
    return {
        "per_length": per_length,
        "tasks_per_length": tasks_per_length,
        "average": sum(per_length.values()) / len(per_length) if per_length else None,
        "tasks": tasks_run,
        "complete": len(tasks_run) == len(TASKS) and not uneven,
        "label": label,
    }
