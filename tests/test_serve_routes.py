"""Route logic without Ray (fast): an engine that fails mid-stream, the bearer-key middleware in front
of a Serve ingress app, the vLLM builder's config (RoPE override as hf_overrides, the authenticated
ingress), and RoPE windows and labels."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi import FastAPI

from ctxforge.serve.auth import AuthIngressMixin, BearerAuth, key_digest
from ctxforge.serve.config import ServeConfig, checkpoint_context_length, rope_label
from ctxforge.serve.served_model import ServedModel, Step
from ctxforge.train.rope import RopeConfig
from routes_app import routes_app


class FailingModel(ServedModel):
    """Streams one piece, then fails: what an engine error after the stream has started looks like."""
    model_id, max_model_len = "fake", 1000

    def encode_chat(self, messages, add_generation_prompt, continue_final_message, **kw):
        return [1, 2, 3]

    def encode_prompt(self, prompt, add_special_tokens=True):
        return [1, 2, 3] if isinstance(prompt, str) else prompt

    def decode(self, ids):
        return "x" * len(ids)

    def token_text(self, token_id):
        return "x"

    def vocab_limit(self):
        return 100

    def compile_constraint(self, kind, value):
        raise ValueError("no grammars here")

    async def generate(self, prompt_ids, params):
        yield Step("partial", [5])
        raise RuntimeError("device lost")


def _app(engine) -> FastAPI:
    return routes_app(engine)


async def _request(app, method, path, **kw):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.request(method, path, **kw)


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "hi"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
async def test_an_engine_error_mid_stream_is_an_error_event_then_done(path, body):
    r = await _request(_app(FailingModel()), "POST", path, json=dict(body, stream=True, max_tokens=4))
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == 500 and "device lost" in err["message"]
    assert any("partial" in e for e in events[:-2])  # what was generated before the failure was sent


@pytest.mark.anyio
async def test_an_engine_error_without_stream_is_a_json_500():
    r = await _request(_app(FailingModel()), "POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
    assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]


@pytest.mark.anyio
async def test_a_constraint_the_engine_cannot_compile_is_400():
    r = await _request(_app(FailingModel()), "POST", "/v1/completions",
                       json={"prompt": "hi", "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


@pytest.mark.anyio
async def test_bearer_auth_middleware():
    inner = FastAPI()

    @inner.get("/v1/models")
    async def models():
        return {"ok": True}

    app = BearerAuth(inner, key_digest("s3cret"))
    ok = await _request(app, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}):
        bad = await _request(app, "GET", "/v1/models", headers=headers)
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "AuthenticationError"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Serve's wrapper has an async __del__
def test_auth_mixin_wraps_the_app_serve_hands_the_replica():
    """Serve 2.60 gives a replica its ASGI app through ASGIAppReplicaWrapper._set_asgi_app; the mixin must
    come before it in the MRO and wrap that app (how vLLM's ingress gets its key check)."""
    from ray.serve._private.http_util import ASGIAppReplicaWrapper

    class Ingress(AuthIngressMixin, ASGIAppReplicaWrapper):
        def __init__(self, digest, app):
            self.key_digest = digest
            ASGIAppReplicaWrapper.__init__(self, app)

    app = FastAPI()
    assert isinstance(Ingress(key_digest("k"), app).app, BearerAuth)
    assert Ingress(None, app).app is app  # no key: the app as is


def _checkpoint(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


LLAMA31 = dict(max_position_embeddings=131072, rope_theta=500000.0,
               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})


def test_rope_override_sets_the_window_and_vllm_hf_overrides(tmp_path):
    from ctxforge.serve.app import build_llm_config, vllm_builder_config

    path = _checkpoint(tmp_path, **LLAMA31)
    rope = RopeConfig(type="yarn", factor=8.0, original_max_position_embeddings=131072)
    assert checkpoint_context_length(path) == 131072
    assert checkpoint_context_length(path, rope) == 1048576
    cfg = ServeConfig(model=path, backend="vllm", rope=rope, device="cuda")
    llm = build_llm_config(cfg, path)
    hf = llm["engine_kwargs"]["hf_overrides"]
    assert llm["engine_kwargs"]["max_model_len"] == 1048576 and hf["max_position_embeddings"] == 1048576
    # the llama3 keys are dropped when the type changes; theta is kept
    assert hf["rope_parameters"] == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 131072,
                                     "rope_theta": 500000.0}
    assert "hf_overrides" not in build_llm_config(ServeConfig(model=path, backend="vllm", device="cuda"), path)["engine_kwargs"]
    assert rope_label(rope, 1048576) == "zero-shot RoPE yarn x8 from 131072 to 1048576"
    builder = vllm_builder_config(cfg, path, key_digest("k"))
    assert builder["ingress_cls_config"] == {"ingress_cls": "ctxforge.serve.vllm_ingress:AuthOpenAiIngress",
                                             "ingress_extra_kwargs": {"key_digest": key_digest("k")}}
    assert "ingress_cls_config" not in vllm_builder_config(cfg, path, None)


def test_rope_override_rebuilds_the_cpu_engine(tiny_model_path):
    from ctxforge.serve.served_model import HFServedModel

    rope = RopeConfig(type="linear", factor=4.0)
    engine = HFServedModel(tiny_model_path, "tiny", 65536, device="cpu", rope=rope)
    params = engine.model.config.get_text_config().rope_parameters
    assert params["rope_type"] == "linear" and params["factor"] == 4.0
    assert engine.model.config.max_position_embeddings == 65536


def test_serve_config_route_prefix_is_checked():
    assert ServeConfig(route_prefix="/eval-base").route_prefix == "/eval-base"
    with pytest.raises(ValueError, match="route_prefix"):
        ServeConfig(route_prefix="eval")
