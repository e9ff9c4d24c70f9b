"""The model behind the HTTP routes: the protocol the routes call (`ServedModel`), and its transformers
implementation that serves on CPU or one GPU (`HFServedModel`). The vLLM backend serves through
ray.serve.llm instead and does not use this module.

The routes (routes.py) only know `ServedModel`: turn messages or a prompt into token ids, check them
against the window and the vocabulary, compile structured-output constraints, and stream generated
tokens. `HFServedModel` implements it with a plain KV-cached decode loop over a `from_pretrained` causal
LM, one token per step on a single worker thread, so concurrent requests interleave token by token
instead of blocking each other for a whole generation. Each `Step` carries new text, the token ids
behind it, their logprobs when asked for, and (first step only) the prompt's logprobs. This module
knows nothing about HTTP, OpenAI JSON or Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator

from ctxforge.serve.sampling import Sampler, SamplingParams, TokenLogprob, token_logprob
from ctxforge.serve.token_bytes import TokenBytes

__all__ = ["ContextLengthError", "ServedModel", "HFServedModel", "SamplingParams", "Step"]


class ContextLengthError(ValueError):
    """The prompt (plus the requested completion) does not fit the model's window."""


@dataclass
class Step:
    """One streamed piece: `text` is new output, `token_ids` the tokens generated since the last step
    (text may lag behind them while a stop string could still match); the last step carries
    finish_reason and the counts."""
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


class ServedModel(ABC):
    model_id: str
    max_model_len: int

    @abstractmethod
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                    **template_kwargs) -> list[int]: ...

    @abstractmethod
    def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a completions prompt: ids as given, text tokenized with the tokenizer's special
        tokens (BOS) unless add_special_tokens is false (vLLM's default for /v1/completions)."""

    def chat_template_source(self, override: str | None = None) -> str | None:
        """The Jinja source encode_chat renders (`override` when given); None when unknown."""
        return override

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """One token's text as it reads alone (logprob entries)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token stands for (part of a character for some tokens); engines whose
        tokenizer has byte pieces override this (token_bytes.TokenBytes)."""
        return self.token_text(token_id).encode("utf-8")

    @abstractmethod
    def vocab_limit(self) -> int:
        """Token ids must be below this."""

    @abstractmethod
    def compile_constraint(self, kind: str, value):
        """A compiled structured-output constraint (kind: json_schema, json_object, regex, choice,
        grammar); ValueError with the reason when it cannot be compiled."""

    @abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Step]: ...

    def completion_budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Tokens this request may generate, or ContextLengthError stating both counts (as vLLM does)."""
        if prompt_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{prompt_tokens} tokens (prompt_tokens={prompt_tokens}, max_model_len={self.max_model_len}).")
        if max_tokens is None:
            return self.max_model_len - prompt_tokens
        if prompt_tokens + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion) "
                f"(prompt_tokens={prompt_tokens}, max_tokens={max_tokens}, max_model_len={self.max_model_len}).")
        return max_tokens


def chunked_prompt_logprobs(hidden, head, prompt_ids: list[int], k: int, chunk_tokens: int) -> list[TokenLogprob | None]:
    """Per prompt position, the logprob of the token there under the model's prediction from the
    positions before it: [None, record(1), ..., record(n-1)], each with its rank and top-k.

    `hidden`: [n, h] final hidden states (torch); `head`: the output projection (lm_head). Logits and
    their log-softmax exist for `chunk_tokens` positions at a time ([chunk, vocab] fp32), so memory is
    bounded whatever the prompt length (the training loss tiles the same way, train/loss.py)."""
    import torch

    records: list[TokenLogprob | None] = [None]
    n = len(prompt_ids)
    for start in range(0, n - 1, chunk_tokens):
        stop = min(start + chunk_tokens, n - 1)
        block = torch.log_softmax(head(hidden[start:stop]).float(), dim=-1)
        for i, row in enumerate(block):
            records.append(token_logprob(row, prompt_ids[start + i + 1], k))
        del block
    return records


def check_plain_head(head, hidden_last, logits_last) -> None:
    """The model's own last logits must equal `head(hidden)`: a model that transforms its logits after
    the projection (soft-capping, scaling) would get wrong prompt logprobs from the chunked path."""
    import torch

    mine = head(hidden_last)[0].float()
    if not torch.allclose(mine, logits_last.float(), rtol=1e-3, atol=1e-3):
        raise RuntimeError("prompt logprobs: this model's logits are not its output projection of the last hidden "
                           "state (soft-capped or scaled logits), which chunked prompt logprobs need")


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """Earliest stop string in text[start:] as (index, stop)."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


