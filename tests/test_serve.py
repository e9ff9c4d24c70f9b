"""The served tiny model over HTTP: routes, streaming, window errors, validation errors, auth, queueing.

One Ray Serve application for the whole module (Serve takes ~10 s to come up on 2 CPUs).
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest
from ports import free_port

API_KEY = "test-key-123"
WINDOW = 512

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(ray_local, tiny_model_path):
    from ray import serve

    from ctxforge.serve.app import run_app
    from ctxforge.serve.config import ServeConfig

    # max_ongoing_requests=2 so that the concurrency test really exercises Serve's queue.
    cfg = ServeConfig(model=tiny_model_path, served_model_name="tiny", port=free_port(), max_model_len=WINDOW,
                      max_ongoing_requests=2, app_name="test-serve")
    url = run_app(cfg, api_key=API_KEY)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    import openai
    return openai.OpenAI(base_url=served, api_key=API_KEY, max_retries=0, timeout=120)


def _post(url, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def test_models_route_lists_model_and_window(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == WINDOW


def test_health_route(served):
    base = served.removesuffix("/v1")
    assert httpx.get(base + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_chat_completion_matches_in_process_greedy_generate(client, tiny_model_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    messages = [{"role": "user", "content": "Name three rivers."}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert resp.usage.completion_tokens == 12 and choice.finish_reason == "length"

    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert resp.usage.prompt_tokens == len(ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    expected = tiny_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert choice.message.content == expected


def test_chat_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_completions_route_streaming_and_not(client):
    full = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert full.usage.completion_tokens == 8 and full.choices[0].text
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text


def test_stop_string_cuts_output(client):
    full = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0).choices[0].text
    stop = full[3:6]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_continue_final_message_prefills_the_assistant_turn(served, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " Answer:"}]
    body = {"messages": msgs, "max_tokens": 4, "temperature": 0, "continue_final_message": True}
    r = _post(served, "/chat/completions", body)
    assert r.status_code == 200, r.text
    ids = tiny_tokenizer.apply_chat_template(msgs, continue_final_message=True, return_dict=True)["input_ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_over_length_prompt_is_400_with_both_token_counts(client, served, tiny_tokenizer):
    import openai

    long_prompt, mid_prompt = "word " * 700, "word " * 500
    n_long, n_mid = len(tiny_tokenizer.encode(long_prompt)), len(tiny_tokenizer.encode(mid_prompt))
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4)
    msg = str(exc.value)
    assert f"maximum context length is {WINDOW}" in msg and f"{n_long} tokens" in msg
    # prompt fits but prompt + max_tokens does not: also 400, naming both parts
    r = _post(served, "/completions", {"prompt": mid_prompt, "max_tokens": 100})
    assert r.status_code == 400 and f"{n_mid} in the prompt, 100 in the completion" in r.json()["error"]["message"]
    # negative control: the same prompt with a budget that fits is served
    assert _post(served, "/completions", {"prompt": mid_prompt, "max_tokens": 4}).status_code == 200


@pytest.mark.parametrize("body, field", [
    ({"max_tokens": 4}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
])
def test_malformed_request_is_400_naming_the_field(served, body, field):
    r = _post(served, "/chat/completions", body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


def test_invalid_json_and_unknown_model(served):
    r = httpx.post(served + "/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(served, "/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/health", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/v1/completions", "POST")])
def test_every_route_needs_the_api_key(served, path, method):
    import openai

    url = served.removesuffix("/v1") + path
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.request(method, url, json=body if method == "POST" else None, headers=headers, timeout=30)
        assert r.status_code == 401, (path, headers)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()


def test_many_concurrent_requests_are_queued_not_dropped(client):
    def one(i):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"request {i}"}],
                                           max_tokens=3, temperature=0)
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(24)))
    assert results == [3] * 24


def test_sse_wire_format_ends_with_done(served):
    with httpx.stream("POST", served + "/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_lm_eval_local_chat_completions_works_unchanged(served, monkeypatch):
    """lm-evaluation-harness's `local-chat-completions` model (what `lm_eval --model local-chat-completions
    --model_args base_url=.../v1/chat/completions,model=tiny --apply_chat_template` builds)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # lm-eval's local models send it as the bearer key
    lm = LocalChatCompletion(base_url=served + "/chat/completions", model="tiny", num_concurrent=2, max_retries=1,
                             max_gen_toks=6)
    chats = [json.dumps([{"role": "user", "content": f"Say something about {w}."}]) for w in ("rivers", "hills")]
    reqs = [Instance("generate_until", {}, (JsonChatStr(c), {"until": ["never-seen"], "max_gen_toks": 6}), i)
            for i, c in enumerate(chats)]
    outs = lm.generate_until(reqs)
    direct = [_post(served, "/chat/completions", {"messages": json.loads(c), "max_tokens": 6, "temperature": 0,
                                                   "seed": 1234}).json()["choices"][0]["message"]["content"] for c in chats]
    assert outs == direct and all(outs), (lm_eval.__version__, outs)
