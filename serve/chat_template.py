"""What a chat request may hand the model's chat template, checked before anything is rendered.

- A template sent by the client (`chat_template`, or `chat_template_kwargs.chat_template`) is refused
  unless the operator trusts request templates (serve config `trust_request_chat_template`, vLLM's
  `--trust-request-chat-template`): rendering runs arbitrary Jinja on the replica.
- `chat_template_kwargs` may only name variables the template reads (a key it never reads would be
  accepted and ignored) and never the arguments of `apply_chat_template` itself (`tokenize`,
  `return_dict`, ...), which decide what the server gets back rather than what the model sees.
- Role `developer` is rendered as `system` when the template has no `developer` role, and the system
  messages are then merged into one at the start (vLLM's rule, renderers/hf.py), so the model sees
  the instruction in a form it was trained on.
Nothing here knows about HTTP or models; `RequestError` names the field.
"""

from __future__ import annotations

import functools

from ctxforge.serve.protocol import RequestError

# apply_chat_template's own arguments (transformers), and what the server itself passes.
RESERVED_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs", "processor_kwargs"})


@functools.lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """Names a Jinja chat template reads from its context, parsed in transformers' own template
    environment (which knows its `{% generation %}` tag); ValueError when it does not parse."""
    import jinja2
    from transformers.utils.chat_template_utils import _get_template_variables

    try:
        return _get_template_variables(source)
    except jinja2.TemplateError as exc:
        raise ValueError(f"the chat template does not parse: {exc}") from None


def check_request_template(template: str | None, kwargs: dict | None, trusted: bool) -> str | None:
    """The client's template when the server trusts request templates; RequestError naming the field otherwise."""
    in_kwargs = (kwargs or {}).get("chat_template")
    if template is not None and in_kwargs is not None:
        raise RequestError("chat_template", "send the template once: chat_template or chat_template_kwargs.chat_template")
    sent = template if template is not None else in_kwargs
    if sent is None:
        return None
    field = "chat_template" if template is not None else "chat_template_kwargs.chat_template"
    if not trusted:
        raise RequestError(field, "a chat template sent with the request is refused; this server renders its model's "
                                  "own template (an operator allows request templates with serve config "
                                  "trust_request_chat_template=true)")
    if not isinstance(sent, str) or not sent.strip():
        raise RequestError(field, "must be a non-empty Jinja template string")
    return sent


def check_template_kwargs(kwargs: dict | None, source: str | None, source_field: str = "messages") -> dict:
    """`chat_template_kwargs` without chat_template, each key one the template reads. `source_field`
    names the template in errors (the request's field when the client sent it)."""
    out = {k: v for k, v in (kwargs or {}).items() if k != "chat_template"}
    for key in out:
        if key in RESERVED_KWARGS:
            raise RequestError(f"chat_template_kwargs.{key}", "is an argument of the server's template call, "
                                                               "not a template variable")
    if source is not None:
        try:
            read = template_variables(source)
        except ValueError as exc:
            raise RequestError(source_field, str(exc)) from None
        unread = sorted(set(out) - read)
        if unread:
            raise RequestError(f"chat_template_kwargs.{unread[0]}", "the chat template does not read this variable, "
                                                                     "so it would have no effect")
    return out


def map_developer_role(messages: list[dict], source: str | None) -> list[dict]:
    """developer -> system (then one system message first) when the template has no developer role."""
    if not any(m["role"] == "developer" for m in messages):
        return messages
    if source is not None and ("'developer'" in source or '"developer"' in source):
        return messages
    converted = [dict(m, role="system") if m["role"] == "developer" else m for m in messages]
    systems = [m["content"] for m in converted if m["role"] == "system" and m["content"]]
    rest = [m for m in converted if m["role"] != "system"]
    return ([{"role": "system", "content": "\n\n".join(systems)}] if systems else []) + rest
