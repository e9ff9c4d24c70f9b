"""The served tiny model over HTTP (Ray Serve, the route `ctxforge serve` uses): routes, structured
outputs, logprobs (generated, prompt, echo) with their values checked against the model in-process,
batched prompts, null parameters, every request it cannot serve answered 400 naming the field before
any work, streaming equal to non-streaming for every parameter, auth, queueing, the official openai
client and lm-eval's chat client, and `ctxforge synth` over http against this endpoint.

One Ray Serve application for the whole module (Serve takes ~10 s to come up on 2 CPUs).
"""

from __future__ import annotations

import concurrent.futures
import json
import os

import httpx
import jsonschema
import pytest
from ports import free_port

API_KEY = "test-key-123"
KEY_ENV = "CTXFORGE_TEST_SERVE_KEY"
# Set before Ray starts, so the synthesis stage's http actors (Ray workers) inherit it.
os.environ[KEY_ENV] = API_KEY
WINDOW = 2048
EOS = 151645  # <|im_end|>

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 12},
                                           "year": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2}},
          "required": ["title", "year", "tags"], "additionalProperties": False}


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


@pytest.fixture(scope="module")
def lm(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


def _post(url, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=120)


def _stream(url, path, body):
    """All SSE events of a streamed request, parsed (the final [DONE] kept as the string)."""
    with httpx.stream("POST", url + path, json=dict(body, stream=True), timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200, r.read()
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _log_softmax(lm, ids):
    import torch
    with torch.inference_mode():
        return torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), dim=-1)


# --- routes -------------------------------------------------------------------------------------------

def test_models_route_lists_model_and_window(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["max_model_len"] == WINDOW


def test_health_route(served):
    base = served.removesuffix("/v1")
    assert httpx.get(base + "/health", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200


def test_chat_completion_matches_in_process_greedy_generate(client, lm, tiny_tokenizer):
    import torch

    messages = [{"role": "user", "content": "Name three rivers."}]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert resp.usage.completion_tokens == 12 and choice.finish_reason == "length"
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert resp.usage.prompt_tokens == len(ids)
    with torch.inference_mode():
        out = lm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert choice.message.content == tiny_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_stop_string_cuts_output(client):
    full = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0).choices[0].text
    stop = full[3:6]
    assert stop.strip(), full
    cut = client.completions.create(model="tiny", prompt="a b c", max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_continue_final_message_prefills_the_assistant_turn(served, tiny_tokenizer):
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": " Answer:"}]
    r = _post(served, "/chat/completions", {"messages": msgs, "max_tokens": 4, "temperature": 0, "continue_final_message": True})
    assert r.status_code == 200, r.text
    ids = tiny_tokenizer.apply_chat_template(msgs, continue_final_message=True, return_dict=True)["input_ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


# --- structured outputs ---------------------------------------------------------------------------------

def test_json_schema_response_format_is_honoured(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "book", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2, 3):
        resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A book, as JSON."}],
                                              max_tokens=120, temperature=1.0, seed=seed, response_format=fmt)
        jsonschema.validate(json.loads(resp.choices[0].message.content), SCHEMA)
    # negative control: the same request without the format is free text
    free = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A book, as JSON."}],
                                          max_tokens=40, temperature=1.0, seed=1)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_json_object_and_vllm_constraints_on_both_routes(served):
    body = {"prompt": "x", "max_tokens": 80, "temperature": 1.0, "seed": 4}
    # json_object bounds no string, so a random model may still be inside one when max_tokens ends;
    # every output the grammar let finish is a JSON object
    objs = _post(served, "/completions", dict(body, n=6, response_format={"type": "json_object"})).json()["choices"]
    finished = [c["text"] for c in objs if c["finish_reason"] == "stop"]
    assert finished and all(isinstance(json.loads(t), dict) for t in finished)
    assert all(c["text"].startswith("{") for c in objs)
    choice = _post(served, "/completions", dict(body, structured_outputs={"choice": ["red", "green", "blue"]})).json()
    assert choice["choices"][0]["text"] in {"red", "green", "blue"}
    regex = _post(served, "/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20,
                                                 "seed": 5, "guided_regex": "[0-9]{3}-[a-z]{2}"}).json()
    assert __import__("re").fullmatch("[0-9]{3}-[a-z]{2}", regex["choices"][0]["message"]["content"])


