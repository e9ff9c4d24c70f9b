"""The OpenAI-compatible route logic over an `ServedModel` (the Serve deployment in app.py only binds it).

Every request is checked completely before any generation starts: the body (400 naming the field,
in OpenAI's error envelope), the model name (404), each prompt (non-empty, token ids inside the
vocabulary, prompt + max_tokens inside the window, with both counts stated), the sampling fields
(token ids in logit_bias / stop_token_ids / allowed_token_ids) and the structured-output constraint
(compiled here, so a bad JSON schema is a 400 too). Only then is a stream opened, so a stream never
starts for a request that cannot be served; an error after that is sent as an error event, followed
by `[DONE]`. A batch of prompts (/v1/completions) and `n` choices per prompt run concurrently;
choice i of prompt p is index p*n + i, as in vLLM. With `seed` and n > 1, choice i samples with
seed + i. Streaming and non-streaming share one generation path, so a seeded or greedy request gets
the same text, tokens and logprobs both ways.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hmac
import json
import logging
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from ctxforge.serve import chat_template as ct
from ctxforge.serve import protocol as p
from ctxforge.serve import responses as r
from ctxforge.serve.served_model import ContextLengthError, ServedModel, Step
from ctxforge.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


def error(status: int, message: str, err_type: str = "BadRequestError", param: str | None = None) -> JSONResponse:
    return JSONResponse(p.error_body(message, err_type, param, status), status_code=status)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "function-after", "function-before"}


def _field(loc: tuple) -> str:
    """A pydantic error location as the request field: union member tags (`str`, `list[TextPart]`) dropped."""
    parts = []
    for part in loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier()):
            break
        parts.append(str(part))
    return ".".join(parts) or "(body)"


def _validation_error(err: ValidationError) -> JSONResponse:
    field = _field(err.errors()[0]["loc"])
    msgs = "; ".join(dict.fromkeys(f"{_field(e['loc'])}: {e['msg']}" for e in err.errors()))
    return error(400, f"invalid request: {msgs}", param=field)


def _sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class Job:
    """One sequence to generate: choice `index`, its prompt ids and sampling parameters."""
    index: int
    prompt: int           # which prompt of the request
    ids: list[int]
    params: SamplingParams
    echo: str = ""        # text echoed before the generation (completions echo, chat echo)
    param: str = "prompt"  # the request field this prompt came from (named in errors)


async def merge(gens: list) -> "asyncio.AsyncIterator[tuple[int, Step]]":
    """Interleave several async step iterators as (position, step); cancels the rest on exit.

    An exception raised by one of the iterators is raised here, and the others are cancelled.
    """
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen):
        try:
            async for step in gen:
                await queue.put((i, step))
            await queue.put((i, done))
        except Exception as exc:  # handed to the consumer, which answers with an error
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class OpenAIRoutes:
    """The routes over one engine. Work that grows with a request (parsing its JSON, rendering the chat
    template, tokenizing, compiling a grammar, building a large response) runs on `prepare_workers`
    threads, never on the event loop: a heavy request delays no /v1/models, /health or token stream,
    and at most `prepare_workers` requests prepare at once (the rest wait their turn, first come first
    served)."""

    def __init__(self, engine: ServedModel, api_key: str | None = None, *, prompt_logprobs_max_tokens: int = 32768,
                 trust_request_chat_template: bool = False, prepare_workers: int = 2):
        """`prompt_logprobs_max_tokens`: the longest prompt whose per-token logprobs (echo + logprobs,
        prompt_logprobs) are computed; longer ones are refused (400) before any work, since the
        response holds k + 1 entries per prompt token. `trust_request_chat_template`: render a chat
        template sent with the request (refused with a 400 otherwise)."""
        self.engine = engine
        self.api_key = api_key or None
        self.prompt_logprobs_max_tokens = prompt_logprobs_max_tokens
        self.trust_request_chat_template = trust_request_chat_template
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(prepare_workers, thread_name_prefix="openai-prepare")

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._prepare_pool, functools.partial(fn, *args))

    # --- helpers -------------------------------------------------------------------------------
    def auth_error(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "AuthenticationError")
        return None

    def models(self) -> dict:
        return r.model_list(self.engine.model_id, self.engine.max_model_len)

    def _parse(self, raw: bytes, model: type):
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise p.RequestError("(body)", f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise p.RequestError("(body)", "request body must be a JSON object")
        req = model.model_validate(body)
        req.check()
        if req.model is not None and req.model != self.engine.model_id:
            raise LookupError(req.model)
        return req

    def _prepare(self, raw: bytes, chat: bool):
        """(request, jobs), every check done (runs on a prepare thread)."""
        req = self._parse(raw, p.ChatCompletionRequest if chat else p.CompletionRequest)
        return req, (self._chat_jobs(req) if chat else self._completion_jobs(req))

    def _names(self, req) -> r.Tokens:
        return r.Tokens(self.engine.token_text, self.engine.token_bytes, bool(req.return_tokens_as_token_ids))

    def _token_ids(self, ids: list[int], param: str) -> None:
        limit = self.engine.vocab_limit()
        bad = [t for t in ids if not 0 <= t < limit]
        if bad:
            raise p.RequestError(param, f"token id {bad[0]} is outside the vocabulary (0..{limit - 1})")

    def _params(self, req, budget: int, logprobs: int | None) -> SamplingParams:
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        self._token_ids(list(bias), "logit_bias")
        self._token_ids(req.stop_token_ids or [], "stop_token_ids")
        self._token_ids(req.allowed_token_ids or [], "allowed_token_ids")
        grammar = None
        if (constraint := req.constraint()) is not None:
            kind, value, param = constraint
            try:
                grammar = self.engine.compile_constraint(kind, value)
            except ValueError as exc:
                raise p.RequestError(param, str(exc)) from None
        return SamplingParams(
            max_tokens=budget, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0, logit_bias=bias, allowed_token_ids=req.allowed_token_ids,
            stop=req.stop_list(), stop_token_ids=list(req.stop_token_ids or []), ignore_eos=bool(req.ignore_eos),
            min_tokens=req.min_tokens or 0, include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=True if req.skip_special_tokens is None else req.skip_special_tokens,
            seed=req.seed, logprobs=logprobs, prompt_logprobs=req.prompt_logprobs, grammar=grammar)

    def _jobs(self, req, prompts: list[tuple[list[int], str, str]], budget: int | None, logprobs: int | None) -> list[Job]:
        """prompts: (ids, echo text, param naming the prompt). Checks every prompt before any work."""
        base = None
        jobs = []
        n = req.n or 1
        for pi, (ids, echo, param) in enumerate(prompts):
            self._token_ids(ids, param)
            try:
                allowed = self.engine.completion_budget(len(ids), budget)
            except ContextLengthError as exc:
                raise p.RequestError(param, str(exc)) from None
            if base is None:
                base = self._params(req, allowed, logprobs)
            params = replace(base, max_tokens=allowed)
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                jobs.append(Job(pi * n + i, pi, ids, replace(params, seed=seed), echo, param))
        return jobs

    def _check_prompt_logprobs(self, jobs: list[Job]) -> None:
        limit = self.prompt_logprobs_max_tokens
        for job in jobs:
            if job.params.prompt_logprobs is not None and len(job.ids) > limit:
                raise p.RequestError(job.param, f"prompt logprobs (echo with logprobs, or prompt_logprobs) are computed "
                                                f"for prompts of at most {limit} tokens here (serve config "
                                                f"prompt_logprobs_max_tokens); this prompt has {len(job.ids)}")

    async def handle(self, request: Request, chat: bool):
        try:
            req, jobs = await self._off_loop(self._prepare, await request.body(), chat)
        except ValidationError as err:
            return _validation_error(err)
        except p.RequestError as err:
            return error(400, str(err), param=err.param)
        except LookupError as err:
            return error(404, f"model {err.args[0]!r} is not served here (served: {self.engine.model_id!r})",
                         "NotFoundError", "model")
        if req.is_stream():
            stream = self._chat_stream(req, jobs) if chat else self._completion_stream(req, jobs)
            return StreamingResponse(self._guard(stream), media_type="text/event-stream")
        try:
            results = await self._collect(jobs)
        except Exception as exc:  # an engine failure: OpenAI's envelope, not a plain-text 500
            log.exception("generation failed")
            return error(500, f"generation failed: {type(exc).__name__}: {exc}", "InternalServerError")
        build = self._chat_body if chat else self._completion_body
        return await self._off_loop(lambda: JSONResponse(build(req, jobs, results)))

    async def _collect(self, jobs: list[Job]) -> list[list[Step]]:
        steps: list[list[Step]] = [[] for _ in jobs]
        async for i, step in merge([self.engine.generate(j.ids, j.params) for j in jobs]):
            steps[i].append(step)
        return steps

    async def _guard(self, stream):
        """An exception mid-stream becomes an error event; the stream always ends with [DONE]."""
        try:
            async for event in stream:
                yield event
        except Exception as exc:
            log.exception("stream failed")
            yield _sse(p.error_body(f"generation failed: {type(exc).__name__}: {exc}", "InternalServerError", None, 500))
        yield _sse("[DONE]")

    # --- /v1/completions -----------------------------------------------------------------------
    def _completion_jobs(self, req: p.CompletionRequest) -> list[Job]:
        prompts = req.prompts()
        many = isinstance(req.prompt, list) and not (req.prompt and isinstance(req.prompt[0], int))
        items = []
        for i, prompt in enumerate(prompts):
            ids = self.engine.encode_prompt(prompt, add_special_tokens=req.add_special_tokens is not False)
            param = f"prompt.{i}" if many else "prompt"
            if not ids:
                raise p.RequestError(param, "encodes to no tokens")
            echo = "" if not req.echo else (prompt if isinstance(prompt, str) else self.engine.decode(ids))
            items.append((ids, echo, param))
        jobs = self._jobs(req, items, req.budget(), req.logprobs)
        if req.echo and req.logprobs is not None:  # echoed tokens carry their logprobs (vLLM)
            jobs = [replace(j, params=replace(j.params, prompt_logprobs=req.prompt_logprobs
                                              if req.prompt_logprobs is not None else req.logprobs)) for j in jobs]
        self._check_prompt_logprobs(jobs)
        return jobs

    def _echo_logprobs(self, req, job: Job, prompt_records) -> tuple[list[int], list]:
        if not req.echo or req.logprobs is None:
            return [], []
        return list(job.ids), list(prompt_records or [None] * len(job.ids))

    def _completion_body(self, req, jobs: list[Job], results: list[list[Step]]) -> dict:
        choices, prompt_tokens, completion_tokens = [], {}, 0
        for job, steps in zip(jobs, results):
            last = steps[-1]
            prompt_records = next((s.prompt_logprobs for s in steps if s.prompt_logprobs is not None), None)
            choice = {"index": job.index, "text": job.echo + "".join(s.text for s in steps), "logprobs": None,
                      "finish_reason": last.finish_reason, "stop_reason": last.stop_reason}
            if req.logprobs is not None:
                ids, recs = self._echo_logprobs(req, job, prompt_records)
                ids += [t for s in steps for t in s.token_ids]
                recs += [x for s in steps for x in s.logprobs]
                choice["logprobs"] = r.completion_logprobs(self._names(req), ids, recs, req.logprobs)[0]
            if req.prompt_logprobs is not None:
                choice["prompt_logprobs"] = r.prompt_logprobs(self.engine.token_text, prompt_records)
            choices.append(choice)
            prompt_tokens[job.prompt] = last.prompt_tokens
            completion_tokens += last.completion_tokens
        return r.completion(self.engine.model_id, choices, r.usage(sum(prompt_tokens.values()), completion_tokens),
                            req.response_id("cmpl"))

    async def _completion_stream(self, req, jobs: list[Job]):
        head = {"id": req.response_id("cmpl") or r.new_id("cmpl"), "created": r.now(), "model": self.engine.model_id}
        offsets = {j.index: 0 for j in jobs}
        names = self._names(req)
        echoed: set[int] = set()
        prompt_tokens, completion_tokens = {}, 0
        async for i, step in merge([self.engine.generate(j.ids, j.params) for j in jobs]):
            job = jobs[i]
            text, ids, recs = step.text, list(step.token_ids), list(step.logprobs)
            if job.index not in echoed:
                echoed.add(job.index)
                text = job.echo + text
                e_ids, e_recs = self._echo_logprobs(req, job, step.prompt_logprobs)
                ids, recs = e_ids + ids, e_recs + recs
            choice = {"index": job.index, "text": text, "logprobs": None, "finish_reason": step.finish_reason,
                      "stop_reason": step.stop_reason}
            if req.logprobs is not None:  # an echoed prompt's entries are many: built off the loop
                choice["logprobs"], offsets[job.index] = await self._off_loop(
                    r.completion_logprobs, names, ids, recs, req.logprobs, offsets[job.index])
            if text or ids or step.finish_reason:
                yield _sse(r.chunk("text", head, [choice]))
            if step.finish_reason:
                prompt_tokens[job.prompt] = step.prompt_tokens
                completion_tokens += step.completion_tokens
        if req.include_usage():
            yield _sse(r.chunk("text", head, [], r.usage(sum(prompt_tokens.values()), completion_tokens)))

    # --- /v1/chat/completions ------------------------------------------------------------------
    def _chat_jobs(self, req: p.ChatCompletionRequest) -> list[Job]:
        template = ct.check_request_template(req.chat_template, req.chat_template_kwargs, self.trust_request_chat_template)
        source = self.engine.chat_template_source(template)
        field = ("chat_template" if req.chat_template is not None else "chat_template_kwargs.chat_template") if template else "messages"
        kwargs = ct.check_template_kwargs(req.chat_template_kwargs, source, field)
        messages = ct.map_developer_role([{"role": m.role, "content": m.text()} for m in req.messages], source)
        try:
            ids = self.engine.encode_chat(messages, req.generation_prompt(), bool(req.continue_final_message),
                                          **({"chat_template": template} if template else {}), **kwargs)
        except Exception as exc:  # a chat template that rejects the conversation (e.g. role order)
            raise p.RequestError("messages", f"the chat template cannot render them: {exc}") from None
        # vLLM's chat `echo`: the reply starts with the last message when that is the assistant's.
        echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""
        jobs = self._jobs(req, [(ids, echo, "messages")], req.budget(), req.top_k_logprobs())
        self._check_prompt_logprobs(jobs)
        return jobs

    def _chat_body(self, req, jobs: list[Job], results: list[list[Step]]) -> dict:
        choices, completion_tokens, prompt_lps = [], 0, None
        for job, steps in zip(jobs, results):
            last = steps[-1]
            choice = {"index": job.index, "message": {"role": "assistant", "content": job.echo + "".join(s.text for s in steps)},
                      "logprobs": None, "finish_reason": last.finish_reason, "stop_reason": last.stop_reason}
            if req.logprobs:
                choice["logprobs"] = r.chat_logprobs(self._names(req), [x for s in steps for x in s.logprobs])
            if req.prompt_logprobs is not None and prompt_lps is None:
                prompt_lps = r.prompt_logprobs(self.engine.token_text,
                                               next((s.prompt_logprobs for s in steps if s.prompt_logprobs is not None), None))
            choices.append(choice)
            completion_tokens += last.completion_tokens
        use = r.usage(results[0][-1].prompt_tokens, completion_tokens)
        return r.chat_completion(self.engine.model_id, choices, use, prompt_lps, req.response_id("chatcmpl"))

    async def _chat_stream(self, req, jobs: list[Job]):
        head = {"id": req.response_id("chatcmpl") or r.new_id("chatcmpl"), "created": r.now(), "model": self.engine.model_id}
        names = self._names(req)
        for job in jobs:
            delta = {"role": "assistant", "content": job.echo}
            yield _sse(r.chunk("chat", head, [{"index": job.index, "delta": delta, "logprobs": None, "finish_reason": None}]))
        prompt_tokens, completion_tokens = 0, 0
        async for i, step in merge([self.engine.generate(j.ids, j.params) for j in jobs]):
            job = jobs[i]
            if not (step.text or step.token_ids or step.finish_reason):
                continue
            choice = {"index": job.index, "delta": {"content": step.text} if step.text else {},
                      "logprobs": r.chat_logprobs(names, step.logprobs) if req.logprobs else None,
                      "finish_reason": step.finish_reason}
            if step.finish_reason:
                choice["stop_reason"] = step.stop_reason
                prompt_tokens = step.prompt_tokens
                completion_tokens += step.completion_tokens
            yield _sse(r.chunk("chat", head, [choice]))
        if req.include_usage():
            yield _sse(r.chunk("chat", head, [], r.usage(prompt_tokens, completion_tokens)))
