"""A request's verdict, decided on every run by today's rules from its attempts' raw outputs.

The request cache keeps what the backend answered (cache.py), never whether the answer was kept. The
verdict walks attempts 1..generator.max_attempts in order, exactly as the first run did: an attempt is
a transport failure or an output that goes through `validate` (schema, then the client's content check,
for synthesis checks.py under the request's `meta["checks"]`); the first usable one is the answer; a request whose every attempt failed
is failed with its last reason. An attempt that is not cached yet (or, with generator.retry_failed, a
cached transport failure) stops the walk: that attempt is sent next. So checks switched on, a lower
max_attempts or a stricter rule give, from a full cache and without a request sent, the same answers,
failures and counts as a fresh run with those rules; a looser rule sends only the attempts it now needs.

What the verdict does not cover is decided later on every run too, from the answers: grounding and the
judge's verdicts (assemble.py), hidden-reference drops, Algorithm 2.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from ctxforge.generation.cache import Attempt
from ctxforge.generation.requests import Request
from ctxforge.generation.validation import ContentCheck, validate

# what decides a verdict besides the config: bump when validate() or checks.py change what they accept
RULES_VERSION = 1
# the error of an attempt that killed generator.max_engine_crashes_per_request + 1 engines (scheduler.py)
ENGINE_CRASH = "engine_crash"


@dataclass
class Verdict:
    decided: bool
    obj: dict | None = None       # the accepted answer (decided and ok)
    reason: str = ""              # the last attempt's reason (decided and failed)
    next_attempt: int = 0         # the attempt to send (undecided)
    reasons: list[str] = field(default_factory=list)   # every failed attempt's reason, in order

    @property
    def ok(self) -> bool:
        return self.decided and self.obj is not None


def attempt_outcome(request: Request, answer: Attempt,
                    content_check: ContentCheck | None = None) -> tuple[dict | None, str]:
    """(object, "") when the attempt's output is usable under today's rules, else (None, reason)."""
    if answer.error:
        return None, answer.error if answer.error.startswith(ENGINE_CRASH) else f"backend:{answer.error}"
    return validate(request, answer.output_text, content_check)


def decide(request: Request, attempts: dict[int, Attempt], max_attempts: int, retry_transport: bool,
           content_check: ContentCheck | None = None) -> Verdict:
    """The verdict of `request` from its known attempts ({attempt: Attempt}, 1-based). retry_transport
    (generator.retry_failed): a transport failure read from the cache is asked again, not counted.
    `content_check`: the client's check of a schema-valid answer (validation.validate)."""
    reasons: list[str] = []
    for n in range(1, max_attempts + 1):
        answer = attempts.get(n)
        if answer is None or (retry_transport and answer.error and not answer.fresh):
            return Verdict(False, next_attempt=n, reasons=reasons)
        obj, reason = attempt_outcome(request, answer, content_check)
        if obj is not None:
            return Verdict(True, obj=obj, reasons=reasons)
        reasons.append(reason)
        if reason.startswith(ENGINE_CRASH):     # it killed its engines: no further attempt is sent
            break
    return Verdict(True, reason=reasons[-1], reasons=reasons)


def rules_fingerprint(checks: dict, max_attempts: int, grounding: dict | None = None) -> dict:
    """What decided the written data's verdicts, with a short hash of it (for the manifest)."""
    rules = {"version": RULES_VERSION, "checks": checks, "max_attempts": max_attempts, "grounding": grounding or {}}
    digest = hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]
    return {**rules, "hash": digest}
