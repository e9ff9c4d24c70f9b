"""Sampling parameters and the per-step choice of the next token (CPU engine).

`SamplingParams` is what the routes resolve a request into; `Sampler` turns one step's raw logits
into the next token and its logprobs. Order, as vLLM applies them: logit bias and allowed tokens,
repetition penalty (prompt + output tokens, CTRL's rule: positive logits divided, negative
multiplied), frequency and presence penalties (output tokens, OpenAI's rule: logit -= f*count +
p*[count > 0]), min_tokens (end-of-sequence masked), the grammar mask (structured outputs), then
greedy when temperature is 0, else temperature, top-k, min-p and top-p (nucleus) sampling with a
per-sequence torch.Generator (seeded when `seed` is set, so a seeded request repeats exactly).
Reported logprobs are the model's own distribution (log-softmax of the raw logits), as vLLM reports
them by default. Nothing here knows about HTTP or tokenizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16                  # tokens to generate (0 = none: echo / prompt logprobs only)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                        # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: list[int] | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    seed: int | None = None
    logprobs: int | None = None           # alternatives per generated token; None = no logprobs
    prompt_logprobs: int | None = None    # alternatives per prompt token; None = none
    grammar: Any = None                   # a compiled xgrammar grammar (ctxforge.structured), or None


@dataclass
class TokenLogprob:
    """One position: the token there, its logprob and 1-based rank, and the `k` most likely tokens."""
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def token_logprob(logprobs, token_id: int, k: int) -> TokenLogprob:
    """`logprobs`: [vocab] log-softmax row (torch). Top-k alternatives in rank order."""
    import torch

    lp = float(logprobs[token_id])
    rank = int((logprobs > logprobs[token_id]).sum().item()) + 1
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, idx = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return TokenLogprob(token_id, lp, rank, top)


class Sampler:
    """Chooses tokens for one sequence; holds its penalties' counts, grammar state and generator."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int], eos_ids: set[int], vocab_size: int,
                 device, grammars=None):
        import torch

        self.torch = torch
        self.params = params
        self.eos_ids = sorted(eos_ids | set(params.stop_token_ids))
        self.vocab_size = vocab_size
        self.ids = list(prompt_ids)
        self.generated = 0
        self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed % (2**63))
        self.processor = grammars.logits_processor(params.grammar) if params.grammar is not None else None
        self.allowed = None
        if params.allowed_token_ids is not None:
            self.allowed = torch.full((vocab_size,), float("-inf"), device=device)
            self.allowed[params.allowed_token_ids] = 0.0

    def _process(self, logits):
        torch, p = self.torch, self.params
        x = logits.float().clone()
        for tok, bias in p.logit_bias.items():
            x[tok] += bias
        if self.allowed is not None:
            x += self.allowed
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(self.ids)), device=x.device)
            vals = x[seen]
            x[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            x -= p.frequency_penalty * self.counts + p.presence_penalty * (self.counts > 0).float()
        if self.generated < p.min_tokens and self.eos_ids:
            x[self.eos_ids] = float("-inf")
        if self.processor is not None:
            ids = torch.tensor([self.ids], device=x.device)
            x = self.processor(ids, x.unsqueeze(0))[0]
        return x

    def choose(self, logits) -> tuple[int | None, TokenLogprob | None]:
        """(next token or None when every token is masked, its logprob record when asked for)."""
        torch, p = self.torch, self.params
        x = self._process(logits)
        if not torch.isfinite(x).any():
            return None, None
        if p.temperature < 1e-5:
            token = int(torch.argmax(x).item())
        else:
            x = x / p.temperature
            if p.top_k and p.top_k > 0 and p.top_k < x.numel():
                kth = torch.topk(x, p.top_k).values[-1]
                x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
            probs = torch.softmax(x, dim=-1)
            if p.min_p > 0.0:
                probs = torch.where(probs < p.min_p * probs.max(), torch.zeros_like(probs), probs)
            if p.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
            token = int(torch.multinomial(probs / probs.sum(), 1, generator=self.generator).item())
        record = None
        if p.logprobs is not None:
            record = token_logprob(torch.log_softmax(logits.float(), dim=-1), token, p.logprobs)
        self.ids.append(token)
        self.generated += 1
        self.counts[token] += 1
        return token, record
