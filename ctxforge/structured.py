"""Structured outputs with xgrammar, shared by every transformers-based generator (the synthesis `hf`
backend and the CPU serving engine), so a JSON schema constrains decoding the same way in both.

`Grammars(tokenizer, vocab_size)` compiles constraints against one tokenizer and caches them by
their text: a JSON schema, any JSON object, a regular expression, a fixed choice of strings, or an
EBNF grammar. `logits_processor(compiled)` returns xgrammar's Hugging Face logits processor, which
masks every token that would leave the grammar; it holds its matcher state, so use a fresh one per
generated sequence. JSON is compiled with `any_whitespace=False`: with free whitespace a weak model
spends its whole budget on it (measured on the tiny model). vLLM uses xgrammar for the same
`response_format` on GPU. Bad constraints raise `GrammarError` (a ValueError) with xgrammar's reason.
"""

from __future__ import annotations

import json
import re
import threading

from ctxforge.schema_keywords import GrammarError, check_enforceable  # noqa: F401 (GrammarError is public here)


class Grammars:
    """Compiled constraints for one tokenizer (thread-safe cache keyed by kind and text)."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        import xgrammar as xgr

        self._xgr = xgr
        # vocab_size: the model's embedding rows, which real checkpoints pad beyond len(tokenizer).
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info)
        self._cache: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()

    def _compiled(self, kind: str, text: str, build):
        key = (kind, text)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            compiled = build()
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its parser's message
            raise GrammarError(f"{kind} cannot be compiled: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        with self._lock:
            self._cache[key] = compiled
        return compiled

    def json_schema(self, schema: str | dict):
        """A JSON schema (text or dict), enforced exactly: UnenforceableSchema (a GrammarError) for a keyword
        outside ctxforge.schema_keywords' allow-list, GrammarError for invalid JSON or what xgrammar rejects."""
        # never sort keys: a decoder writes properties in the schema's order (question before answer)
        text = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise GrammarError(f"JSON schema is not valid JSON: {exc}") from exc
        check_enforceable(parsed)
        return self._compiled("JSON schema", text, lambda: self.compiler.compile_grammar(self._strict_json(text)))

    # xgrammar's rule for a string with minLength/maxLength admits raw control characters (tabs, U+0000-U+001F),
    # which JSON forbids inside strings: json.loads and every strict parser reject the output. Its rule for an
    # unbounded string already excludes them; the bounded one gets the same class.
    _LOOSE_CHAR = '[^\\"\\\\\\r\\n]'
    _STRICT_CHAR = '[^\\0-\\x1f\\"\\\\\\r\\n]'

    def _strict_json(self, text: str) -> str:
        ebnf = str(self._xgr.Grammar.from_json_schema(text, any_whitespace=False))
        return ebnf.replace(self._LOOSE_CHAR, self._STRICT_CHAR)

    def json_object(self):
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return self.json_schema('{"type": "object"}')

    def regex(self, pattern: str):
        return self._compiled("regex", pattern, lambda: self.compiler.compile_regex(pattern))

    def choice(self, choices: list[str]):
        """Exactly one of `choices` (vLLM's `choice` constraint), as an alternation of literal strings.

        Raises GrammarError when `choices` is empty.
        """
        if not choices:
            raise GrammarError("choice needs at least one string")
        return self.regex("(" + "|".join(re.escape(c) for c in choices) + ")")

    def ebnf(self, grammar: str):
        return self._compiled("grammar", grammar, lambda: self.compiler.compile_grammar(grammar))

    def logits_processor(self, compiled):
        """A fresh transformers LogitsProcessor enforcing `compiled` (one per generated sequence)."""
        return self._xgr.contrib.hf.LogitsProcessor(compiled)
