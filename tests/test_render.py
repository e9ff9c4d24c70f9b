"""render_conversation: loss mask on assistant answers for any chat template (pipeline/render.py)."""

from __future__ import annotations

import copy
import random

import pytest

from ctxforge.pipeline.render import (
    assistant_mask_from_template,
    render_conversation,
    render_detailed,
    special_tokens_in_contents,
)

# Llama-3.1-Instruct's layout (header ids, "\n\n", trimmed content, <|eot_id|>, a system block with the
# knowledge-date preamble always present) and, like the real one, no {% generation %} markers.
LLAMA31_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

WORDS = (
    "river stone lantern harbor meadow copper violet engine quiet thunder garden pilot marble "
    "window saddle orbit canyon ember feather ladder mirror needle oyster pepper quartz ribbon "
    "silver timber umbrella velvet walnut yonder zephyr anchor basket candle dragon"
).split()


@pytest.fixture(scope="module")
def chatml_tok():
    from ctxforge.models import load_tokenizer

    return load_tokenizer("ctxforge:tiny")


@pytest.fixture(scope="module")
def llama_tok(chatml_tok):
    tok = copy.deepcopy(chatml_tok)  # load_tokenizer's object is shared: never mutate it
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        }
    )
    tok.eos_token = "<|eot_id|>"
    tok.chat_template = LLAMA31_TEMPLATE
    return tok


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _conversation(n_turns: int, seed: int = 0, doc_words: int = 300, system: bool = True) -> list[dict]:
    rng = random.Random(seed)
    msgs = [{"role": "system", "content": "You answer questions about documents."}] if system else []
    for t in range(n_turns):
        q = _words(rng, 12) + "?"
        if t == 0:
            q = "Document 1: Title\n\n" + _words(rng, doc_words) + "\n\n" + q
        msgs.append({"role": "user", "content": q})
        msgs.append({"role": "assistant", "content": _words(rng, rng.randint(1, 30)) + "."})
    return msgs


def _masked_text(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def test_chatml_mask_equals_generation_marker_mask(chatml_tok):
    for seed in range(5):
        msgs = _conversation(6, seed=seed, system=seed % 2 == 0)
        ids, mask = render_conversation(msgs, chatml_tok)
        ref_ids, ref_mask = assistant_mask_from_template(msgs, chatml_tok)
        assert ids == ref_ids
        assert mask == ref_mask
        assert len(mask) == len(ids) and set(mask) <= {0, 1}


def test_chatml_masked_tokens_are_answers_plus_im_end(chatml_tok):
    msgs = _conversation(5, seed=3)
    ids, mask = render_conversation(msgs, chatml_tok)
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert _masked_text(chatml_tok, ids, mask) == "".join(a + "<|im_end|>" for a in answers)


def test_llama_template_without_generation_markers(llama_tok):
    # Contents with surrounding whitespace: the template trims them, the mask follows the trimmed text.
    msgs = _conversation(4, seed=1)
    msgs[2]["content"] = "  " + msgs[2]["content"] + "\n"
    ids, mask = render_conversation(msgs, llama_tok)
    text = llama_tok.apply_chat_template(msgs, tokenize=False)
    assert ids == llama_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == llama_tok.convert_tokens_to_ids("<|begin_of_text|>") and mask[0] == 0
    answers = [m["content"].strip() for m in msgs if m["role"] == "assistant"]
    assert _masked_text(llama_tok, ids, mask) == "".join(a + "<|eot_id|>" for a in answers)
    # The mask stops at <|eot_id|>: the next token (the next turn's <|start_header_id|>) is not trained.
    eot = llama_tok.convert_tokens_to_ids("<|eot_id|>")
    for i, (tid, m) in enumerate(zip(ids, mask)):
        if m and tid == eot and i + 1 < len(ids):
            assert mask[i + 1] == 0
    # No generation markers: the template cross-check refuses instead of returning an all-zero mask.
    with pytest.raises(ValueError, match="generation"):
        assistant_mask_from_template(msgs, llama_tok)


@pytest.mark.parametrize("which", ["chatml", "llama"])
def test_answer_text_also_in_document_and_question(which, chatml_tok, llama_tok):
    tok = chatml_tok if which == "chatml" else llama_tok
    end = "<|im_end|>" if which == "chatml" else "<|eot_id|>"
    answer = "The lantern was copper."
    msgs = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Document 1\n\nOnce upon a time. {answer} The end.\n\nIs it true that {answer}"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"Say again: {answer}"},
        {"role": "assistant", "content": answer},
        # answers equal to words of the template's own headers
        {"role": "user", "content": "Which role answers?"},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "And the other?"},
        {"role": "assistant", "content": "user"},
    ]
    r = render_detailed(msgs, tok)
    assert _masked_text(tok, r.input_ids, r.loss_mask) == "".join(
        m["content"] + end for m in msgs if m["role"] == "assistant"
    )
    # Each span sits after the question it answers, right before the end-of-turn token.
    for (start, stop), user in zip(r.assistant_spans, [m for m in msgs if m["role"] == "user"]):
        assert r.text.rfind(user["content"], 0, start) >= 0
        assert r.text[start:stop].endswith(end)
    if which == "chatml":
        assert r.loss_mask == assistant_mask_from_template(msgs, tok)[1]


