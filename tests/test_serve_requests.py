"""What a request may ask of the hf serving path (fast, without Ray or a model): every OpenAI and vLLM
request field is served or refused with a 400 naming it (a table), role `developer` reaches the template
as vLLM hands it over, client chat templates are refused unless the operator trusts them, and a request
whose template rendering (or tokenization) is slow delays neither /v1/models, /health nor other requests."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
from fastapi import FastAPI

from ctxforge.serve.served_model import ServedModel, Step
from routes_app import routes_app

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{% if enable_thinking %}<think>{% endif %}")


class RecordingEngine(ServedModel):
    """Records what it is asked to render; a conversation containing HEAVY renders until released."""
    model_id, max_model_len = "fake", 1000

    def __init__(self):
        self.rendered: list[tuple[list[dict], dict]] = []
        self.prompts: list[tuple] = []
        self.rendering = threading.Event()
        self.release = threading.Event()

    def encode_chat(self, messages, add_generation_prompt, continue_final_message, **kw):
        if any("HEAVY" in m["content"] for m in messages):
            self.rendering.set()
            self.release.wait(30)  # bounded: a regression fails the ordering assertions instead of hanging
        self.rendered.append((messages, kw))
        return [1, 2, 3]

    def chat_template_source(self, override=None):
        return override or CHATML

    def encode_prompt(self, prompt, add_special_tokens=True):
        self.prompts.append((prompt, add_special_tokens))
        return [1, 2, 3] if isinstance(prompt, str) else prompt

    def decode(self, ids):
        return "x" * len(ids)

    def token_text(self, token_id):
        return "x"

    def vocab_limit(self):
        return 100

    def compile_constraint(self, kind, value):
        return None

    async def generate(self, prompt_ids, params):
        yield Step("ok", [5], finish_reason="length", prompt_tokens=len(prompt_ids), completion_tokens=1)


def _app(engine, **opts) -> FastAPI:
    return routes_app(engine, **opts)


def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


async def _post(app, path, body):
    async with _client(app) as c:
        return await c.post(path, json=body)


USER = [{"role": "user", "content": "hi"}]

# --- every field: served, or refused naming it ----------------------------------------------------------

REFUSED = [
    # OpenAI chat
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"tool_choice": "auto"}, "tool_choice"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("chat", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("chat", {"verbosity": "low"}, "verbosity"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"store": True}, "store"),
    ("chat", {"metadata": {"k": "v"}}, "metadata"),
    ("chat", {"service_tier": "flex"}, "service_tier"),
    ("chat", {"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
    # OpenAI messages
    ("chat", {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages.0.role"),
    ("chat", {"messages": [{"role": "function", "content": "42", "name": "f"}]}, "messages.0.role"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name"),
    ("chat", {"messages": USER + [{"role": "assistant", "content": None,
                                   "tool_calls": [{"id": "c1", "type": "function"}]}]}, "messages.1.tool_calls"),
    ("chat", {"messages": USER + [{"role": "assistant", "content": "x", "refusal": "no"}]}, "messages.1.refusal"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
     "messages.0.content"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "messages.0.content"),
    # vLLM chat
    ("chat", {"documents": [{"title": "t", "text": "x"}]}, "documents"),
    ("chat", {"add_special_tokens": True}, "add_special_tokens"),
    ("chat", {"mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs"),
    ("chat", {"include_reasoning": False}, "include_reasoning"),
    ("chat", {"thinking_token_budget": 10}, "thinking_token_budget"),
    ("chat", {"return_assistant_tokens_mask": True}, "return_assistant_tokens_mask"),
    ("chat", {"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs.tokenize"),
    ("chat", {"chat_template_kwargs": {"no_such_variable": 1}}, "chat_template_kwargs.no_such_variable"),
    # OpenAI completions
    ("text", {"suffix": "tail"}, "suffix"),
    ("text", {"best_of": 2}, "best_of"),
    # vLLM (both routes)
    ("text", {"use_beam_search": True}, "use_beam_search"),
    ("text", {"length_penalty": 0.5}, "length_penalty"),
    ("text", {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ("text", {"truncation_side": "left"}, "truncation_side"),
    ("text", {"bad_words": ["x"]}, "bad_words"),
    ("text", {"prompt_embeds": "AAAA"}, "prompt_embeds"),
    ("text", {"logprob_token_ids": [1]}, "logprob_token_ids"),
    ("text", {"priority": 1}, "priority"),
    ("text", {"spaces_between_special_tokens": False}, "spaces_between_special_tokens"),
    ("text", {"return_token_ids": True}, "return_token_ids"),
    ("text", {"return_token_offsets": True}, "return_token_offsets"),
    ("text", {"kv_transfer_params": {"a": 1}}, "kv_transfer_params"),
    ("text", {"vllm_xargs": {"a": 1}}, "vllm_xargs"),
    ("text", {"stream_interval": 4}, "stream_interval"),
    ("text", {"repetition_detection": {"a": 1}}, "repetition_detection"),
    ("chat", {"session_id": "s"}, "session_id"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("route, fields, param", REFUSED, ids=[p for _, _, p in REFUSED])
async def test_an_unserved_field_is_a_400_naming_it(route, fields, param):
    base = {"messages": USER} if route == "chat" else {"prompt": "hi"}
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    engine = RecordingEngine()
    resp = await _post(_app(engine), path, {**base, "max_tokens": 2, **fields})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and param.split(".")[-1] in err["message"], err
    assert engine.rendered == []  # refused before the template was rendered


SERVED_AS_DEFAULT = [  # the values that mean "not used": accepted, same output as without them
    {"tools": None, "tool_choice": "none", "parallel_tool_calls": True, "modalities": ["text"], "store": False,
     "metadata": {}, "service_tier": "auto", "documents": None, "priority": 0, "include_reasoning": True},
    {"user": "u-1", "safety_identifier": "hash", "prompt_cache_key": "k", "cache_salt": "s"},
]


@pytest.mark.anyio
@pytest.mark.parametrize("fields", SERVED_AS_DEFAULT)
async def test_fields_at_their_unused_values_are_served(fields):
    engine = RecordingEngine()
    resp = await _post(_app(engine), "/v1/chat/completions", {"messages": USER, "max_tokens": 2, **fields})
    assert resp.status_code == 200, resp.text
    assert engine.rendered == [([{"role": "user", "content": "hi"}], {})]


@pytest.mark.anyio
async def test_developer_role_system_merge_text_parts_template_kwargs_and_request_id():
    engine = RecordingEngine()
    app = _app(engine)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "developer", "content": "Answer in French."}]
    resp = await _post(app, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, "request_id": "abc",
                                                      "chat_template_kwargs": {"enable_thinking": True}})
    assert resp.status_code == 200 and resp.json()["id"] == "chatcmpl-abc"
    # the template has no developer role: system, merged first (vLLM's rule); the kwarg the template reads passes
    assert engine.rendered[-1] == ([{"role": "system", "content": "Be brief.\n\nAnswer in French."},
                                    {"role": "user", "content": "hi"}], {"enable_thinking": True})
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert (await _post(app, "/v1/chat/completions", {"messages": parts, "max_tokens": 1})).status_code == 200
    assert engine.rendered[-1][0] == [{"role": "user", "content": "a\nb"}]  # parts joined as vLLM joins them

    with_dev = RecordingEngine()
    with_dev.chat_template_source = lambda override=None: CHATML + "{% if m == 'developer' %}{% endif %}"
    await _post(_app(with_dev), "/v1/chat/completions", {"messages": msgs, "max_tokens": 1})
    assert with_dev.rendered[-1][0][-1]["role"] == "developer"  # a template that knows the role gets it


@pytest.mark.anyio
async def test_completions_add_special_tokens_follows_vllm():
    engine = RecordingEngine()
    await _post(_app(engine), "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    await _post(_app(engine), "/v1/completions", {"prompt": "hi", "max_tokens": 1, "add_special_tokens": False})
    assert engine.prompts == [("hi", True), ("hi", False)]


# --- client chat templates ----------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("fields, param", [({"chat_template": "{{ messages }}"}, "chat_template"),
                                           ({"chat_template_kwargs": {"chat_template": "{{ messages }}"}},
                                            "chat_template_kwargs.chat_template")])
async def test_a_client_chat_template_is_refused_unless_trusted(fields, param):
    engine = RecordingEngine()
    resp = await _post(_app(engine), "/v1/chat/completions", {"messages": USER, "max_tokens": 1, **fields})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    assert "trust_request_chat_template" in resp.json()["error"]["message"] and engine.rendered == []
    trusted = RecordingEngine()
    resp = await _post(_app(trusted, trust_request_chat_template=True), "/v1/chat/completions",
                       {"messages": USER, "max_tokens": 1, **fields})
    assert resp.status_code == 200 and trusted.rendered[-1][1] == {"chat_template": "{{ messages }}"}


def test_a_trusted_client_template_is_rendered_by_the_real_engine(tiny_model_path, tiny_tokenizer):
    from ctxforge.serve.served_model import HFServedModel

    engine = HFServedModel.__new__(HFServedModel)  # the tokenizer part only: rendering needs no weights
    engine.tokenizer = tiny_tokenizer
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    ids = engine.encode_chat([{"role": "user", "content": "hi"}], False, False, chat_template=template)
    assert tiny_tokenizer.decode(ids) == "[user] hi\n"
    assert engine.encode_chat([{"role": "user", "content": "hi"}], False, False) != ids  # negative control


# --- slow preparation stays off the event loop --------------------------------------------------------

@pytest.mark.anyio
async def test_a_slow_template_delays_no_other_route_nor_request():
    engine = RecordingEngine()
    app = _app(engine, trust_request_chat_template=True)
    async with _client(app) as c:
        heavy = asyncio.create_task(c.post("/v1/chat/completions",
                                           json={"messages": [{"role": "user", "content": "HEAVY"}], "max_tokens": 1}))
        await asyncio.to_thread(engine.rendering.wait, 30)  # the heavy request is rendering now
        models, health = await c.get("/v1/models"), await c.get("/health")
        light = await c.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1})
        assert models.status_code == health.status_code == light.status_code == 200
        assert not heavy.done()  # all three answered while the heavy one was still rendering
        engine.release.set()
        assert (await heavy).status_code == 200


def test_template_variables_are_read_in_transformers_template_environment(tiny_tokenizer):
    from ctxforge.serve import chat_template as ct
    from ctxforge.serve.protocol import RequestError

    source = tiny_tokenizer.chat_template
    assert "{% generation %}" in source and {"messages", "add_generation_prompt"} <= ct.template_variables(source)
    with pytest.raises(RequestError) as err:
        ct.check_template_kwargs({"x": 1}, "{% if %}", "chat_template")
    assert err.value.param == "chat_template" and "does not parse" in str(err.value)
