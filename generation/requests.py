"""Generation requests: content-addressed ids, per-attempt seeds, and the row a backend receives.

A request id hashes everything that determines the answer (messages, schema, model, sampling
parameters, prompt-set version). The cache is keyed by it, so a rerun after a crash or a
preemption pays for no finished request twice, and an edited prompt never reuses a stale answer.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    pass_name: str              # summary_small | summary_section | summary_global | qa | followup
    doc_id: str
    key: str                    # what the answer fills in the document's state (e.g. "summary:s00003", "qa:h007")
    messages: list[dict[str, str]]
    schema_name: str            # summary | qa
    schema: dict | None         # JSON schema of the answer; None = free text (long-form prose)
    max_tokens: int
    meta: dict[str, Any] = field(default_factory=dict)
    request_id: str = ""

    def finalize(self, model: str, temperature: float, top_p: float, prompt_hash: str,
                 repetition_penalty: float = 1.0) -> "Request":
        payload = {
            "messages": self.messages, "schema": self.schema, "model": model, "max_tokens": self.max_tokens,
            "temperature": temperature, "top_p": top_p, "prompt_set": prompt_hash,
        }
        if repetition_penalty != 1.0:  # only when set: ids (and caches) of runs without it stay valid
            payload["repetition_penalty"] = repetition_penalty
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
        self.request_id = digest[:32]
        return self

    def prompt_chars(self) -> int:
        return sum(len(m["content"]) for m in self.messages)


def attempt_seed(request_id: str, attempt: int) -> int:
    """Deterministic per attempt: a retry samples differently, a rerun samples the same."""
    return int(hashlib.sha256(f"{request_id}:{attempt}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def request_row(req: Request, attempt: int, temperature: float, top_p: float,
                repetition_penalty: float = 1.0) -> dict[str, Any]:
    """The row contract of backends/base.py."""
    return {
        "request_id": req.request_id,
        "messages": json.dumps(req.messages, ensure_ascii=False),
        # the schema's own property order: constrained decoders write fields in it (question, then answer)
        "schema": json.dumps(req.schema) if req.schema is not None else "",
        "schema_name": req.schema_name,
        "max_tokens": int(req.max_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "repetition_penalty": float(repetition_penalty),
        "seed": attempt_seed(req.request_id, attempt),
    }
