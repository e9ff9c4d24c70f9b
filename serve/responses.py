"""OpenAI-compatible response bodies, shaped as vLLM serves them (plain dicts, JSON-ready).

- /v1/completions `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}; top_logprobs maps
  token text -> logprob for the chosen token and the `logprobs` most likely ones, in that order (so
  up to k + 1 entries, as in OpenAI's legacy API and vLLM). Different token ids can decode to the same
  text (every lone piece of a UTF-8 character reads U+FFFD); such keys hold the highest of their
  logprobs, so `max(top_logprobs.values())` is always the most likely token's logprob and a chosen
  token below rank 1 never looks greedy (lm-eval's `is_greedy`). vLLM lets the last entry win, which
  agrees with this rule when k = 1 (lm-eval's requests) and can hide the top token when k > 1. With
  `return_tokens_as_token_ids` (vLLM's field) tokens and keys read `token_id:<id>`: nothing collides.
  With `echo`, the prompt's tokens come first and the first prompt token has null logprob and null
  top_logprobs.
- /v1/chat/completions `logprobs.content`: [{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}] x top_logprobs}]; top_logprobs are the most likely tokens by id, in rank order, and `bytes`
  are the token's own bytes (token_bytes.py), so a character split over several tokens is rebuilt
  by concatenating them.
- vLLM's `prompt_logprobs`: [null, {"<token id>": {logprob, rank, decoded_token}}, ...], per choice
  on /v1/completions and at the top level on /v1/chat/completions.
Logprobs are clamped at -9999.0 (OpenAI's JSON-safe stand-in for -inf, as vLLM does).
Nothing here knows about HTTP or models beyond `Tokens`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable

from ctxforge.serve.sampling import TokenLogprob

MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _lp(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


@dataclass(frozen=True)
class Tokens:
    """How logprob entries name a token id: `text(id)` as it reads alone, `raw(id)` its own bytes;
    `as_ids` names it `token_id:<id>` instead (vLLM's `return_tokens_as_token_ids`)."""
    text: Callable[[int], str]
    raw: Callable[[int], bytes]
    as_ids: bool = False

    def name(self, token_id: int) -> str:
        return f"token_id:{token_id}" if self.as_ids else self.text(token_id)


def top_dict(names: Tokens, rec: TokenLogprob, k: int) -> dict[str, float]:
    """The chosen token and at most k alternatives as {name: logprob}; a name shared by several ids
    keeps the highest logprob (see the module docstring)."""
    top: dict[str, float] = {}
    for tid, lp in [(rec.token_id, rec.logprob), *rec.top[:k]]:
        key = names.name(tid)
        top[key] = max(_lp(lp), top.get(key, MIN_LOGPROB))
    return top


def completion_logprobs(names: Tokens, token_ids: list[int], records: list[TokenLogprob | None], k: int,
                        offset: int = 0) -> tuple[dict, int]:
    """The legacy logprobs object for these tokens (chosen token + at most k alternatives each), and the
    text offset after them (for the next chunk)."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for tid, rec in zip(token_ids, records):
        tok = names.name(tid)
        out["tokens"].append(tok)
        out["text_offset"].append(offset)
        offset += len(tok)
        if rec is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(rec.logprob))
        out["top_logprobs"].append(top_dict(names, rec, k))
    return out, offset


def _entry(names: Tokens, token_id: int, logprob: float) -> dict:
    return {"token": names.name(token_id), "logprob": _lp(logprob), "bytes": list(names.raw(token_id))}


def chat_logprobs(names: Tokens, records: list[TokenLogprob]) -> dict:
    content = []
    for rec in records:
        item = _entry(names, rec.token_id, rec.logprob)
        item["top_logprobs"] = [_entry(names, alt, lp) for alt, lp in rec.top]
        content.append(item)
    return {"content": content}


def prompt_logprobs(token_text: Callable[[int], str], records: list[TokenLogprob | None] | None) -> list | None:
    if records is None:
        return None
    out: list = []
    for rec in records:
        if rec is None:
            out.append(None)
            continue
        entry = {str(rec.token_id): {"logprob": _lp(rec.logprob), "rank": rec.rank, "decoded_token": token_text(rec.token_id)}}
        for rank, (alt, lp) in enumerate(rec.top, 1):
            entry.setdefault(str(alt), {"logprob": _lp(lp), "rank": rank, "decoded_token": token_text(alt)})
        out.append(entry)
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, choices: list[dict], use: dict, rid: str | None = None) -> dict:
    return {"id": rid or new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": use}


def chat_completion(model: str, choices: list[dict], use: dict, prompt_lps: list | None = None,
                    rid: str | None = None) -> dict:
    body = {"id": rid or new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
            "choices": choices, "usage": use}
    if prompt_lps is not None:
        body["prompt_logprobs"] = prompt_lps
    return body


def chunk(kind: str, head: dict, choices: list[dict], use: dict | None = None) -> dict:
    """A streamed chunk: kind 'chat' (chat.completion.chunk) or 'text' (text_completion)."""
    body = {**head, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def model_list(model_id: str, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": now(), "owned_by": "ctxforge",
                                        "max_model_len": max_model_len}]}
