"""LongBench-Chat (Bai et al. 2024, LongAlign): long-context questions from real users, each answer rated
1-10 by an LLM judge against a reference answer, with rated example answers as few-shot guidance.

Data, in LongAlign's published format (the user's files; see the README's data step):
- `longbench_chat.path`: test_cases.json, a JSON list (or JSONL) of {idx (1-based), query, prompt,
  answer}; `prompt` is the long context with the question, `answer` the reference;
- `longbench_chat.few_shots_path`: few_shots.json, per question (in idx order) a list of rated example
  answers {answer, score}.
The model answers `prompt` (middle-truncated to its window, as LongAlign does; sampled at temperature
1.0 with seed 42 and up to 1024 tokens by default, as published). The judge (any OpenAI-compatible
endpoint: `judge.base_url`, `judge.model`, a key from `judge.api_key_env`) gets our rating prompt
(`judge_prompt`; our wording of the published protocol) and ends its reply with the rating as
[[n]]; `parse_rating` takes the last [[...]] and the first number in it, as LongAlign's eval.py
does. With `judge.structured`, the judge instead fills a JSON schema {analysis, rating}. A reply
without a valid rating is asked again (a new seed each attempt), up to `judge.max_attempts`.
Reported: the mean rating over all questions, a question whose answer or rating failed counting 0
(and counted as failed), and a per-question table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ctxforge.config import PreflightError
from ctxforge.serve import infinitebench as ib
from ctxforge.serve.benchmarks import Benchmark, EndpointContext, register
from ctxforge.serve.client import EvalClient, EvalItem, Record

JUDGE_SYSTEM = "You grade answers written by AI assistants, carefully and without bias."

JUDGE_INTRO = """You will grade an AI assistant's answer to a question about a long document. Compare it with the \
reference answer, which is correct. What matters most is whether the answer is right; then whether it actually \
helps the user, stays accurate in every detail, and sticks to what was asked.

Work through these steps:
1. Read the assistant's answer next to the reference answer.
2. Find every mistake in it and judge how much each one damages the answer.
3. Judge how directly and completely it gives the user the information asked for.
4. Check any extra information it adds: lower the grade for anything wrong or beside the point.

Grade on a scale from 1 (worst) to 10 (best), as a whole number. {format_rule}

[Question]
{question}

