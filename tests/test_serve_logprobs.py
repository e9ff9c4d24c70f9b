"""Logprobs of the hf serving path against the reference in-process computation (transformers forward +
log_softmax on the tiny model), without Ray: the top-k are the true top-k by id, lm-eval's `is_greedy`
is right at every position (also where two token ids decode to the same text), and each token's
`bytes` are its own, so a character split over several tokens is rebuilt from them, streamed or not."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI, Request

from ctxforge.serve import responses as r
from ctxforge.serve.sampling import TokenLogprob
from routes_app import routes_app

# Many characters the tiny (Qwen2) vocabulary holds only as several byte tokens, each reading U+FFFD alone.
SPLIT_TEXT = "𓀀 🫠 ꙮ 𝔘 ᚠ 𓀀𓀀 naïve 🫠🫠"


def lm_eval_is_greedy(logprobs: dict, start: int) -> list[bool]:
    """lm-eval's local-completions rule (openai_completions.parse_logprobs), per position from `start`:
    a position is greedy when the chosen token's logprob is the largest in its top_logprobs."""
    return [tok == max(top.values()) for tok, top in
            zip(logprobs["token_logprobs"][start:], logprobs["top_logprobs"][start:])]


def _keyed_first_wins(names, rec, k):
    """The former completions rule (chosen token first, a repeated text keeps the first logprob): the
    negative control, which makes a chosen token below rank 1 look greedy."""
    top = {names.name(rec.token_id): rec.logprob}
    for alt, lp in rec.top[:k]:
        top.setdefault(names.name(alt), lp)
    return top


# --- the dict rule, on a constructed collision (fast, no model) ----------------------------------------

def test_a_chosen_token_sharing_its_text_with_the_top_token_is_not_greedy():
    names = r.Tokens(text=lambda i: "\ufffd" if i in (7, 9) else f"t{i}", raw=lambda i: bytes([i]))
    rank52 = TokenLogprob(token_id=9, logprob=-6.5, rank=52, top=[(7, -0.2)])  # both read U+FFFD
    top = r.top_dict(names, rank52, 1)
    assert top == {"\ufffd": -0.2} and max(top.values()) != rank52.logprob
    assert max(_keyed_first_wins(names, rank52, 1).values()) == rank52.logprob  # the old rule: "greedy"
    greedy = TokenLogprob(token_id=7, logprob=-0.2, rank=1, top=[(7, -0.2), (9, -6.5)])
    assert max(r.top_dict(names, greedy, 2).values()) == greedy.logprob
    # k > 1 and a lower-ranked alternative sharing the top token's text: the top logprob stays visible
    hidden = TokenLogprob(token_id=3, logprob=-0.5, rank=1, top=[(3, -0.5), (4, -1.0), (7, -3.0)])
    names2 = r.Tokens(text=lambda i: "x" if i in (3, 7) else f"t{i}", raw=lambda i: b"")
    assert max(r.top_dict(names2, hidden, 3).values()) == -0.5
    as_ids = r.Tokens(names.text, names.raw, as_ids=True)
    assert r.top_dict(as_ids, rank52, 1) == {"token_id:9": -6.5, "token_id:7": -0.2}


# --- token bytes ------------------------------------------------------------------------------------------

def test_token_bytes_rebuild_text_that_splits_characters(tiny_tokenizer):
    from ctxforge.serve.token_bytes import TokenBytes

    tb = TokenBytes(tiny_tokenizer)
    text = SPLIT_TEXT + " <|im_end|> ẞ 日本語"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    alone = [tiny_tokenizer.decode([i]) for i in ids]
    assert "\ufffd" in alone  # the case: tokens holding part of a character
    assert b"".join(tb(i) for i in ids) == text.encode("utf-8")
    assert b"".join(s.encode("utf-8", errors="replace") for s in alone) != text.encode("utf-8")  # negative control


# --- the served path in-process -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_model_path):
    import torch

    from ctxforge.serve.served_model import HFServedModel

    torch.set_num_threads(1)
    return HFServedModel(tiny_model_path, "tiny", 2048, device="cpu")


