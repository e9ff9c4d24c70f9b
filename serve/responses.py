"""OpenAI-compatible response bodies, shaped as vLLM serves them (plain dicts, JSON-ready).

- /v1/completions `logprobs`: {tokens, token_logprobs, top_logprobs, text_offset}; top_logprobs maps
  token text -> logprob for the chosen token plus the `logprobs` most likely ones (so up to k + 1
  entries, as in OpenAI's legacy API and vLLM). With `echo`, the prompt's tokens come first and the
  first prompt token has null logprob and null top_logprobs.
- /v1/chat/completions `logprobs.content`: [{token, logprob, bytes, top_logprobs: [{token, logprob,
  bytes}] x top_logprobs}].
- vLLM's `prompt_logprobs`: [null, {"<token id>": {logprob, rank, decoded_token}}, ...], per choice
  on /v1/completions and at the top level on /v1/chat/completions.
Logprobs are clamped at -9999.0 (OpenAI's JSON-safe stand-in for -inf, as vLLM does).
Nothing here knows about HTTP or models beyond `token_text`.
"""

from __future__ import annotations

import time
import uuid
from typing import Callable

from ctxforge.serve.sampling import TokenLogprob

MIN_LOGPROB = -9999.0


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _lp(x: float) -> float:
    return max(float(x), MIN_LOGPROB)


def completion_logprobs(token_text: Callable[[int], str], token_ids: list[int],
                        records: list[TokenLogprob | None], k: int, offset: int = 0) -> tuple[dict, int]:
    """The legacy logprobs object for these tokens (chosen token + at most k alternatives each), and the
    text offset after them (for the next chunk)."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for tid, rec in zip(token_ids, records):
        tok = token_text(tid)
        out["tokens"].append(tok)
        out["text_offset"].append(offset)
        offset += len(tok)
        if rec is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(rec.logprob))
        top = {tok: _lp(rec.logprob)}
        for alt, lp in rec.top[:k]:
            top.setdefault(token_text(alt), _lp(lp))
        out["top_logprobs"].append(top)
    return out, offset


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_logprobs(token_text: Callable[[int], str], records: list[TokenLogprob]) -> dict:
    content = []
    for rec in records:
        item = _entry(token_text(rec.token_id), rec.logprob)
        item["top_logprobs"] = [_entry(token_text(alt), lp) for alt, lp in rec.top]
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


def chat_completion(model: str, choices: list[dict], use: dict, prompt_lps: list | None = None) -> dict:
    body = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
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
