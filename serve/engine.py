"""The engine protocol behind the HTTP routes, and the transformers engine that serves on CPU.

The routes (app.py) only know `Engine`: turn messages or a prompt into token ids, check them against
the window, and stream generated text. `HFEngine` implements it with a plain KV-cached decode loop
over a `from_pretrained` causal LM, one token per step on a single worker thread, so concurrent
requests interleave token by token instead of blocking each other for a whole generation. The engine
knows nothing about HTTP, OpenAI JSON or Ray.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import AsyncIterator


class ContextLengthError(ValueError):
    """The prompt (plus the requested completion) does not fit the model's window."""


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Step:
    """One streamed piece: `text` is new output; the last step carries finish_reason and counts."""
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine(ABC):
    model_id: str
    max_model_len: int

    @abstractmethod
    def encode_chat(self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool) -> list[int]: ...

    @abstractmethod
    def encode_prompt(self, prompt: str | list[int]) -> list[int]: ...

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


class _StopScanner:
    """Finds stop strings in the growing output and holds back text that may be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def cut(self, text: str) -> int | None:
        hits = [text.find(s) for s in self.stops if s in text]
        return min(hits) if hits else None


class HFEngine(Engine):
    """A transformers causal LM on one device, decoded token by token with its KV cache."""

    def __init__(self, model_path: str, model_id: str, max_model_len: int, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import GenerationConfig

        from ctxforge.models import load_causal_lm

        self._torch = torch
        self.model_id = model_id
        self.max_model_len = max_model_len
        self.model, self.tokenizer, self.device = load_causal_lm(model_path, device, dtype)
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
        # One worker thread: model steps never run concurrently (CPU threads are scarce, GPU memory too);
        # requests interleave between steps.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-engine")

    def encode_chat(self, messages, add_generation_prompt=True, continue_final_message=False):
        out = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, return_dict=True)
        return list(out["input_ids"])

    def encode_prompt(self, prompt):
        if isinstance(prompt, list):
            return list(prompt)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def _sample(self, logits, params: SamplingParams, generator):
        torch = self._torch
        if params.temperature == 0.0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
            sorted_p = sorted_p * keep
            return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)].item())
        return int(torch.multinomial(probs, 1, generator=generator).item())

    def _step(self, state: dict, params: SamplingParams) -> int:
        torch = self._torch
        with torch.inference_mode():
            ids = torch.tensor([state["next_input"]], device=self.device)
            # transformers >= 5.2x names the KV cache `cache` (was `past_key_values`).
            out = self.model(input_ids=ids, cache=state.get("past"), use_cache=True)
            state["past"] = out.cache
            return self._sample(out.logits[0, -1], params, state["generator"])

    async def generate(self, prompt_ids, params):
        budget = self.completion_budget(len(prompt_ids), params.max_tokens)
        loop = asyncio.get_running_loop()
        generator = None
        if params.seed is not None:
            generator = self._torch.Generator(device=self.device).manual_seed(params.seed)
        state = {"next_input": list(prompt_ids), "generator": generator}
        scanner = _StopScanner(params.stop)
        out_ids: list[int] = []
        sent = 0
        finish = "length"
        text = ""
        try:
            while len(out_ids) < budget:
                token = await loop.run_in_executor(self._pool, self._step, state, params)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                out_ids.append(token)
                state["next_input"] = [token]
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                cut = scanner.cut(text) if params.stop else None
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                # Hold back an incomplete UTF-8 character and what may be the start of a stop string.
                safe = len(text.rstrip("\ufffd")) - (scanner.hold if params.stop else 0)
                if safe > sent:
                    yield Step(text[sent:safe])
                    sent = safe
        finally:
            state.pop("past", None)
        yield Step(text[sent:], finish_reason=finish, prompt_tokens=len(prompt_ids), completion_tokens=len(out_ids))
