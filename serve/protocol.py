"""OpenAI-compatible request bodies (with vLLM's extensions), checked before any work.

Every field OpenAI or vLLM defines that changes what is generated is either served or refused with
400 naming it: a request is never answered as if a field it sent were absent. `null` means the
field's default, as in OpenAI's API. Fields nobody defines are ignored (OpenAI clients add optional
fields often; vLLM does the same). `RequestError(param, message)` is the one error this module
raises after parsing; pydantic's ValidationError names the field for malformed types and ranges.
Response bodies are built in responses.py. Nothing here knows about models or HTTP.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI allows top_logprobs <= 20 as well
MAX_N = 16         # choices per prompt
MAX_PROMPTS = 256  # prompts in one /v1/completions request


class RequestError(ValueError):
    """A request the endpoint cannot serve: answered 400 with `param` named, before any work."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Body):
    """vLLM's `structured_outputs` (exactly one constraint)."""
    json_: str | dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


# Message fields OpenAI/vLLM define that this endpoint does not serve: tool calls are not served, and a
# participant `name` or an assistant's `refusal`/`reasoning` would reach the template in a form most
# models never saw (or not at all).
_UNSERVED_MESSAGE_FIELDS = ("name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio",
                            "reasoning_content", "reasoning")


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None

    def check(self, where: str) -> None:
        if self.role in ("tool", "function"):
            raise RequestError(f"{where}.role", f"{self.role!r} messages answer tool calls, which this endpoint does not serve")
        for name in _UNSERVED_MESSAGE_FIELDS:
            if (self.model_extra or {}).get(name) not in (None, [], ""):
                raise RequestError(f"{where}.{name}", "is not served by this endpoint (leave it out)")
        if self.content is None and self.role != "assistant":
            raise RequestError(f"{where}.content", f"a {self.role} message needs content")

    def text(self) -> str:
        """The content as one string; text parts joined by newlines (as vLLM joins them)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


# Fields OpenAI/vLLM define that this endpoint does not serve, with the values that mean "not used"
# (any other value is a 400 naming the field). OpenAI: tools and functions, audio and other modalities,
# predicted outputs, reasoning and verbosity controls, web search, stored completions (store, metadata)
# and non-default service tiers. vLLM: beam search, prompt embeddings and truncation, bad words,
# documents and multimodal kwargs, priority scheduling, disaggregated-serving and extension params,
# and the extra response fields (token ids, offsets, prompt text, stream intervals).
_UNSERVED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True), "suffix": (None, ""), "best_of": (None, 1),
    "use_beam_search": (None, False), "prompt_embeds": (None,), "logprob_token_ids": (None,),
    "truncate_prompt_tokens": (None,), "truncation_side": (None,), "bad_words": (None, []), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "length_penalty": (None, 1.0),
    "guided_whitespace_pattern": (None,), "guided_decoding_backend": (None,), "store": (None, False),
    "metadata": (None, {}), "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
    "verbosity": (None,), "web_search_options": (None,), "documents": (None, []), "media_io_kwargs": (None, {}),
    "mm_processor_kwargs": (None, {}), "priority": (None, 0), "spaces_between_special_tokens": (None, True),
    "return_token_ids": (None, False), "return_token_offsets": (None, False), "return_prompt_text": (None, False),
    "return_assistant_tokens_mask": (None, False), "kv_transfer_params": (None,), "ec_transfer_params": (None,),
    "vllm_xargs": (None,), "routed_experts_prompt_start": (None,), "repetition_detection": (None,),
    "thinking_token_budget": (None,), "include_reasoning": (None, True), "stream_interval": (None, 1),
    "session_id": (None,),
}
# Fields that change nothing a completion holds, on OpenAI's side either (abuse monitoring, cache routing),
# accepted as OpenAI and vLLM accept them: user, safety_identifier, prompt_cache_key, cache_salt.


class _Request(_Body):
    # extra="allow" keeps unknown fields in model_extra, where check() finds the unserved ones.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    cache_salt: str | None = None       # vLLM: salts its prefix cache; this engine shares no cache between requests
    request_id: str | None = None       # vLLM: the response id is <cmpl|chatcmpl>-<request_id>
    response_format: ResponseFormat | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(None, ge=0)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def check(self) -> None:
        """Semantic checks pydantic cannot express; RequestError names the field."""
        extra = self.model_extra or {}
        for name, unused in _UNSERVED.items():
            if name in extra and extra[name] not in unused:
                raise RequestError(name, "is not served by this endpoint (send null or leave it out)")
        if self.stream_options is not None and not self.is_stream():
            raise RequestError("stream_options", "may only be set when stream is true")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise RequestError("stream_options.continuous_usage_stats", "is not served (include_usage gives the usage "
                                                                        "in a last chunk)")
        if self.prompt_logprobs is not None and self.is_stream():
            raise RequestError("prompt_logprobs", "prompt logprobs are not available when stream is true")
        for key, bias in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise RequestError("logit_bias", f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise RequestError("logit_bias", f"bias for token {key} must be in [-100, 100], got {bias}")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise RequestError("min_tokens", f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise RequestError("allowed_token_ids", "must not be empty")
        self.constraint()  # at most one structured-output constraint

    def is_stream(self) -> bool:
        return bool(self.stream)

    def response_id(self, prefix: str) -> str | None:
        """The response id vLLM gives a request that names its request_id; None = a fresh one."""
        return f"{prefix}-{self.request_id}" if self.request_id else None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def constraint(self) -> tuple[str, Any, str] | None:
        """The structured-output constraint as (kind, value, param): kind in json_schema, json_object,
        regex, choice, grammar; None when output is free text. More than one is a RequestError."""
        found: list[tuple[str, Any, str]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("json_object", None, "response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise RequestError("response_format.json_schema.schema", "a json_schema response format needs its schema")
            found.append(("json_schema", rf.json_schema.schema_, "response_format.json_schema.schema"))
        so = self.structured_outputs
        if so is not None:
            for kind, value in (("json_schema", so.json_), ("regex", so.regex), ("choice", so.choice),
                                ("grammar", so.grammar), ("json_object", so.json_object or None)):
                if value is not None:
                    found.append((kind, value, f"structured_outputs.{'json' if kind == 'json_schema' else kind}"))
        for kind, value, name in (("json_schema", self.guided_json, "guided_json"), ("regex", self.guided_regex, "guided_regex"),
                                  ("choice", self.guided_choice, "guided_choice"), ("grammar", self.guided_grammar, "guided_grammar")):
            if value is not None:
                found.append((kind, value, name))
        if len(found) > 1:
            raise RequestError(found[1][2], f"only one structured-output constraint per request (also got {found[0][2]})")
        return found[0] if found else None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    add_special_tokens: bool | None = None

    def check(self) -> None:
        """Cross-field checks pydantic cannot express. Raises RequestError naming the field (max_tokens below
        1, top_logprobs without logprobs, continue_final_message without a final assistant message or with
        add_generation_prompt)."""
        super().check()
        for i, message in enumerate(self.messages):
            message.check(f"messages.{i}")
        if self.add_special_tokens:
            raise RequestError("add_special_tokens", "is not served for chat: the chat template writes the model's "
                                                     "special tokens")
        if self.max_tokens == 0:
            raise RequestError("max_tokens", "must be at least 1")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs", "needs logprobs set to true")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise RequestError("continue_final_message", "needs the last message to be an assistant message")
        if self.continue_final_message and self.add_generation_prompt:
            raise RequestError("add_generation_prompt", "cannot be true together with continue_final_message")

    def budget(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def generation_prompt(self) -> bool:
        if self.continue_final_message:
            return False
        return True if self.add_generation_prompt is None else self.add_generation_prompt

    def top_k_logprobs(self) -> int | None:
        """Alternatives per generated token, or None when no logprobs are asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool | None = None  # vLLM: text prompts get the tokenizer's special tokens (BOS) by default

    def check(self) -> None:
        """Cross-field checks pydantic cannot express. Raises RequestError naming the field (max_tokens 0
        without echo, an empty prompt or prompt.N, more than MAX_PROMPTS prompts)."""
        super().check()
        if self.max_tokens == 0 and not self.echo:
            raise RequestError("max_tokens", "must be at least 1 (0 is allowed only with echo)")
        prompts = self.prompts()
        if not prompts:
            raise RequestError("prompt", "must not be empty")
        if len(prompts) > MAX_PROMPTS:
            raise RequestError("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                where = "prompt" if len(prompts) == 1 and not isinstance(self.prompt, list) else f"prompt.{i}"
                raise RequestError(where, "must not be empty")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def budget(self) -> int:
        # OpenAI's and vLLM's default for /v1/completions is 16 tokens.
        return 16 if self.max_tokens is None else self.max_tokens


def error_body(message: str, err_type: str = "BadRequestError", param: str | None = None, code: int = 400) -> dict:
    """OpenAI's error envelope (what the openai client turns into BadRequestError etc.)."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}
