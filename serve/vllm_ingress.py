"""`ray.serve.llm`'s OpenAI ingress with the bearer-key check in front (GPU only: importing
ray.serve.llm's ingress needs vllm). Named by string in app.vllm_builder_config, so CPU code never
imports this module."""

from __future__ import annotations

from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

from ctxforge.serve.auth import AuthIngressMixin


class AuthOpenAiIngress(AuthIngressMixin, OpenAiIngress):
    def __init__(self, *args, key_digest: str | None = None, **kwargs):
        self.key_digest = key_digest
        super().__init__(*args, **kwargs)
