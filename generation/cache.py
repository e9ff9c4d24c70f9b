"""The request cache: every attempt the backend answered, as it answered it, keyed by (request id, attempt).

What is kept is the raw output text (or the transport failure), never a verdict: whether an answer is
usable is decided again on every run by today's rules (verdicts.py: schema validation, content checks,
generator.max_attempts), so a change of rules never reuses a stale verdict and never needs the
answers generated again. The request id covers everything that determines the output (requests.py), the
attempt number its sampling seed.

SQLite in WAL mode, written only by the driver, committed after every batch that comes back, so a
run killed at any point (kill -9, a preempted node) loses at most the batch in flight, and the
rerun skips every attempt already here. A cache written by an earlier version (a `results` table of
verdicts without their raw outputs) is not read: its requests are asked again.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS attempts (
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,         -- 1-based; the attempt's seed is attempt_seed(request_id, attempt)
    pass TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    key TEXT NOT NULL,
    output_text TEXT NOT NULL,        -- the backend's output exactly as returned ('' on a transport failure)
    error TEXT NOT NULL,              -- the transport failure ('' when the backend answered)
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finished_at REAL NOT NULL,
    PRIMARY KEY (request_id, attempt)
);
"""


@dataclass(frozen=True)
class Attempt:
    """One answered attempt: the raw output, or the transport failure that took its place."""

    output_text: str
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fresh: bool = False       # answered in this run (not read from the cache; never stored)


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash (not power loss)
        self.db.executescript(SCHEMA)
        self.db.commit()
        old = self.db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='results'").fetchone()
        if old:
            n = self.db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            if n:
                log.warning("%s: %d cached verdicts from an earlier version hold no raw output and are not reused: "
                            "their requests are asked again", self.path, n)

    def attempts(self, request_ids: list[str]) -> dict[str, dict[int, Attempt]]:
        """The cached attempts of each of request_ids that has any: {request_id: {attempt: Attempt}}."""
        out: dict[str, dict[int, Attempt]] = {}
        for start in range(0, len(request_ids), 500):
            part = request_ids[start:start + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(
                f"SELECT request_id, attempt, output_text, error, prompt_tokens, completion_tokens "
                f"FROM attempts WHERE request_id IN ({marks})", part).fetchall()
            for rid, attempt, text, error, pt, ct in rows:
                out.setdefault(rid, {})[int(attempt)] = Attempt(text, error, int(pt), int(ct))
        return out

    def put(self, request_id: str, attempt: int, pass_name: str, doc_id: str, key: str, answer: Attempt) -> None:
        # INSERT OR REPLACE: a transport failure asked again (generator.retry_failed) is overwritten, never duplicated
        self.db.execute(
            "INSERT OR REPLACE INTO attempts VALUES (?,?,?,?,?,?,?,?,?,?)",
            (request_id, int(attempt), pass_name, doc_id, key, answer.output_text or "", answer.error or "",
             int(answer.prompt_tokens), int(answer.completion_tokens), time.time()),
        )

    def commit(self) -> None:
        self.db.commit()

    def count(self) -> dict[str, int]:
        """{"requests": requests with an attempt, "attempts": attempts, "transport_failures": of which failed}."""
        requests, attempts, failures = self.db.execute(
            "SELECT COUNT(DISTINCT request_id), COUNT(*), COALESCE(SUM(error != ''), 0) FROM attempts").fetchone()
        return {"requests": requests, "attempts": attempts, "transport_failures": failures}

    def close(self) -> None:
        self.db.commit()
        self.db.close()