class HFServedModel(ServedModel):
    """A transformers causal LM on one device, decoded token by token with its KV cache."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str = "auto", dtype: str = "auto",
                 rope=None, logprobs_chunk_tokens: int = 256, prefill_chunk_tokens: int = 1024):
        """`rope`: a RopeConfig (ctxforge.train.rope) applied to the checkpoint's config before the model is
        built, with max_position_embeddings raised to `max_model_len` (zero-shot RoPE scaling).
        `logprobs_chunk_tokens`: prompt positions whose logits exist at once when prompt logprobs are
        asked for (memory: chunk x vocab x 4 bytes, twice). `prefill_chunk_tokens`: prompt positions
        per worker call while prefilling (other requests step between the calls)."""
        import torch
        from transformers import GenerationConfig

        from ctxforge.models import load_causal_lm
        from ctxforge.structured import Grammars

        self._torch = torch
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.logprobs_chunk_tokens = logprobs_chunk_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        config = None
        if rope is not None:
            from ctxforge.train.rope import serving_config
            config = serving_config(model_path, rope, max_model_len)
        self.model, self.tokenizer, self.device = load_causal_lm(model_path, device, dtype, config=config)
        if rope is not None:
            from ctxforge.train.rope import verify_rotary
            verify_rotary(self.model)
        self.vocab_size = self.model.config.vocab_size
        eos = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            gen_eos = None
        for ids in (gen_eos, self.model.config.eos_token_id, self.tokenizer.eos_token_id):
            if ids is None:
                continue
            eos.update(ids if isinstance(ids, list) else [ids])
        self.eos_ids = eos
        self.grammars = Grammars(self.tokenizer, vocab_size=self.vocab_size)
        self._token_bytes = TokenBytes(self.tokenizer)
        # One worker thread: model steps never run concurrently (CPU threads are scarce, GPU memory too);
        # requests interleave between steps.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")

    def encode_chat(self, messages, add_generation_prompt=True, continue_final_message=False, **template_kwargs):
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, return_dict=True, **template_kwargs)
        return list(out["input_ids"])

    def chat_template_source(self, override=None):
        source = override or self.tokenizer.chat_template
        return source if isinstance(source, str) else None

    def encode_prompt(self, prompt, add_special_tokens=True):
        if isinstance(prompt, list):
            return list(prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id):
        return self.tokenizer.decode([token_id])

    def token_bytes(self, token_id):
        return self._token_bytes(token_id)

    def vocab_limit(self):
        return min(len(self.tokenizer), self.vocab_size)

    def compile_constraint(self, kind, value):
        g = self.grammars
        return {"json_schema": g.json_schema, "regex": g.regex, "choice": g.choice, "grammar": g.ebnf,
                "json_object": lambda _v: g.json_object()}[kind](value)

    def _prefill(self, state: dict, prompt_ids: list[int], start: int, stop: int, prompt_logprobs: int | None):
        """Run prompt positions [start, stop) through the model, extending the KV cache in `state`.
        Returns the last position's logits and the prompt-logprob records of the tokens at positions
        start+1 .. stop (those this chunk predicts; None when not asked for)."""
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids[start:stop]], device=self.device)
            # Only the last position's logits come out of the model; prompt logprobs are computed from
            # the final hidden states, a chunk of positions at a time (a [n, vocab] logits tensor at long
            # prompts is gigabytes: 2.5 GiB at 4K tokens for a 152K vocabulary in fp32).
            hidden: dict = {}
            hook = None
            if prompt_logprobs is not None:
                hook = self.model.get_decoder().register_forward_hook(
                    lambda _m, _a, out: hidden.__setitem__("h", out[0]))
            cache = {"cache": state["past"]} if "past" in state else {}
            try:
                out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)
            finally:
                if hook is not None:
                    hook.remove()
            state["past"] = out.cache
            last = out.logits[0, -1]
            records = None
            if prompt_logprobs is not None:
                head = self.model.get_output_embeddings()
                check_plain_head(head, hidden["h"][0, -1:], last)
                targets = prompt_ids[start:min(stop + 1, len(prompt_ids))]  # what each position predicts, and more
                records = chunked_prompt_logprobs(hidden["h"][0], head, targets, prompt_logprobs,
                                                  self.logprobs_chunk_tokens)[1:]
            return last, records

    def _prefill_spans(self, n: int) -> list[tuple[int, int]]:
        """The prompt in spans of prefill_chunk_tokens, each one worker call, so other requests' decode
        steps run between them (one long prompt holds the worker for one span at a time). Dynamic NTK
        RoPE rescales with the length seen, so its prompts are prefilled whole."""
        rope = getattr(self.model.config, "rope_parameters", None) or getattr(self.model.config, "rope_scaling", None) or {}
        if (rope.get("rope_type") or rope.get("type")) == "dynamic":
            return [(0, n)]
        step = self.prefill_chunk_tokens
        return [(i, min(i + step, n)) for i in range(0, n, step)]

    def _decode_step(self, state: dict, token: int):
        torch = self._torch
        with torch.inference_mode():
            # transformers >= 5.2x names the KV cache `cache` (was `past_key_values`).
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=state["past"],
                             use_cache=True, logits_to_keep=1)
            state["past"] = out.cache
            return out.logits[0, -1]

    def _first(self, state, prompt_ids, span, params, sampler):
        logits, records = self._prefill(state, prompt_ids, *span, params.prompt_logprobs)
        return (sampler.choose(logits) if params.max_tokens > 0 else (None, None)), records

    def _next(self, state, token, sampler):
        return sampler.choose(self._decode_step(state, token))

    async def generate(self, prompt_ids, params):
        budget = self.completion_budget(len(prompt_ids), params.max_tokens)
        loop = asyncio.get_running_loop()
        ends = (set() if params.ignore_eos else self.eos_ids) | set(params.stop_token_ids)
        sampler = Sampler(params, prompt_ids, self.eos_ids, self.vocab_size, self.device, self.grammars)
        state: dict = {}
        out_ids: list[int] = []
        pending_ids: list[int] = []
        pending_lp: list[TokenLogprob] = []
        sent, finish, stop_reason, text, first = 0, "length", None, "", True
        hold = max((len(s) for s in params.stop), default=1) - 1 if params.stop else 0
        try:
            spans = self._prefill_spans(len(prompt_ids))
            prompt_records = [None] if params.prompt_logprobs is not None else None
            for span in spans[:-1]:
                _, records = await loop.run_in_executor(self._pool, self._prefill, state, prompt_ids, *span,
                                                        params.prompt_logprobs)
                if prompt_records is not None:
                    prompt_records += records
            (token, record), records = await loop.run_in_executor(
                self._pool, self._first, state, prompt_ids, spans[-1], params, sampler)
            if prompt_records is not None:
                prompt_records += records
            while len(out_ids) < budget:
                if token is None:  # every token masked (a grammar with no way on): end the sequence
                    finish = "stop"
                    break
                out_ids.append(token)
                pending_ids.append(token)
                if record is not None:
                    pending_lp.append(record)
                if token in ends:
                    # Counted as generated, left out of the text (as vLLM does); stop_reason names a stop token id.
                    finish = "stop"
                    stop_reason = token if token in params.stop_token_ids else None
                    break
                decode = functools.partial(self.tokenizer.decode, out_ids, skip_special_tokens=params.skip_special_tokens)
                # The whole output is decoded at each step (stop strings, split characters): long outputs off the loop.
                text = decode() if len(out_ids) <= 256 else await loop.run_in_executor(self._pool, decode)
                hit = _find_stop(text, params.stop, max(0, sent - hold)) if params.stop else None
                if hit is not None:
                    cut, stop_str = hit
                    text = text[: cut + (len(stop_str) if params.include_stop_str_in_output else 0)]
                    finish, stop_reason = "stop", stop_str
                    break
                if len(out_ids) >= budget:
                    break
                # Hold back an incomplete UTF-8 character and what may be the start of a stop string.
                safe = len(text.rstrip("\ufffd")) - hold
                if safe > sent:
                    yield Step(text[sent:safe], pending_ids, pending_lp, prompt_logprobs=prompt_records if first else None)
                    first, sent, pending_ids, pending_lp = False, safe, [], []
                token, record = await loop.run_in_executor(self._pool, self._next, state, token, sampler)
        finally:
            state.pop("past", None)
        yield Step(text[sent:], pending_ids, pending_lp, finish_reason=finish, stop_reason=stop_reason,
                   prompt_tokens=len(prompt_ids), completion_tokens=len(out_ids),
                   prompt_logprobs=prompt_records if first else None)