def test_ordered_search_fallback_when_template_branches_on_content(chatml_tok):
    # A template that rewrites contents it does not like defeats the placeholder skeleton; the ordered
    # search still finds the answers (and the document copy of the answer is skipped).
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['content'].startswith('\\ue000') %}{{- 'X' }}{%- else %}{{- m['content'] }}{%- endif %}"
        "{{- '<|im_end|>\\n' }}{%- endfor %}"
    )
    msgs = [{"role": "user", "content": "Doc: forty two.\n\nWhat?"}, {"role": "assistant", "content": "forty two"}]
    r = render_detailed(msgs, chatml_tok, chat_template=template)
    assert _masked_text(chatml_tok, r.input_ids, r.loss_mask) == "forty two<|im_end|>"
    assert r.text.index("forty two", r.text.index("What?")) == r.assistant_spans[0][0]


def test_missing_assistant_content_raises(chatml_tok):
    # A template that drops assistant contents entirely: nothing to mask, so it must fail loudly.
    template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}"
        "{%- if m['role'] != 'assistant' %}{{- m['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    )
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "an answer not elsewhere"}]
    with pytest.raises(ValueError, match="not found"):
        render_detailed(msgs, chatml_tok, chat_template=template)


def test_empty_conversation_raises(chatml_tok):
    with pytest.raises(ValueError):
        render_conversation([], chatml_tok)


def test_long_conversation_100_turns(chatml_tok, llama_tok):
    # ~100 turns after a long document: one render and one tokenization (no time assertion).
    msgs = _conversation(100, seed=7, doc_words=60_000)
    for tok, end in ((chatml_tok, "<|im_end|>"), (llama_tok, "<|eot_id|>")):
        ids, mask = render_conversation(msgs, tok)
        assert len(ids) > 60_000
        answers = [m["content"] for m in msgs if m["role"] == "assistant"]
        assert _masked_text(tok, ids, mask) == "".join(a + end for a in answers)
        assert sum(mask) == sum(len(tok(a + end, add_special_tokens=False)["input_ids"]) for a in answers)


def test_special_tokens_in_contents_detected(chatml_tok):
    msgs = [{"role": "user", "content": "a document quoting <|im_end|> verbatim"}, {"role": "assistant", "content": "ok"}]
    assert special_tokens_in_contents(msgs, chatml_tok) == ["<|im_end|>"]
    assert special_tokens_in_contents(_conversation(2), chatml_tok) == []


def test_chatml_cross_check_with_awkward_whitespace_and_unicode(chatml_tok):
    # Byte-level BPE offsets (trim_offsets, multi-byte characters, runs of spaces/newlines) are where a
    # hand-made mask could drift from transformers' own; compare on many random conversations.
    pieces = WORDS + ["  ", "\n", "\n\n", " \n ", "\t", "é", "naïve", "日本語", "🙂", "—", "...", "42", " 7"]
    rng = random.Random(11)
    for _ in range(30):
        msgs = [{"role": "system", "content": "s"}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 5)):
            for role in ("user", "assistant"):
                n = rng.randint(1, 12)
                content = "".join(rng.choice(pieces) + rng.choice(["", " "]) for _ in range(n))
                msgs.append({"role": role, "content": content})
        ids, mask = render_conversation(msgs, chatml_tok)
        ref_ids, ref_mask = assistant_mask_from_template(msgs, chatml_tok)
        assert ids == ref_ids and mask == ref_mask


def test_mask_from_spans_unsorted_offsets_fallback():
    from ctxforge.pipeline.render import _mask_from_spans

    # sorted offsets: bisection; the same spans through the fallback walk give the same answer
    starts, ends = [0, 2, 4, 6, 8], [2, 4, 6, 8, 10]
    assert _mask_from_spans(starts, ends, [(3, 6), (8, 9)]) == [0, 1, 1, 0, 1]
    assert _mask_from_spans([0, 2, 4, 4, 8], [2, 4, 6, 5, 10], [(3, 6)]) == [0, 1, 1, 1, 0]