[Reference answer]
{reference}
[End of reference answer]
"""
TEXT_RULE = 'Finish your reply with the grade in double square brackets, for example "[[6]]".'
JSON_RULE = 'Reply with a JSON object: "analysis" (your reasoning, briefly) and "rating" (the grade).'
EXAMPLE = """
Graded example answer {n}:
[Answer]
{answer}
[End of answer]
Grade: [[{score}]]
"""
TO_GRADE = """
Now grade this answer in the same way:
[Answer]
{answer}
[End of answer]
"""


def judge_prompt(question: str, reference: str, examples: list[dict], answer: str, structured: bool = False) -> str:
    """The judge's user message: instructions, the 1-10 scale, the question and reference, the rated
    examples (few-shot), then the answer to grade."""
    text = JUDGE_INTRO.format(format_rule=JSON_RULE if structured else TEXT_RULE, question=question, reference=reference)
    for n, ex in enumerate(examples, 1):
        text += EXAMPLE.format(n=n, answer=ex["answer"], score=ex["score"])
    return text + TO_GRADE.format(answer=answer)


def rating_schema(analysis_chars: int) -> dict:
    return {"type": "object", "properties": {"analysis": {"type": "string", "maxLength": analysis_chars},
                                             "rating": {"type": "integer", "enum": list(range(1, 11))}},
            "required": ["analysis", "rating"], "additionalProperties": False}


def parse_rating(reply: str, structured: bool = False) -> float | None:
    """The rating in a judge's reply, or None. Text: the last [[...]], the first number in it
    (LongAlign's rule), which must lie in 1..10. Structured: the JSON object's `rating`."""
    if structured:
        try:
            value = json.loads(reply)["rating"]
        except (ValueError, KeyError, TypeError):
            return None
        return float(value) if isinstance(value, (int, float)) and 1 <= value <= 10 else None
    brackets = re.findall(r"\[\[([^\]]+)\]\]", reply or "")
    if not brackets:
        return None
    number = re.search(r"\d+\.\d+|\d+", brackets[-1])
    if number is None:
        return None
    value = float(number.group(0))
    return value if 1 <= value <= 10 else None


def load_cases(path: str, few_shots_path: str, limit: int = 0) -> list[dict]:
    """Questions joined with their rated examples; ValueError naming the file (and line) on bad input."""
    p = Path(path).expanduser()
    text = p.read_text(encoding="utf-8")
    try:
        cases = json.loads(text)
        if isinstance(cases, dict):
            cases = [cases]
    except ValueError:
        cases = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    cases.append(json.loads(line))
                except ValueError as exc:
                    raise ValueError(f"longbench_chat.path {path}:{lineno}: not JSON ({exc})") from None
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"longbench_chat.path {path}: expected a JSON list (or JSONL) of questions")
    for i, case in enumerate(cases):
        missing = [k for k in ("query", "prompt", "answer") if not isinstance(case, dict) or k not in case]
        if missing:
            raise ValueError(f"longbench_chat.path {path}: question {i + 1} lacks {', '.join(missing)}")
        case.setdefault("idx", i + 1)
    try:
        shots = json.loads(Path(few_shots_path).expanduser().read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"longbench_chat.few_shots_path {few_shots_path}: not JSON ({exc})") from None
    for case in cases:
        k = int(case["idx"]) - 1
        if not isinstance(shots, list) or not 0 <= k < len(shots) or \
                not all(isinstance(s, dict) and "answer" in s and "score" in s for s in shots[k]):
            raise ValueError(f"longbench_chat.few_shots_path {few_shots_path}: no rated examples "
                             f"[{{answer, score}}] for question idx {case['idx']}")
        case["few_shots"] = shots[k]
    return cases[:limit] if limit else cases


def check(cfg, api_keys: dict) -> None:
    """Preflight of the longbench_chat section. Raises PreflightError naming the key when a data file is missing
    or malformed, or the judge's endpoint does not serve judge.model."""
    from ctxforge.serve.preflight import check_endpoint

    lc = cfg.longbench_chat
    if not lc.enabled:
        return
    for key in ("path", "few_shots_path"):
        if not Path(getattr(lc, key)).expanduser().is_file():
            raise PreflightError(f"longbench_chat.{key} {getattr(lc, key)!r}: no such file (see the README's data step)")
    try:
        load_cases(lc.path, lc.few_shots_path)
    except (OSError, ValueError) as exc:
        raise PreflightError(str(exc)) from None
    cards = check_endpoint(lc.judge.base_url, api_keys.get("judge"), f"longbench_chat.judge.base_url ({lc.judge.model})")
    served = [c.get("id") for c in cards]
    if lc.judge.model not in served:
        raise PreflightError(f"longbench_chat.judge.model {lc.judge.model!r} is not served at {lc.judge.base_url} "
                             f"(it lists {', '.join(map(str, served[:5]))}{', ...' if len(served) > 5 else ''})")


def _judge_body(lc, case: dict, answer: str, attempt: int) -> dict:
    j = lc.judge
    body = {"messages": [{"role": "system", "content": JUDGE_SYSTEM},
                         {"role": "user", "content": judge_prompt(case["query"], case["answer"], case["few_shots"],
                                                                  answer, j.structured)}],
            "temperature": j.temperature, "max_tokens": j.max_tokens, "seed": attempt}
    if j.structured:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "rating", "schema": rating_schema(j.analysis_chars), "strict": True}}
    return body