@pytest.fixture(scope="module")
def app(engine):
    return routes_app(engine)


def _post(app, path, body) -> httpx.Response:
    import asyncio

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=300) as c:
            return await c.post(path, json=body)
    return asyncio.run(go())


def _events(resp: httpx.Response) -> list[dict]:
    lines = [x.removeprefix("data: ") for x in resp.text.splitlines() if x]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def _reference(engine, ids):
    """[len(ids), vocab] log-softmax of the model's own forward pass (the reference computation)."""
    import torch
    with torch.inference_mode():
        return torch.log_softmax(engine.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def _prefix_predicting_a_byte_token(engine, tokenizer):
    """(prefix ids, the model's top token after them) where that token reads U+FFFD alone."""
    for text in [SPLIT_TEXT[:n] for n in range(1, len(SPLIT_TEXT))] + ["The river", "日本", "Hello"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        top = int(_reference(engine, ids)[-1].argmax())
        if engine.token_text(top) == "\ufffd":
            return ids, top
    pytest.fail("no prefix found whose most likely next token is a byte token")


def test_is_greedy_is_right_where_two_ids_read_the_same_text(app, engine, tiny_tokenizer):
    prefix, top = _prefix_predicting_a_byte_token(engine, tiny_tokenizer)
    row = _reference(engine, prefix)[-1]
    # another byte token, also reading U+FFFD, below rank 1
    byte_ids = [int(i) for i in row.argsort(descending=True)[1:400] if engine.token_text(int(i)) == "\ufffd"]
    assert byte_ids, "no other byte token among the 400 most likely"
    other = byte_ids[-1]
    for chosen, greedy in ((top, True), (other, False)):
        ids = prefix + [chosen]
        body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
        lp = _post(app, "/v1/completions", body).json()["choices"][0]["logprobs"]
        assert lp["tokens"][len(prefix)] == "\ufffd"
        assert lm_eval_is_greedy(lp, len(prefix))[0] is greedy, (chosen, lp["top_logprobs"][len(prefix)])


def test_echo_logprobs_match_the_reference_at_every_position(app, engine, tiny_tokenizer):
    ids = tiny_tokenizer.encode("Question: " + SPLIT_TEXT + " Answer: the river", add_special_tokens=False)
    ls = _reference(engine, ids)
    body = {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 3}
    lp = _post(app, "/v1/completions", body).json()["choices"][0]["logprobs"]
    greedy_ref = [int(ls[i - 1].argmax()) == ids[i] for i in range(1, len(ids))]
    assert lm_eval_is_greedy(lp, 1) == greedy_ref
    assert True in greedy_ref and False in greedy_ref
    for i in range(1, len(ids)):
        assert lp["token_logprobs"][i] == pytest.approx(float(ls[i - 1, ids[i]]), abs=1e-4)
    # by id: return_tokens_as_token_ids names each key by its id, so the top-k can be compared exactly
    lp_ids = _post(app, "/v1/completions", dict(body, return_tokens_as_token_ids=True)).json()["choices"][0]["logprobs"]
    assert lp_ids["tokens"] == [f"token_id:{t}" for t in ids]
    for i in range(1, len(ids)):
        want = {f"token_id:{t}" for t in ls[i - 1].topk(3).indices.tolist()} | {f"token_id:{ids[i]}"}
        assert set(lp_ids["top_logprobs"][i]) == want
        for key, value in lp_ids["top_logprobs"][i].items():
            assert value == pytest.approx(float(ls[i - 1, int(key.split(":")[1])]), abs=1e-4)


def _split_choice():
    return {"structured_outputs": {"choice": [SPLIT_TEXT]}, "temperature": 0, "max_tokens": 80}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_bytes_rebuild_a_character_split_across_tokens(app, engine, stream):
    body = {"messages": [{"role": "user", "content": "Say it."}], "logprobs": True, "top_logprobs": 2, **_split_choice()}
    resp = _post(app, "/v1/chat/completions", dict(body, stream=stream))
    if stream:
        events = _events(resp)
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        content = [x for e in events for c in e["choices"] if c.get("logprobs") for x in c["logprobs"]["content"]]
    else:
        choice = resp.json()["choices"][0]
        text, content = choice["message"]["content"], choice["logprobs"]["content"]
    assert text == SPLIT_TEXT and content[-1]["token"] == "<|im_end|>"
    content = content[:-1]  # the end-of-turn token is counted and has its logprob, but is no part of the text (vLLM)
    assert any(x["token"] == "\ufffd" for x in content)  # the case: characters split across tokens
    assert b"".join(bytes(x["bytes"]) for x in content) == text.encode("utf-8")
    for x in content:  # the alternatives too: bytes are the token's own, top_logprobs in rank order
        assert [a["logprob"] for a in x["top_logprobs"]] == sorted((a["logprob"] for a in x["top_logprobs"]), reverse=True)


def test_chat_top_logprobs_are_the_true_top_k_by_id(app, engine, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Name a river."}]
    resp = _post(app, "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "temperature": 0, "logprobs": True,
                                               "top_logprobs": 4}).json()
    content = resp["choices"][0]["logprobs"]["content"]
    prompt = engine.encode_chat(msgs, True, False)
    gen = []
    ids = list(prompt)
    for x in content:  # greedy: each chosen token is the reference's rank 1; alternatives are its top-4 by id
        row = _reference(engine, ids)[-1]
        top = row.topk(4)
        assert [a["bytes"] for a in x["top_logprobs"]] == [list(engine.token_bytes(int(t))) for t in top.indices]
        assert [a["logprob"] for a in x["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
        ids.append(int(top.indices[0]))
        gen.append(ids[-1])
    assert b"".join(bytes(x["bytes"]) for x in content) == b"".join(engine.token_bytes(t) for t in gen)


# --- prompt logprobs in bounded memory ------------------------------------------------------------------

def test_chunked_prompt_logprobs_equal_the_unchunked_reference(engine, tiny_tokenizer):
    import torch

    from ctxforge.serve.served_model import chunked_prompt_logprobs

    ids = tiny_tokenizer.encode("The river runs to the sea, " + SPLIT_TEXT, add_special_tokens=False)
    ls = _reference(engine, ids)
    with torch.inference_mode():
        hidden = engine.model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0]
        head = engine.model.get_output_embeddings()
        small = chunked_prompt_logprobs(hidden, head, ids, 3, chunk_tokens=4)
        whole = chunked_prompt_logprobs(hidden, head, ids, 3, chunk_tokens=len(ids))
    assert small[0] is None and len(small) == len(ids)
    for i in range(1, len(ids)):
        a, b, row = small[i], whole[i], ls[i - 1]
        assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
        assert a.logprob == pytest.approx(float(row[ids[i]]), abs=1e-4)
        assert a.rank == int((row > row[ids[i]]).sum()) + 1
        assert [t for t, _ in a.top] == row.topk(3).indices.tolist()
        assert [v for _, v in a.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


_PEAK = r"""
import re, sys, torch
from ctxforge.serve.served_model import HFServedModel


def status(key):  # kB, from the kernel's own accounting of this process
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


torch.set_num_threads(1)
mode, n = sys.argv[1], int(sys.argv[2])
engine = HFServedModel(sys.argv[3], "tiny", n + 8, device="cpu", logprobs_chunk_tokens=64)
ids = [int(t) for t in torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(0))]
engine._prefill({}, ids[:64], 0, 64, 1)  # warm-up: everything but the long prompt's own cost
# Loading the model can peak above what one prefill adds, so the peak is reset here (Linux: writing 5 to
# clear_refs resets VmHWM to the current RSS) and the growth is the new peak over the RSS now.
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
if mode == "chunked":
    records = engine._prefill({}, ids, 0, n, 1)[1]
else:  # the unchunked reference: the whole prompt's logits and their log-softmax at once
    with torch.inference_mode():
        full = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
print((status("VmHWM") - base) * 1024)
"""


@pytest.mark.slow  # two engine start-ups in subprocesses (about two minutes on 2 CPUs)
def test_prompt_logprobs_memory_does_not_grow_with_prompt_times_vocabulary(tiny_model_path):
    """Peak RSS growth of one 1K-token prefill with prompt logprobs, chunked vs the whole [n, vocab]
    logits (a ratio, each in its own process, the peak reset after the model is loaded)."""
    import subprocess
    import sys

    def growth(mode):
        out = subprocess.run([sys.executable, "-c", _PEAK, mode, "1024", tiny_model_path], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    full, chunked = growth("full"), growth("chunked")
    assert full > 1024 * 151_000 * 4  # the reference holds [1024, vocab] fp32 logits at least
    print(f"peak RSS growth at 1024 prompt tokens: whole-prompt logits {full / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB")
    assert chunked * 4 < full, (chunked, full)


def test_prompt_logprobs_above_the_limit_are_refused_naming_it(engine, tiny_tokenizer):
    from ctxforge.serve.routes import OpenAIRoutes

    routes = OpenAIRoutes(engine, prompt_logprobs_max_tokens=8)
    api = FastAPI()

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await routes.handle(request, chat=False)

    ids = list(range(100, 109))
    for body, param in (({"prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 1}, "prompt"),
                        ({"prompt": [ids[:4], ids], "prompt_logprobs": 0, "max_tokens": 1}, "prompt.1")):
        resp = _post(api, "/v1/completions", body)
        assert resp.status_code == 400, resp.text
        err = resp.json()["error"]
        assert err["param"] == param and "prompt_logprobs_max_tokens" in err["message"] and "9" in err["message"]
    assert _post(api, "/v1/completions", {"prompt": ids[:8], "echo": True, "logprobs": 1, "max_tokens": 1}).status_code == 200
    assert _post(api, "/v1/completions", {"prompt": ids, "max_tokens": 1}).status_code == 200  # no logprobs: served


# --- a long prompt is prefilled in spans: other requests step between them -----------------------------

@pytest.fixture
def small_spans(engine):
    engine.prefill_chunk_tokens = 7
    yield engine
    engine.prefill_chunk_tokens = 1024


def test_prompt_logprobs_over_prefill_spans_equal_the_reference(app, small_spans, tiny_tokenizer):
    ids = tiny_tokenizer.encode("The river runs to the sea, " + SPLIT_TEXT + " and back", add_special_tokens=False)
    assert len(small_spans._prefill_spans(len(ids))) > 3
    ls = _reference(small_spans, ids)
    c = _post(app, "/v1/completions", {"prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2,
                                       "prompt_logprobs": 2}).json()["choices"][0]
    assert c["prompt_logprobs"][0] is None and len(c["prompt_logprobs"]) == len(ids)
    for i in range(1, len(ids)):
        assert c["logprobs"]["token_logprobs"][i] == pytest.approx(float(ls[i - 1, ids[i]]), abs=1e-4)
        assert set(c["prompt_logprobs"][i]) >= {str(t) for t in ls[i - 1].topk(2).indices.tolist()}
    # the generation after a spanned prefill is the model's greedy continuation
    import torch
    with torch.inference_mode():
        gen = small_spans.model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert c["text"] == tiny_tokenizer.decode(ids) + tiny_tokenizer.decode(gen[0, len(ids):])


def test_a_short_request_finishes_while_a_long_prompt_is_prefilled(small_spans):
    import asyncio

    from ctxforge.serve.sampling import SamplingParams

    long_ids = list(range(1000, 1000 + 7 * 12))  # 12 spans
    order = []

    async def run(name, ids, params):
        async for step in small_spans.generate(ids, params):
            order.append((name, step.finish_reason))

    async def main():
        long = asyncio.create_task(run("long", long_ids, SamplingParams(max_tokens=1, temperature=0)))
        await asyncio.sleep(0)  # the long prompt's first span is with the worker
        await run("short", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0))
        await long

    asyncio.run(main())
    assert order[0][0] == "short" and ("short", "length") in order
    assert order.index(("short", "length")) < order.index(("long", "length"))
