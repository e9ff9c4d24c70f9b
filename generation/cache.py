"""The request cache: every finished generation request, keyed by its content-addressed id.

SQLite in WAL mode, written only by the driver, committed after every batch that comes back, so a
run killed at any point (kill -9, a preempted node) loses at most the batch in flight, and the
rerun skips everything already here. "Finished" means validated ok, or failed after all attempts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    request_id TEXT PRIMARY KEY,
    pass TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,             -- ok | failed
    output TEXT,                      -- the validated JSON object (ok)
    error TEXT,                       -- the reason of the last attempt (failed)
    attempts INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finished_at REAL NOT NULL
);
"""


class RequestCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process crash (not power loss)
        self.db.executescript(SCHEMA)
        self.db.commit()

    def finished(self, request_ids: list[str], include_failed: bool = True) -> dict[str, dict]:
        """The finished entries among request_ids."""
        out: dict[str, dict] = {}
        statuses = ("ok", "failed") if include_failed else ("ok",)
        for start in range(0, len(request_ids), 500):
            part = request_ids[start:start + 500]
            marks = ",".join("?" * len(part))
            rows = self.db.execute(
                f"SELECT request_id, status, output, error, attempts, prompt_tokens, completion_tokens "
                f"FROM results WHERE request_id IN ({marks})", part).fetchall()
            for rid, status, output, error, attempts, pt, ct in rows:
                if status in statuses:
                    out[rid] = {"status": status, "output": json.loads(output) if output else None,
                                "error": error, "attempts": attempts, "prompt_tokens": pt, "completion_tokens": ct}
        return out

    def put(self, request_id: str, pass_name: str, doc_id: str, key: str, status: str, output: dict | None,
            error: str, attempts: int, prompt_tokens: int, completion_tokens: int) -> None:
        # INSERT OR REPLACE: a failed entry retried with generator.retry_failed is overwritten, never duplicated
        self.db.execute(
            "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (request_id, pass_name, doc_id, key, status,
             json.dumps(output, ensure_ascii=False) if output is not None else None,
             error, attempts, prompt_tokens, completion_tokens, time.time()),
        )

    def commit(self) -> None:
        self.db.commit()

    def count(self) -> dict[str, int]:
        rows = self.db.execute("SELECT status, COUNT(*) FROM results GROUP BY status").fetchall()
        return {status: n for status, n in rows}

    def close(self) -> None:
        self.db.commit()
        self.db.close()
