"""Render a chat conversation with the target model's chat template, with a loss mask on the answers.

`render_conversation` works with any Hugging Face chat template, including ones without
`{% generation %}` markers (Llama-3.1-Instruct's has none, so `return_assistant_tokens_mask` can't be
used there). It renders the conversation to text once, finds every message's content in that text in
order (exactly, via a placeholder skeleton render; by ordered search when the template defeats that),
and tokenizes the text once with offsets; a token is in the loss when it overlaps an assistant span
(the answer plus the end-of-turn special token the template writes right after it). One full render and
one tokenization keep a 1M-token, 100-turn conversation at a few seconds; rendering prefixes per turn
would be quadratic.

Mask semantics match transformers' `return_assistant_tokens_mask`: every token OVERLAPPING a span is
masked, so a BPE token straddling the span start (when a template glues content to its header) is
still trained, as it is what the model emits first.

Special-token strings inside message contents (a book quoting "<|im_end|>\n<|im_start|>assistant")
would tokenize as control tokens, as they do with `apply_chat_template(tokenize=True)`: a fake turn
inside a user message. By default (`contents_as_text=True`) a conversation whose contents hold such a
string is encoded piece by piece: the template's own text with special tokens on, every content with
`split_special_tokens=True`, so the template's control tokens stay control tokens and the contents'
become ordinary text. Conversations without such strings are encoded in one call, as before.
`special_tokens_in_contents` lets a caller count or reject them instead.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Rendered:
    """One rendered conversation: its text, tokens, mask and where every assistant span lies."""

    text: str
    input_ids: list[int]
    loss_mask: list[int]
    # [start, end) char spans in `text`, one per assistant message in order, end-of-turn token included
    assistant_spans: list[tuple[int, int]] = field(default_factory=list)
    # start char offset of every token (sorted), to count the tokens before a char position
    token_starts: list[int] = field(default_factory=list)

    def tokens_before(self, char_pos: int) -> int:
        """Number of tokens that start before `char_pos` (a prefix's length in tokens, approximately)."""
        return bisect.bisect_left(self.token_starts, char_pos)


def _special_token_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens that could close a turn, longest first (longest match wins).

    BOS is left out (unless it doubles as EOS): a BOS right after an answer opens the next turn, it does
    not end this one. Pad is kept: Llama-3 setups often set pad_token = <|eot_id|>.
    """
    specials: set[str] = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            specials.add(str(added.content))
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos != getattr(tokenizer, "eos_token", None):
        specials.discard(bos)
    return sorted((s for s in specials if s), key=len, reverse=True)


def special_tokens_in_contents(messages: Sequence[dict], tokenizer: Any) -> list[str]:
    """Special-token strings found inside message contents (they would tokenize as control tokens)."""
    specials = _special_token_strings(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if isinstance(bos, str) and bos:
        specials.append(bos)
    found = []
    for s in specials:
        if any(s in (m.get("content") or "") for m in messages):
            found.append(s)
    return found


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Locate `content` in `text` at or after `start`: verbatim first, then stripped (many templates
    `| trim` the content, Llama 3's included)."""
    pos = text.find(content, start)
    if pos >= 0:
        return pos, pos + len(content)
    stripped = content.strip()
    if stripped != content:
        pos = text.find(stripped, start)
        if pos >= 0:
            return pos, pos + len(stripped)
    return None


def _placeholder(i: int) -> str:
    # Private-use characters: no template writes them and `| trim` keeps them.
    return f"\ue000{i}\ue001"


def _locate_by_skeleton(text: str, messages: Sequence[dict], tokenizer: Any, chat_template: str | None):
    """Exact content spans of every message, or None when the template does not allow it.

    The conversation is rendered a second time with each content replaced by a unique placeholder (tiny,
    so cheap); the text between placeholders is what the template writes around the contents. Walking
    the real text piece by piece then places every content exactly, even an answer such as "assistant"
    that also occurs in the template's own header, which no search can tell apart. Templates that drop,
    repeat or branch on contents fail the walk and fall back to the ordered search.
    """
    skeleton_msgs = [{**m, "content": _placeholder(i)} for i, m in enumerate(messages)]
    try:
        skeleton = tokenizer.apply_chat_template(
            skeleton_msgs, chat_template=chat_template, tokenize=False, add_generation_prompt=False
        )
    except Exception:  # noqa: BLE001 - a template that rejects placeholders just means: search instead
        return None
    gaps, pos = [], 0
    for i in range(len(messages)):
        at = skeleton.find(_placeholder(i), pos)
        if at < 0:
            return None
        gaps.append(skeleton[pos:at])
        pos = at + len(_placeholder(i))
    gaps.append(skeleton[pos:])
    spans, pos = [], 0
    for i, msg in enumerate(messages):
        if not text.startswith(gaps[i], pos):
            return None
        pos += len(gaps[i])
        content = msg.get("content") or ""
        for candidate in (content, content.strip()):
            if text.startswith(candidate, pos):
                spans.append((pos, pos + len(candidate)))
                pos += len(candidate)
                break
        else:
            return None
    if text[pos:] != gaps[-1]:
        return None
    return spans


def _locate_contents(
    text: str, messages: Sequence[dict], tokenizer: Any, chat_template: str | None = None
) -> list[tuple[int, int] | None]:
    """Char span of every message's content in `text` (None for a non-assistant content not found).

    Exact placement from the placeholder skeleton when the template allows it; otherwise an ordered
    search in which every message (not only assistant ones) advances the cursor, so an answer whose text
    also occurs in a document or a question earlier in the conversation is found at its own turn. A
    non-assistant content the template rewrote (not found) leaves the cursor where it was; an assistant
    content that can't be found is an error (no silent empty mask).
    """
    for i, msg in enumerate(messages):
        if not isinstance(msg.get("content") or "", str):
            raise ValueError(f"message {i}: only string contents are supported, got {type(msg.get('content')).__name__}")
    content_spans = _locate_by_skeleton(text, messages, tokenizer, chat_template)
    if content_spans is None:
        content_spans, cursor = [], 0
        for i, msg in enumerate(messages):
            content = msg.get("content") or ""
            found = _find_content(text, content, cursor)
            if msg.get("role") == "assistant" and found is None:
                preview = content[:80].replace("\n", "\\n")
                raise ValueError(
                    f"assistant message {i} ({preview!r}...) not found in the rendered chat template text after "
                    f"char {cursor}; the template must write assistant contents verbatim (or trimmed)"
                )
            content_spans.append(found)
            if found is not None and content.strip():
                cursor = found[1]
    return content_spans


def _assistant_spans(text: str, messages: Sequence[dict], content_spans, tokenizer: Any) -> list[tuple[int, int]]:
    """The assistant content spans, each extended over a directly following special token."""
    specials = _special_token_strings(tokenizer)
    spans: list[tuple[int, int]] = []
    for msg, found in zip(messages, content_spans):
        if msg.get("role") != "assistant":
            continue
        start, end = found
        # The end-of-turn token (<|im_end|>, <|eot_id|>, </s>, ...) is what teaches the model to stop.
        for s in specials:
            if text.startswith(s, end):
                end += len(s)
                break
        spans.append((start, end))
    return spans


def _mask_from_spans(starts: Sequence[int], ends: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """1 on every token overlapping a span (as transformers' assistant mask does).

    Offsets of one tokenized string are in order, so each span's tokens are one contiguous range found by
    bisection: O(spans x log tokens) plus the marking, instead of a Python loop over a million tokens.
    """
    mask = [0] * len(starts)
    if any(e1 > e2 for e1, e2 in zip(ends, ends[1:])) or any(s1 > s2 for s1, s2 in zip(starts, starts[1:])):
        # Not seen with byte-level BPE, but bisection needs sorted offsets: transformers' one-pass walk.
        span_idx = 0
        for i, (ts, te) in enumerate(zip(starts, ends)):
            while span_idx < len(spans) and ts >= spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(spans):
                break
            if te > spans[span_idx][0]:
                mask[i] = 1
        return mask
    for a, b in spans:
        lo = bisect.bisect_right(ends, a)    # first token ending after the span start
        hi = bisect.bisect_left(starts, b)   # first token starting at or after the span end
        if hi > lo:
            mask[lo:hi] = [1] * (hi - lo)
    return mask


def render_detailed(messages: Sequence[dict], tokenizer: Any, chat_template: str | None = None,
                    contents_as_text: bool = True) -> Rendered:
    """Render, tokenize, and mask; keeps the text, spans and token offsets for callers that trim.

    contents_as_text: special-token strings inside contents are encoded as ordinary text (see the module
    docstring); False = they become control tokens, as in a plain `apply_chat_template(tokenize=True)`."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=chat_template, tokenize=False, add_generation_prompt=False
    )
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    content_spans = _locate_contents(text, messages, tokenizer, chat_template)
    spans = _assistant_spans(text, messages, content_spans, tokenizer)
    if contents_as_text and special_tokens_in_contents(messages, tokenizer):
        ids, starts, ends = _encode_contents_as_text(text, messages, content_spans, tokenizer)
    else:
        # add_special_tokens=False: the template already wrote BOS etc. (as apply_chat_template does).
        enc = tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False, verbose=False
        )
        ids = list(enc["input_ids"])
        starts = [o[0] for o in enc["offset_mapping"]]
        ends = [o[1] for o in enc["offset_mapping"]]
    return Rendered(
        text=text,
        input_ids=ids,
        loss_mask=_mask_from_spans(starts, ends, spans),
        assistant_spans=spans,
        token_starts=starts,
    )


def _encode_contents_as_text(text: str, messages: Sequence[dict], content_spans, tokenizer: Any):
    """Token ids and char offsets of `text`, encoded piece by piece: template pieces with special tokens,
    contents with `split_special_tokens=True` (their special-token strings become ordinary text)."""
    for i, (msg, span) in enumerate(zip(messages, content_spans)):
        if span is None and (msg.get("content") or "").strip():
            raise ValueError(f"message {i}: its content could not be located in the rendered template text, so its "
                             "special-token strings cannot be encoded as text (concat.special_tokens=skip_document "
                             "leaves such documents out)")
    pieces, pos = [], 0
    for span in sorted(s for s in content_spans if s is not None):
        pieces.append((pos, span[0], False))
        pieces.append((span[0], span[1], True))
        pos = span[1]
    pieces.append((pos, len(text), False))
    ids, starts, ends = [], [], []
    for a, b, is_content in pieces:
        if a >= b:
            continue
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                        verbose=False, split_special_tokens=is_content)
        ids.extend(enc["input_ids"])
        starts.extend(a + o[0] for o in enc["offset_mapping"])
        ends.extend(a + o[1] for o in enc["offset_mapping"])
    return ids, starts, ends


def render_conversation(messages: Sequence[dict], tokenizer: Any, contents_as_text: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) of a conversation; the mask is 1 on assistant answers + their end-of-turn token."""
    r = render_detailed(messages, tokenizer, contents_as_text=contents_as_text)
    return r.input_ids, r.loss_mask


def assistant_mask_from_template(messages: Sequence[dict], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask) from transformers' `{% generation %}` markers, for templates that have them.

    Used to cross-check `render_conversation`; raises ValueError for templates without markers (their
    mask would be all zeros, which would silently train on nothing).
    """
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=False
    )
    mask = list(out["assistant_masks"])
    if any(m.get("role") == "assistant" for m in messages) and not any(mask):
        raise ValueError("the chat template has no {% generation %} markers: the assistant mask is empty")
    return list(out["input_ids"]), mask