# --- logprobs -----------------------------------------------------------------------------------------------

def test_completion_logprobs_equal_the_models(served, lm, tiny_tokenizer):
    import torch

    body = {"prompt": "The river runs", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    lp = _post(served, "/completions", body).json()["choices"][0]["logprobs"]
    prompt = tiny_tokenizer.encode("The river runs", add_special_tokens=False)
    with torch.inference_mode():
        gen = lm.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None)[0, len(prompt):].tolist()
    ls = _log_softmax(lm, prompt + gen)
    assert lp["tokens"] == [tiny_tokenizer.decode([t]) for t in gen]
    assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    for i, (tok, got) in enumerate(zip(gen, lp["token_logprobs"])):
        row = ls[len(prompt) - 1 + i]
        assert got == pytest.approx(float(row[tok]), abs=1e-4)
        top = lp["top_logprobs"][i]
        assert len(top) == 3 and max(top.values()) == pytest.approx(got, abs=1e-6)  # greedy: chosen = argmax
        assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(5)]


def test_echo_logprobs_are_prompt_logprobs_as_lm_eval_reads_them(served, lm, tiny_tokenizer):
    """lm-eval's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1."""
    ctx = tiny_tokenizer.encode("Question: which is larger? Answer:", add_special_tokens=False)
    cont = tiny_tokenizer.encode(" the sea", add_special_tokens=False)
    body = {"prompt": [ctx + cont, ctx], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "seed": 1234}
    resp = _post(served, "/completions", body).json()
    first = sorted(resp["choices"], key=lambda c: c["index"])[0]["logprobs"]
    ids = ctx + cont
    assert len(first["token_logprobs"]) == len(ids) + 1 and first["token_logprobs"][0] is None
    assert first["top_logprobs"][0] is None
    ls = _log_softmax(lm, ids)
    want = [float(ls[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert first["token_logprobs"][1:len(ids)] == pytest.approx(want, abs=1e-4)
    # lm-eval: sum(token_logprobs[ctxlen:-1]) is the continuation's log-likelihood
    assert sum(first["token_logprobs"][len(ctx):-1]) == pytest.approx(sum(want[len(ctx) - 1:]), abs=1e-3)
    for i in range(1, len(ids)):
        top = first["top_logprobs"][i]
        assert max(top.values()) == pytest.approx(float(ls[i - 1].max()), abs=1e-4)
        assert first["tokens"][i] in top
    assert resp["usage"]["prompt_tokens"] == len(ids) + len(ctx)


def test_echo_with_max_tokens_zero_and_vllm_prompt_logprobs(served, lm, tiny_tokenizer):
    ids = tiny_tokenizer.encode("one two three four", add_special_tokens=False)
    c = _post(served, "/completions", {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0,
                                       "prompt_logprobs": 2}).json()["choices"][0]
    assert c["text"] == tiny_tokenizer.decode(ids) and len(c["logprobs"]["tokens"]) == len(ids)
    pl = c["prompt_logprobs"]
    ls = _log_softmax(lm, ids)
    assert pl[0] is None and len(pl) == len(ids)
    for i in range(1, len(ids)):
        entry = pl[i][str(ids[i])]
        assert entry["logprob"] == pytest.approx(float(ls[i - 1, ids[i]]), abs=1e-4)
        assert entry["rank"] == int((ls[i - 1] > ls[i - 1, ids[i]]).sum()) + 1
        assert {int(k) for k in pl[i]} >= set(ls[i - 1].topk(2).indices.tolist())


def test_chat_logprobs_and_top_logprobs(client):
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 4
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert bytes(c.bytes).decode() == c.token


# --- batches and nulls --------------------------------------------------------------------------------

def test_a_list_of_prompts_is_served_as_text_or_token_ids(served, tiny_tokenizer):
    prompts = ["alpha beta", "gamma", "delta epsilon zeta"]
    single = [_post(served, "/completions", {"prompt": p, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"]
              for p in prompts]
    as_text = _post(served, "/completions", {"prompt": prompts, "max_tokens": 4, "temperature": 0}).json()
    as_ids = _post(served, "/completions", {"prompt": [tiny_tokenizer.encode(p) for p in prompts], "max_tokens": 4,
                                            "temperature": 0}).json()
    for resp in (as_text, as_ids):
        assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
        assert [c["text"] for c in resp["choices"]] == single
        assert resp["usage"]["completion_tokens"] == 12


def test_null_sampling_parameters_mean_the_defaults(served):
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 5, "seed": 3}
    nulls = dict(body, temperature=None, top_p=None, n=None, stream=None, stop=None, logprobs=None, presence_penalty=None)
    a, b = _post(served, "/chat/completions", body), _post(served, "/chat/completions", nulls)
    assert a.status_code == b.status_code == 200, b.text
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]
    c = _post(served, "/completions", {"prompt": "x", "max_tokens": None, "temperature": None, "top_p": None,
                                       "n": None, "stream": None, "seed": 3})
    assert c.status_code == 200 and c.json()["usage"]["completion_tokens"] <= 16  # completions' default max_tokens


# --- right values of sampling fields -------------------------------------------------------------------

def test_logit_bias_allowed_tokens_min_tokens_and_stop_token_ids(served):
    base = {"prompt": "x", "temperature": 0}
    forced = _post(served, "/completions", dict(base, max_tokens=4, logit_bias={"15": 100})).json()["choices"][0]
    assert forced["text"] == "0000"
    allowed = _post(served, "/completions", dict(base, max_tokens=6, temperature=1.0, seed=1,
                                                 allowed_token_ids=[15, 16])).json()["choices"][0]
    assert set(allowed["text"]) <= {"0", "1"} and len(allowed["text"]) == 6
    eos = {"logit_bias": {str(EOS): 100}, "max_tokens": 8}
    r = _post(served, "/completions", dict(base, **eos)).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    r = _post(served, "/completions", dict(base, min_tokens=3, **eos)).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4
    r = _post(served, "/completions", dict(base, ignore_eos=True, **eos)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 8
    r = _post(served, "/completions", dict(base, max_tokens=8, logit_bias={"16": 100}, stop_token_ids=[16])).json()
    assert (r["choices"][0]["text"], r["choices"][0]["stop_reason"], r["usage"]["completion_tokens"]) == ("", 16, 1)


# --- requests that cannot be served: 400 naming the field, before any work ----------------------------

@pytest.mark.parametrize("path, body, field", [
    ("/completions", {"prompt": ""}, "prompt"),
    ("/completions", {"prompt": [""]}, "prompt.0"),
    ("/completions", {"prompt": ["ok", ""]}, "prompt.1"),
    ("/completions", {"prompt": []}, "prompt"),
    ("/completions", {"prompt": [[1, 2], []]}, "prompt.1"),
    ("/completions", {"prompt": [5, 999999999]}, "prompt"),
    ("/completions", {"prompt": [-1]}, "prompt"),
    ("/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("/completions", {"prompt": "x", "suffix": "tail"}, "suffix"),
    ("/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/completions", {"prompt": "x", "logit_bias": {"999999999": 1}}, "logit_bias"),
    ("/completions", {"prompt": "x", "stop_token_ids": [999999999]}, "stop_token_ids"),
    ("/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
     "response_format.json_schema.schema"),
    ("/completions", {"prompt": "x", "response_format": {"type": "json_schema",
                                                        "json_schema": {"name": "n", "schema": {"type": "no-such-type"}}}},
     "response_format.json_schema.schema"),
    ("/completions", {"prompt": "x", "response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ("/completions", {"prompt": "x", "structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ("/completions", {"prompt": "word " * 2100}, "prompt"),
    ("/chat/completions", {"max_tokens": 4}, "messages"),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 2.5}, "temperature"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, "n"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ messages }}"},
     "chat_template"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                           "chat_template_kwargs": {"chat_template": "{{ messages }}"}}, "chat_template_kwargs.chat_template"),
    ("/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
     "continue_final_message"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2100}, "messages"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_unservable_request_is_400_naming_the_field(served, path, body, field, stream):
    if stream and "stream_options" in body:
        pytest.skip("stream_options are valid with stream")
    r = _post(served, path, dict(body, stream=True) if stream else body)
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/json")  # not an empty event stream
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err


def test_invalid_json_and_unknown_model(served):
    r = httpx.post(served + "/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = _post(served, "/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# --- streaming equals non-streaming for every parameter --------------------------------------------------

COMMON = [
    {"temperature": 0}, {"seed": 7}, {"temperature": 0.7, "seed": 7}, {"top_p": 0.5, "seed": 7}, {"top_k": 5, "seed": 7},
    {"min_p": 0.5, "seed": 7}, {"n": 2, "seed": 7}, {"stop": ["e", "a"], "seed": 7},
    {"stop": ["e"], "include_stop_str_in_output": True, "seed": 7}, {"max_tokens": 2, "temperature": 0},
    {"presence_penalty": 1.5, "frequency_penalty": 1.0, "seed": 7}, {"repetition_penalty": 1.3, "seed": 7},
    {"logit_bias": {"15": 5.0}, "seed": 7}, {"allowed_token_ids": [15, 16, 17, 18], "seed": 7},
    {"stop_token_ids": [16], "logit_bias": {"16": 3.0}, "seed": 7}, {"ignore_eos": True, "min_tokens": 3, "seed": 7},
    {"response_format": {"type": "json_object"}, "seed": 7, "max_tokens": 20},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": SCHEMA}}, "seed": 7, "max_tokens": 40},
    {"structured_outputs": {"choice": ["yes", "no"]}, "seed": 7}, {"skip_special_tokens": False, "seed": 7},
    {"stream_options": {"include_usage": True}, "seed": 7},
]
COMPLETION_ONLY = [
    {"logprobs": 3, "temperature": 0}, {"echo": True, "seed": 7}, {"echo": True, "logprobs": 2, "seed": 7},
    {"prompt": [[15, 16, 17], [18, 19]], "n": 2, "seed": 7, "logprobs": 1},
    {"prompt": ["one", "two"], "echo": True, "seed": 7},
]
CHAT_ONLY = [
    {"logprobs": True, "temperature": 0}, {"logprobs": True, "top_logprobs": 3, "seed": 7},
    {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A: "}], "continue_final_message": True,
     "echo": True, "seed": 7},
    {"chat_template_kwargs": {}, "max_completion_tokens": 3, "seed": 7},
]


def _assemble(events, chat: bool) -> dict:
    """Stream events -> {index: (text, finish_reason, logprobs)} plus the usage chunk's usage."""
    out: dict = {}
    usage = None
    for e in events:
        if e.get("usage"):
            usage = e["usage"]
        for c in e["choices"]:
            text, finish, lp = out.get(c["index"], ("", None, None))
            text += (c["delta"].get("content") or "") if chat else c["text"]
            finish = c.get("finish_reason") or finish
            if c.get("logprobs"):
                if chat:
                    lp = (lp or []) + c["logprobs"]["content"]
                else:
                    lp = lp or {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
                    lp = {k: lp[k] + c["logprobs"][k] for k in lp}
            out[c["index"]] = (text, finish, lp)
    return {"choices": out, "usage": usage}


def _nonstream(resp: dict, chat: bool) -> dict:
    out = {}
    for c in resp["choices"]:
        text = c["message"]["content"] if chat else c["text"]
        lp = c["logprobs"] and (c["logprobs"]["content"] if chat else c["logprobs"])
        out[c["index"]] = (text, c["finish_reason"], lp)
    return {"choices": out, "usage": resp["usage"]}


@pytest.mark.parametrize("params", COMMON + COMPLETION_ONLY, ids=lambda p: ",".join(p))
def test_completions_stream_equals_non_stream(served, params):
    body = {"prompt": "Once upon a time", "max_tokens": 6, **params}
    stream_opts = body.pop("stream_options", None)
    full = _post(served, "/completions", body)
    assert full.status_code == 200, full.text
    streamed = _assemble(_stream(served, "/completions", dict(body, **({"stream_options": stream_opts} if stream_opts else {}))), chat=False)
    want = _nonstream(full.json(), chat=False)
    assert streamed["choices"] == want["choices"]
    if stream_opts:
        assert streamed["usage"] == want["usage"]


@pytest.mark.parametrize("params", COMMON + CHAT_ONLY, ids=lambda p: ",".join(p))
def test_chat_stream_equals_non_stream(served, params):
    body = {"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 6, **params}
    stream_opts = body.pop("stream_options", None)
    full = _post(served, "/chat/completions", body)
    assert full.status_code == 200, full.text
    events = _stream(served, "/chat/completions", dict(body, **({"stream_options": stream_opts} if stream_opts else {})))
    streamed = _assemble(events, chat=True)
    want = _nonstream(full.json(), chat=True)
    assert streamed["choices"] == want["choices"]
    if stream_opts:
        assert streamed["usage"] == want["usage"]
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"


# --- auth, queueing, clients ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, method", [("/v1/models", "GET"), ("/health", "GET"), ("/v1/chat/completions", "POST"),
                                          ("/v1/completions", "POST")])
def test_every_route_needs_the_api_key(served, path, method):
    import openai

    url = served.removesuffix("/v1") + path
    body = {"prompt": "x", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.request(method, url, json=body if method == "POST" else None, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError", (path, headers)
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


def test_lm_eval_local_chat_completions_works_unchanged(served, monkeypatch):
    """lm-evaluation-harness's `local-chat-completions` model (what `lm_eval --model local-chat-completions
    --model_args base_url=.../v1/chat/completions,model=tiny --apply_chat_template` builds)."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.api_models import JsonChatStr
    from lm_eval.models.openai_completions import LocalChatCompletion

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # lm-eval's local models send it as the bearer key
    lm_ = LocalChatCompletion(base_url=served + "/chat/completions", model="tiny", num_concurrent=2, max_retries=1,
                              max_gen_toks=6)
    chats = [json.dumps([{"role": "user", "content": f"Say something about {w}."}]) for w in ("rivers", "hills")]
    reqs = [Instance("generate_until", {}, (JsonChatStr(c), {"until": ["never-seen"], "max_gen_toks": 6}), i)
            for i, c in enumerate(chats)]
    outs = lm_.generate_until(reqs)
    direct = [_post(served, "/chat/completions", {"messages": json.loads(c), "max_tokens": 6, "temperature": 0,
                                                   "seed": 1234}).json()["choices"][0]["message"]["content"] for c in chats]
    assert outs == direct and all(outs), (lm_eval.__version__, outs)


# --- synthesis over http against this endpoint -----------------------------------------------------------

def test_synth_over_http_against_ctxforge_serve_ends_with_valid_qa(served, tmp_path):
    import pyarrow.parquet as pq

    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    out = tmp_path / "synth"
    cfg = load_config(SynthConfig, "tiny", [
        f"output.dir={out}", "input.limit=1", "input.max_document_tokens=800", "generator.summary_max_tokens=64",
        "generator.qa_max_tokens=96", "qa.hierarchical_per_document=2", "qa.diverse_per_document=1",
        "concat.n1_hierarchical=1", "concat.n1_diverse=1", "concat.n2_earlier_diverse=0", "concat.n3_followups=0",
        "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 1}]", "runtime.progress=false",
        "generator.backend=http", f"generator.base_url={served}", "generator.model=tiny", f"generator.api_key_env={KEY_ENV}",
        "generator.concurrency=2", f"generator.max_model_len={WINDOW}", "generator.max_attempts=3"])
    synthesize(cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["requests"]["total"]
    assert total["ok"] > 0 and not [r for r in manifest["failures_by_reason"] if r.startswith("backend")]
    qa = pq.read_table(out / "qa" / "qa.parquet").to_pylist()
    assert qa and all(r["question"] and r["answer"] for r in qa)
