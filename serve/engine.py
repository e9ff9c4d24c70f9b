"""The engine protocol behind the HTTP routes, and the transformers engine that serves on CPU.

The routes (routes.py) only know `Engine`: turn messages or a prompt into token ids, check them
against the window and the vocabulary, compile structured-output constraints, and stream generated
tokens. `HFEngine` implements it with a plain KV-cached decode loop over a `from_pretrained` causal
LM, one token per step on a single worker thread, so concurrent requests interleave token by token
instead of blocking each other for a whole generation. Each `Step` carries new text, the token ids
behind it, their logprobs when asked for, and (first step only) the prompt's logprobs. The engine
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

__all__ = ["ContextLengthError", "Engine", "HFEngine", "SamplingParams", "Step"]


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


class Engine(ABC):
    model_id: str
    max_model_len: int

    @abstractmethod
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool,
                    **template_kwargs) -> list[int]: ...

    @abstractmethod
    def encode_prompt(self, prompt: str | list[int]) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abstractmethod
    def token_text(self, token_id: int) -> str:
        """One token's text as it reads alone (logprob entries)."""

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


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, str] | None:
    """Earliest stop string in text[start:] as (index, stop)."""
    hits = [(i, s) for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


class HFEngine(Engine):
    """A transformers causal LM on one device, decoded token by token with its KV cache."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str = "auto", dtype: str = "auto",
                 rope=None):
        """`rope`: a RopeConfig (ctxforge.train.rope) applied to the checkpoint's config before the model is
        built, with max_position_embeddings raised to `max_model_len` (zero-shot RoPE scaling)."""
        import torch
        from transformers import GenerationConfig

        from ctxforge.models import load_causal_lm
        from ctxforge.structured import Grammars

        self._torch = torch
        self.model_id = model_id
        self.max_model_len = max_model_len
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
        # One worker thread: model steps never run concurrently (CPU threads are scarce, GPU memory too);
        # requests interleave between steps.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")

    def encode_chat(self, messages, add_generation_prompt=True, continue_final_message=False, **template_kwargs):
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, return_dict=True, **template_kwargs)
        return list(out["input_ids"])

    def encode_prompt(self, prompt):
        if isinstance(prompt, list):
            return list(prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    @functools.lru_cache(maxsize=65536)
    def token_text(self, token_id):
        return self.tokenizer.decode([token_id])

    def vocab_limit(self):
        return min(len(self.tokenizer), self.vocab_size)

    def compile_constraint(self, kind, value):
        g = self.grammars
        return {"json_schema": g.json_schema, "regex": g.regex, "choice": g.choice, "grammar": g.ebnf,
                "json_object": lambda _v: g.json_object()}[kind](value)

    def _prefill(self, state: dict, prompt_ids: list[int], prompt_logprobs: int | None):
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([prompt_ids], device=self.device)
            # Only the last position's logits unless prompt logprobs are asked for: a full [n, vocab]
            # logits tensor at long prompts is gigabytes.
            keep = 0 if prompt_logprobs is not None else 1
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep)
            state["past"] = out.cache
            logits = out.logits[0]
            records = None
            if prompt_logprobs is not None:
                records = [None]
                for start in range(0, len(prompt_ids) - 1, 256):  # log-softmax in row blocks: bounded memory
                    block = torch.log_softmax(logits[start:start + 256].float(), dim=-1)
                    for i, row in enumerate(block[: len(prompt_ids) - 1 - start]):
                        records.append(token_logprob(row, prompt_ids[start + i + 1], prompt_logprobs))
            return logits[-1], records

    def _decode_step(self, state: dict, token: int):
        torch = self._torch
        with torch.inference_mode():
            # transformers >= 5.2x names the KV cache `cache` (was `past_key_values`).
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), cache=state["past"],
                             use_cache=True, logits_to_keep=1)
            state["past"] = out.cache
            return out.logits[0, -1]

    def _first(self, state, prompt_ids, params, sampler):
        logits, records = self._prefill(state, prompt_ids, params.prompt_logprobs)
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
            (token, record), prompt_records = await loop.run_in_executor(
                self._pool, self._first, state, prompt_ids, params, sampler)
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
                text = self.tokenizer.decode(out_ids, skip_special_tokens=params.skip_special_tokens)
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