async def run_longbench_chat(ctx: EndpointContext) -> tuple[dict, list[Record]]:
    lc = ctx.cfg.longbench_chat
    cases = load_cases(lc.path, lc.few_shots_path, lc.num_samples)
    gen = min(lc.max_tokens, ctx.window // 2)
    budget = lc.max_length or ib.prompt_budget(ctx.tokenizer, ctx.window, gen)
    items = []
    for case in cases:
        prompt = ib.truncate_middle(case["prompt"], ctx.tokenizer, budget)
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": gen,
                "temperature": lc.temperature, "seed": lc.seed}
        items.append(EvalItem(body, {"benchmark": "longbench_chat", "idx": case["idx"]}, lambda pred: 0.0))
    answers = await ctx.client.run(items)
    j = lc.judge
    judge = EvalClient(j.base_url, j.model, f"judge:{j.model}", ctx.cfg.client.model_copy(update={"concurrency": j.concurrency}),
                       ctx.api_keys.get("judge"), ctx.client.cache)
    ratings: dict[int, tuple[float | None, Record | None]] = {}
    pending = [(c, a) for c, a in zip(cases, answers) if a.error is None]
    for attempt in range(j.max_attempts):
        if not pending:
            break
        items = [EvalItem(_judge_body(lc, c, a.prediction or "", attempt),
                          {"benchmark": "longbench_chat_judge", "idx": c["idx"], "attempt": attempt},
                          lambda reply: parse_rating(reply, j.structured) or 0.0) for c, a in pending]
        replies = await judge.run(items)
        retry = []
        for (c, a), reply in zip(pending, replies):
            rating = None if reply.error else parse_rating(reply.prediction or "", j.structured)
            ratings[c["idx"]] = (rating, reply)
            if rating is None:
                retry.append((c, a))
        pending = retry
    rows, judge_records = [], []
    for case, ans in zip(cases, answers):
        rating, reply = ratings.get(case["idx"], (None, None))
        status = "answer failed" if ans.error else ("ok" if rating is not None else "no rating")
        rows.append({"idx": case["idx"], "query": case["query"], "rating": rating, "status": status,
                     "answer": ans.prediction, "judge_reply": reply.prediction if reply else None})
        if reply is not None:
            judge_records.append(reply)
    scored = [r["rating"] or 0.0 for r in rows]
    out = {"mean": sum(scored) / len(scored) if scored else None, "n": len(rows),
           "failed": sum(r["status"] != "ok" for r in rows), "judge": j.model, "questions": rows}
    # The answers' records carry the question's rating as their score (predictions.jsonl).
    for ans, row in zip(answers, rows):
        ans.score = row["rating"] or 0.0
        if ans.error is None and row["status"] != "ok":
            ans.error = f"judge gave no valid rating in {j.max_attempts} attempts"
    return out, answers


@register
class LongBenchChat(Benchmark):
    key = "longbench_chat"
    title = "LongBench-Chat"

    def preflight(self, cfg, api_keys: dict) -> None:
        check(cfg, api_keys)

    async def run(self, ctx: EndpointContext):
        return await run_longbench_chat(ctx)

    def summary(self, result: dict) -> str:
        if result.get("mean") is None:
            return "LongBench-Chat: no questions"
        fails = f", {result['failed']} failed" if result.get("failed") else ""
        return f"LongBench-Chat mean {result['mean']:.2f}/10 ({result['n']} questions{fails})"

    def markdown(self, results: dict) -> list[str]:
        from ctxforge.serve.report import _fmt, _table, row_label

        models = {n: m for n, m in results["models"].items() if m.get("longbench_chat")}
        if not models:
            return []
        first = next(iter(models.values()))["longbench_chat"]
        lines = ["## LongBench-Chat", "", f"Ratings 1-10 by the judge `{first['judge']}` against the reference "
                 "answers (LongAlign's protocol); a question whose answer or rating failed counts 0.", ""]
        rows = [[row_label(n, m), _fmt(m["longbench_chat"]["mean"]), str(m["longbench_chat"]["n"]),
                 str(m["longbench_chat"]["failed"])] for n, m in models.items()]
        for ref in [r for r in results.get("references", []) if r["benchmark"] == "longbench_chat"]:
            rows.append([f"{ref['name']} (reference)", _fmt(ref["scores"].get("mean")), "", ""])
        lines += _table(["model", "mean rating", "questions", "failed"], rows) + [""]
        idxs = [q["idx"] for q in first["questions"]]
        per = {n: {q["idx"]: q for q in m["longbench_chat"]["questions"]} for n, m in models.items()}
        table = []
        for idx in idxs:
            query = " ".join(str(per[next(iter(per))][idx]["query"]).split())
            table.append([str(idx), (query[:60] + "…") if len(query) > 60 else query]
                         + [_fmt(per[n][idx]["rating"]) if per[n].get(idx, {}).get("status") == "ok"
                            else per[n].get(idx, {}).get("status", "–") for n in models])
        lines += ["### Per question", ""] + _table(["idx", "question"] + list(models), table) + [""]
        return lines
