"""Per-request validation and per-pass statistics, shared by both schedulers; and the pass runner.

`validate(request, text)` is the one check every answer goes through, whichever scheduler ran it:
a failed check is retried with a new seed up to generator.max_attempts, then recorded as failed
with its reason (counted per reason). It runs on every run, over cached raw outputs too (verdicts.py).

`PassRunner` runs one pass as one Ray Data job (runtime.scheduler=passes, the earlier design kept for
comparison): requests whose verdict the cached attempts decide are not sent, the rest go through the
backend's Ray Data transform at the attempt they need; results stream back as Ray Data finishes them,
each is persisted and judged at once; a response that does not validate (or a transport error) is sent
again in the next round (a new job) with the next attempt's seed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import jsonschema
import ray

from ctxforge.generation.cache import Attempt, RequestCache
from ctxforge.pipeline.checks import check_output
from ctxforge.generation.config import GeneratorConfig
from ctxforge.generation.backends.base import GeneratorBackend, batch_rows
from ctxforge.generation.requests import Request, request_row
from ctxforge.generation.verdicts import Verdict, decide

log = logging.getLogger(__name__)


@dataclass
class PassStats:
    requests: int = 0
    cache_hits: int = 0
    sent: int = 0                 # request attempts sent to the backend
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    request_s: float = 0.0        # seconds requests spent in engines, summed (overlapping requests add up)
    lost_resent: int = 0          # attempts sent again because their engine was lost (preemption)
    failures: Counter = field(default_factory=Counter)          # final failures by reason
    attempt_errors: Counter = field(default_factory=Counter)    # every failed attempt by reason

    def merge(self, other: "PassStats") -> None:
        for name in ("requests", "cache_hits", "sent", "ok", "failed", "prompt_tokens", "completion_tokens", "wall_s",
                     "request_s", "lost_resent"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)
        self.attempt_errors.update(other.attempt_errors)

    def count(self, verdict: Verdict) -> None:
        """A decided request: its failed attempts, and its outcome (once per request per run)."""
        for reason in verdict.reasons:
            self.attempt_errors[reason_class(reason)] += 1
        if verdict.obj is not None:
            self.ok += 1
        else:
            self.failed += 1
            self.failures[reason_class(verdict.reason)] += 1

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "cache_hits": self.cache_hits, "sent": self.sent, "ok": self.ok,
            "failed": self.failed, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 2), "request_s": round(self.request_s, 2), "lost_resent": self.lost_resent,
            "failures_by_reason": dict(self.failures),
            "failed_attempts_by_reason": dict(self.attempt_errors),
        }


_VALIDATORS: dict[str, object] = {}


def _validator(schema: dict):
    """One checked validator per schema: jsonschema.validate checks the schema itself on every call, which
    costs ~20 ms, more than the rest of a request's handling in the driver."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        _VALIDATORS[key] = cls(schema)
    return _VALIDATORS[key]


def validate_output(text: str, schema: dict | None) -> tuple[dict | None, str]:
    """(object, "") when text is a JSON object matching schema with non-blank strings, else (None, reason).
    A free-text request (schema None) answers {"text": the stripped text}."""
    if not text or not text.strip():
        return None, "empty_output"
    if schema is None:
        return {"text": text.strip()}, ""
    try:
        # strict=False: xgrammar's bounded strings admit raw control characters (tabs) that strict JSON rejects
        obj = json.loads(text, strict=False)
    except json.JSONDecodeError:
        return None, "invalid_json"
    err = jsonschema.exceptions.best_match(_validator(schema).iter_errors(obj))  # what jsonschema.validate raises
    if err is not None:
        where = ".".join(str(p) for p in err.absolute_path) or "object"
        return None, f"schema_mismatch:{where}:{err.validator}"
    blank = [k for k, v in obj.items() if isinstance(v, str) and not v.strip()]
    if blank:
        return None, f"blank_field:{blank[0]}"
    return {k: v.strip() if isinstance(v, str) else v for k, v in obj.items()}, ""


def validate(request: Request, text: str) -> tuple[dict | None, str]:
    """The check every generated answer goes through: (object, "") when it is usable, else (None, reason).

    First the JSON schema of the request (validate_output), then, when the schema holds, the content
    checks of checks.py (truncation, placeholders, repetition, restated questions...).
    """
    obj, reason = validate_output(text, request.schema)
    if obj is None:
        return None, reason
    reason = check_output(request, obj)
    return (None, reason) if reason else (obj, "")


