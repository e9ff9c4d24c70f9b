"""The `fake` backend: an engine without a model, for dry runs of the scheduling, resume and accounting.

It "loads" for `load_s` seconds, then answers each request after `latency_s` seconds with a JSON
object that matches the request's schema: string fields are a digest of the prompt plus its first
words, and a field whose name contains "quote" is a verbatim run of words from the middle of the last
user message (so grounding succeeds). `slots` requests are generated at once, each still taking
`latency_s` (continuous batching as an ideal engine does it). Answers depend only on the request, so
reruns reproduce them. engine_kwargs: load_s (default 0), latency_s (0), slots (8), num_gpus (0,
what the accounting counts the engine as holding).

Faults, for tests of the engine pool (engine_kwargs): crash_on (a string: a request whose last user
message contains it breaks the engine, a poisoned request; "" = every request, a broken engine
configuration) and crash_once (a file path: the first request of the run, across engines, breaks its
engine and creates the file; later ones are answered, a death by chance). A broken engine raises
EngineCrashed, as a real engine does on its runtime's fatal errors.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from ctxforge.generation.backends import register
from ctxforge.generation.backends.base import Engine, EngineCrashed, EngineFactory, GeneratorBackend, error_result

_WORD = re.compile(r"\S+")
FAKE_ENGINE_KWARGS = ("load_s", "latency_s", "slots", "num_gpus", "crash_on", "crash_once")


def last_user(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content") or "")
    return ""


def middle_quote(text: str, max_len: int | None, words: int = 8) -> str:
    """A verbatim run of ~`words` words from the middle of text, at most max_len characters."""
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    if not spans:
        return text[: max_len or None]
    mid = max(0, len(spans) // 2 - words // 2)
    chosen = spans[mid: mid + words]
    quote = text[chosen[0][0]: chosen[-1][1]]
    return quote[:max_len].rstrip() if max_len is not None and len(quote) > max_len else quote


def fake_answer(schema: dict, prompt: str, name: str = "value") -> Any:
    """A deterministic instance of the schemas the planner asks for (objects of strings, arrays of quotes,
    enums such as the judge's yes/no: the first value)."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if kind == "object":
        props = schema.get("properties", {})
        required = schema.get("required", list(props))
        return {k: fake_answer(props[k], prompt, k) for k in props if k in required}
    if kind == "array":
        return [fake_answer(schema.get("items", {}), prompt, name) for _ in range(max(1, int(schema.get("minItems", 1))))]
    if kind in ("integer", "number"):
        return int(schema.get("minimum", 0)) if kind == "integer" else float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    max_len = schema.get("maxLength")
    if "quote" in name.lower():
        text = middle_quote(prompt, max_len)
    else:
        digest = hashlib.sha256(f"{name}\0{prompt}".encode()).hexdigest()[:12]
        text = f"{name} {digest}: " + " ".join(prompt.split()[:12])
        text = text[:max_len] if max_len is not None else text
    return text.ljust(int(schema.get("minLength", 0)), "x")


class FakeEngine(Engine):
    def __init__(self, load_s: float = 0.0, latency_s: float = 0.0, slots: int = 8, crash_on: str | None = None,
                 crash_once: str | None = None):
        time.sleep(load_s)  # what loading weights costs a real engine
        self.latency_s = latency_s
        self.slots = slots
        self.crash_on = crash_on
        self.crash_once = crash_once

    def _maybe_crash(self, prompt: str) -> None:
        """Raises EngineCrashed for the configured faults (crash_on, crash_once)."""
        if self.crash_on is not None and self.crash_on in prompt:
            raise EngineCrashed(f"fake engine broken by its request (engine_kwargs.crash_on={self.crash_on!r})")
        if self.crash_once:
            try:
                with open(self.crash_once, "x"):
                    pass
            except FileExistsError:
                return
            raise EngineCrashed("fake engine died once by chance (engine_kwargs.crash_once)")

    def generate(self, row: dict) -> dict:
        try:
            messages = json.loads(row["messages"])
            prompt = last_user(messages)
        except Exception as exc:  # a malformed row is that row's failure
            return error_result(f"bad request row: {type(exc).__name__}: {exc}")
        self._maybe_crash(prompt)
        try:
            if row["schema"]:
                text = json.dumps(fake_answer(json.loads(row["schema"]), prompt))
            else:  # a free-text request: prose derived from the prompt
                text = fake_answer({"type": "string"}, prompt, "text")
        except Exception as exc:  # a malformed row is that row's failure
            return error_result(f"bad request row: {type(exc).__name__}: {exc}")
        time.sleep(self.latency_s)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return {"output_text": text, "prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()), "error": ""}


@register("fake")
class FakeBackend(GeneratorBackend):
    uses_model_path = False   # no model: generator.model only names the run's requests

    def _kw(self) -> dict[str, Any]:
        kw = self.cfg.engine_kwargs
        unknown = sorted(set(kw) - set(FAKE_ENGINE_KWARGS))
        if unknown:
            raise ValueError(f"generator.engine_kwargs: unknown key(s) {unknown} for the fake backend "
                             f"(known: {', '.join(FAKE_ENGINE_KWARGS)})")
        return kw

    def engine_factory(self) -> EngineFactory:
        kw = self._kw()
        return EngineFactory(f"{__name__}:FakeEngine", {
            "load_s": float(kw.get("load_s", 0.0)), "latency_s": float(kw.get("latency_s", 0.0)),
            "slots": self.slots_per_engine(), "crash_on": kw.get("crash_on"), "crash_once": kw.get("crash_once")})

    def default_slots(self) -> int:
        return int(self._kw().get("slots", 8))

    def gpus_per_engine(self) -> float:
        return float(self._kw().get("num_gpus", 0.0))

    def describe(self) -> dict:
        return {**super().describe(), "engine_kwargs": dict(self.cfg.engine_kwargs), "actors": self.cfg.concurrency}
