"""Request statistics per pass name: what the manifest reports for every client's requests."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


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

    def to_dict(self) -> dict:
        return {
            "requests": self.requests, "cache_hits": self.cache_hits, "sent": self.sent, "ok": self.ok,
            "failed": self.failed, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 2), "request_s": round(self.request_s, 2), "lost_resent": self.lost_resent,
            "failures_by_reason": dict(self.failures),
            "failed_attempts_by_reason": dict(self.attempt_errors),
        }
