"""The generator backend interface: a Ray Data transform from request rows to result rows.

Every backend (hf, vllm, http) takes a Dataset whose rows are REQUEST_COLUMNS and returns one whose
rows carry the same request_id plus RESULT_COLUMNS. Backends do transport only: schema validation,
attempts, caching and accounting happen in the pass runner (passes.py), the same for every backend.

A request row:
  request_id  str   content-addressed id (cache key)
  messages    str   JSON list of {"role", "content"} chat messages
  schema      str   JSON schema the completion must match (structured outputs); "" = free text
  schema_name str   short name of that schema (summary, qa)
  max_tokens  int   completion budget
  temperature float
  top_p       float
  seed        int   per-request sampling seed (derived from request_id and attempt)
A result row adds:
  output_text       str  the raw completion ("" on error)
  prompt_tokens     int
  completion_tokens int
  error             str  "" when the backend got a completion, else the reason (e.g. "http 500 after 8 retries")
"""

from __future__ import annotations

import abc
import json
from typing import Any

import numpy as np

REQUEST_COLUMNS = ("request_id", "messages", "schema", "schema_name", "max_tokens", "temperature", "top_p", "seed")
RESULT_COLUMNS = ("output_text", "prompt_tokens", "completion_tokens", "error")


class GeneratorBackend(abc.ABC):
    """Builds the Ray Data stage that turns request rows into result rows."""

    name: str = ""

    def __init__(self, cfg: Any, model_path: str):
        self.cfg = cfg                # pipeline.config.GeneratorConfig
        self.model_path = model_path  # resolved local directory or hub name

    @abc.abstractmethod
    def apply(self, ds):
        """Return a Dataset with REQUEST_COLUMNS + RESULT_COLUMNS for every input row."""

    def describe(self) -> dict:
        """What the manifest records about the generator."""
        return {"backend": self.name, "model": self.model_path}


def batch_rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """A Ray Data numpy batch as a list of row dicts (python scalars)."""
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    return [{k: _py(batch[k][i]) for k in keys} for i in range(n)]


def rows_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The inverse of batch_rows, keeping strings as object arrays."""
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        out[key] = np.array(values, dtype=object) if isinstance(values[0], str) else np.array(values)
    return out


def parse_messages(messages_json: str) -> list[dict[str, str]]:
    return json.loads(messages_json)


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