class PassRunner:
    def __init__(self, backend: GeneratorBackend, cache: RequestCache, gen: GeneratorConfig):
        self.backend = backend
        self.cache = cache
        self.gen = gen
        # engine_id -> {"started_at", "load_s", "busy_s", "requests", "request_s", "ended_at"}: engines that
        # answered (backends run through EngineUDF report themselves in every row)
        self.engines: dict[str, dict] = {}

    def run(self, requests: list[Request], label: str) -> tuple[dict[str, dict], PassStats]:
        """Answers of every finished-ok request (request_id -> object) and the pass's statistics."""
        stats = PassStats(requests=len(requests))
        start = time.time()
        gen = self.gen
        by_id: dict[str, Request] = {}
        for req in requests:
            by_id.setdefault(req.request_id, req)  # identical requests (same content) are asked once
        known = self.cache.attempts(list(by_id))
        answers: dict[str, dict] = {}
        pending: dict[str, int] = {}             # request id -> the attempt to send
        for rid, req in by_id.items():
            verdict = decide(req, known.get(rid, {}), gen.max_attempts, gen.retry_failed)
            if verdict.decided:
                self._decided(rid, verdict, stats, answers)
            else:
                pending[rid] = verdict.next_attempt
        stats.cache_hits = sum(1 for r in requests if r.request_id not in pending)
        if pending:
            log.info("%s: %d requests, %d cached, %d to generate", label, len(requests), stats.cache_hits, len(pending))
        while pending:
            rows = [request_row(by_id[rid], attempt, gen.temperature, gen.top_p, gen.repetition_penalty)
                    for rid, attempt in pending.items()]
            blocks = max(1, min(len(rows) // max(1, gen.batch_size), 200))
            ds = self.backend.apply(ray.data.from_items(rows, override_num_blocks=blocks))
            stats.sent += len(rows)
            sent, pending = pending, {}
            seen: dict[str, dict] = {}
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for row in batch_rows(batch):
                    rid = row["request_id"]
                    req = by_id[rid]
                    stats.prompt_tokens += int(row["prompt_tokens"])
                    stats.completion_tokens += int(row["completion_tokens"])
                    if "engine_id" in row:
                        stats.request_s += float(row["duration_s"])
                        eng = seen.setdefault(row["engine_id"], {"started_at": row["engine_started_at"], "requests": 0,
                                                                 "request_s": 0.0, "load_s": row["engine_load_s"]})
                        eng["busy_s"] = max(eng.get("busy_s", 0.0), float(row["engine_busy_s"]))
                        eng["requests"] += 1
                        eng["request_s"] += float(row["duration_s"])
                    answer = Attempt(str(row["output_text"] or ""), str(row["error"] or ""),
                                     int(row["prompt_tokens"]), int(row["completion_tokens"]), fresh=True)
                    self.cache.put(rid, sent[rid], req.pass_name, req.doc_id, req.key, answer)
                    known.setdefault(rid, {})[sent[rid]] = answer
                    verdict = decide(req, known[rid], gen.max_attempts, gen.retry_failed)
                    if verdict.decided:
                        self._decided(rid, verdict, stats, answers)
                    else:
                        pending[rid] = verdict.next_attempt
                self.cache.commit()  # persisted as they complete: a kill loses at most this batch
            # The job is over: Ray Data releases its actors now, so each engine was alive until here.
            ended = time.time()
            for engine_id, eng in seen.items():
                self.engines[engine_id] = {**eng, "ended_at": ended}
        stats.wall_s = time.time() - start
        return answers, stats

    @staticmethod
    def _decided(rid: str, verdict: Verdict, stats: PassStats, answers: dict[str, dict]) -> None:
        stats.count(verdict)
        if verdict.obj is not None:
            answers[rid] = verdict.obj


def reason_class(reason: str) -> str:
    """Group reasons for counting: schema_mismatch:answer:maxLength -> schema_mismatch:answer."""
    if reason.startswith("schema_mismatch:"):
        return ":".join(reason.split(":")[:2])
    if reason.startswith("backend:"):
        return reason.split(" after ")[0][:80]
    return reason


_reason_class = reason_class  # the earlier name
