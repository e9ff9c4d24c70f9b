"""Run one generation pass: cached requests are skipped, the rest go through the backend on Ray Data.

The same loop serves every backend: results stream back to the driver as Ray Data finishes them,
each is validated against its JSON schema and persisted at once; a response that does not validate
(or a transport error) is sent again in the next round with a new seed, up to
generator.max_attempts, then recorded as failed with its reason.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import jsonschema
import ray

from ctxforge.pipeline.cache import RequestCache
from ctxforge.pipeline.checks import check_output
from ctxforge.pipeline.config import GeneratorConfig
from ctxforge.pipeline.generators.base import GeneratorBackend, batch_rows
from ctxforge.pipeline.requests import Request, request_row

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
    failures: Counter = field(default_factory=Counter)          # final failures by reason
    attempt_errors: Counter = field(default_factory=Counter)    # every failed attempt by reason

    def merge(self, other: "PassStats") -> None:
        for name in ("requests", "cache_hits", "sent", "ok", "failed", "prompt_tokens", "completion_tokens", "wall_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)
        self.attempt_errors.update(other.attempt_errors)

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "cache_hits": self.cache_hits, "sent": self.sent, "ok": self.ok,
            "failed": self.failed, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 2), "failures_by_reason": dict(self.failures),
            "failed_attempts_by_reason": dict(self.attempt_errors),
        }


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
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as err:
        where = ".".join(str(p) for p in err.absolute_path) or "object"
        return None, f"schema_mismatch:{where}:{err.validator}"
    blank = [k for k, v in obj.items() if isinstance(v, str) and not v.strip()]
    if blank:
        return None, f"blank_field:{blank[0]}"
    return {k: v.strip() if isinstance(v, str) else v for k, v in obj.items()}, ""


class PassRunner:
    def __init__(self, backend: GeneratorBackend, cache: RequestCache, gen: GeneratorConfig):
        self.backend = backend
        self.cache = cache
        self.gen = gen

    def run(self, requests: list[Request], label: str) -> tuple[dict[str, dict], PassStats]:
        """Answers of every finished-ok request (request_id -> object) and the pass's statistics."""
        stats = PassStats(requests=len(requests))
        start = time.time()
        by_id: dict[str, Request] = {}
        for req in requests:
            by_id.setdefault(req.request_id, req)  # identical requests (same content) are asked once
        done = self.cache.finished(list(by_id), include_failed=not self.gen.retry_failed)
        stats.cache_hits = sum(1 for r in requests if r.request_id in done)
        answers = {rid: d["output"] for rid, d in done.items() if d["status"] == "ok"}
        pending = [req for rid, req in by_id.items() if rid not in done]
        if pending:
            log.info("%s: %d requests, %d cached, %d to generate", label, len(requests), stats.cache_hits, len(pending))
        attempt = 1
        while pending:
            retry = []
            rows = [request_row(r, attempt, self.gen.temperature, self.gen.top_p) for r in pending]
            blocks = max(1, min(len(rows) // max(1, self.gen.batch_size), 200))
            ds = self.backend.apply(ray.data.from_items(rows, override_num_blocks=blocks))
            stats.sent += len(rows)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for row in batch_rows(batch):
                    req = by_id[row["request_id"]]
                    stats.prompt_tokens += int(row["prompt_tokens"])
                    stats.completion_tokens += int(row["completion_tokens"])
                    if row["error"]:
                        obj, reason = None, f"backend:{row['error']}"
                    else:
                        obj, reason = validate_output(row["output_text"], req.schema)
                        if obj is not None:  # the schema holds: now the content (checks.py)
                            reason = check_output(req, obj)
                            obj = None if reason else obj
                    if obj is not None:
                        answers[req.request_id] = obj
                        stats.ok += 1
                        self._put(req, "ok", obj, "", attempt, row)
                        continue
                    stats.attempt_errors[_reason_class(reason)] += 1
                    if attempt < self.gen.max_attempts:
                        retry.append(req)
                    else:
                        stats.failed += 1
                        stats.failures[_reason_class(reason)] += 1
                        self._put(req, "failed", None, reason, attempt, row)
                self.cache.commit()  # persisted as they complete: a kill loses at most this batch
            pending = retry
            attempt += 1
        stats.wall_s = time.time() - start
        return answers, stats

    def _put(self, req: Request, status: str, obj, error: str, attempt: int, row: dict) -> None:
        self.cache.put(req.request_id, req.pass_name, req.doc_id, req.key, status, obj, error, attempt,
                       int(row["prompt_tokens"]), int(row["completion_tokens"]))


def _reason_class(reason: str) -> str:
    """Group reasons for counting: schema_mismatch:answer:maxLength -> schema_mismatch:answer."""
    if reason.startswith("schema_mismatch:"):
        return ":".join(reason.split(":")[:2])
    if reason.startswith("backend:"):
        return reason.split(" after ")[0][:80]
    return reason
