"""The `hf` backend: transformers `generate` in engine actors (CPU, or one GPU per actor).

Structured outputs through `ctxforge.structured` (xgrammar's Hugging Face logits processor, shared
with the CPU serving engine): the JSON schema is compiled against the model's tokenizer (cached per
schema in the actor) and masks every token that would leave the grammar, so the output is
schema-shaped JSON unless the token budget runs out first.

Requests are generated one at a time and seeded from their id, so a rerun reproduces the same text
(batched generation with padding would make outputs depend on batch composition). The engine takes
two requests at once by default (generator.requests_per_engine): one generates while the next waits
inside the actor, so no round trip to the driver leaves the model idle between requests.
"""

from __future__ import annotations

import json
import logging
import threading

from ctxforge.generation.backends import register
from ctxforge.generation.backends.base import RAY_ADDRESS_KEYS, Engine, EngineFactory, GeneratorBackend, error_result

log = logging.getLogger(__name__)


class HFEngine(Engine):
    """The loaded model: one request generated at a time, seeded from the request."""

    slots = 2

    def __init__(self, model_path: str, device: str, dtype: str, max_model_len: int, slots: int = 2):
        import torch

        from ctxforge.models import load_causal_lm
        from ctxforge.structured import Grammars

        self.slots = slots
        self._lock = threading.Lock()  # one generate() at a time: the others wait their turn
        log.info("hf engine: loading %s on %s", model_path, device)
        self.torch = torch
        self.max_model_len = max_model_len
        self.model, self.tokenizer, self.device = load_causal_lm(model_path, device, dtype)
        self.grammars = Grammars(self.tokenizer, vocab_size=self.model.config.vocab_size)
        gen_eos = self.model.generation_config.eos_token_id
        candidates = [self.tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
        self.eos_ids = sorted({i for i in candidates if isinstance(i, int)})

    def _generate(self, row: dict) -> dict:
        torch = self.torch
        messages = json.loads(row["messages"])
        prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)["input_ids"]
        n_prompt = len(prompt_ids)
        max_new = int(row["max_tokens"])
        if n_prompt + max_new > self.max_model_len:
            return {"output_text": "", "prompt_tokens": n_prompt, "completion_tokens": 0,
                    "error": f"prompt_too_long: {n_prompt} prompt + {max_new} completion tokens > max_model_len {self.max_model_len}"}
        # a LogitsProcessor holds its matcher state: one per generate() call
        processor = (self.grammars.logits_processor(self.grammars.json_schema(row["schema"])) if row["schema"]
                     else None)  # "" = a free-text request
        input_ids = torch.tensor([prompt_ids], device=self.device)
        torch.manual_seed(int(row["seed"]))
        temperature = float(row["temperature"])
        sample = temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                do_sample=sample, temperature=temperature if sample else None,
                top_p=float(row["top_p"]) if sample else None, top_k=None,
                repetition_penalty=float(row.get("repetition_penalty", 1.0)),
                logits_processor=[processor] if processor else None, eos_token_id=self.eos_ids,
                pad_token_id=self.tokenizer.pad_token_id or self.eos_ids[0],
            )
        new_tokens = out[0, n_prompt:].tolist()
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        return {"output_text": text, "prompt_tokens": n_prompt, "completion_tokens": len(new_tokens), "error": ""}

    def generate(self, row: dict) -> dict:
        with self._lock:
            try:
                return self._generate(row)
            except Exception as exc:  # one broken request must not kill the run: record it, retry later
                log.exception("generation failed for %s", row["request_id"])
                return error_result(f"{type(exc).__name__}: {str(exc)[:200]}")


@register("hf")
class HFBackend(GeneratorBackend):
    """transformers `generate` in engine actors; needs a local model directory (no hub at run time)."""

    @classmethod
    def check(cls, cfg, model_path: str) -> None:
        from pathlib import Path

        if not Path(model_path).is_dir():
            raise ValueError(f"generator.model {cfg.model!r}: the hf backend needs a local model directory (no model "
                             f"hub is reached at run time); download it first or use generator.backend=vllm/http")

    @classmethod
    def check_device(cls, cfg, ray_address: str | None) -> None:
        from ctxforge.devices import check_gpu_reachable

        check_gpu_reachable("generator.", cfg.device, None, ray_address, RAY_ADDRESS_KEYS)

    def engine_factory(self) -> EngineFactory:
        cfg = self.cfg
        return EngineFactory(f"{__name__}:HFEngine", {
            "model_path": self.model_path, "device": cfg.device, "dtype": cfg.dtype,
            "max_model_len": cfg.max_model_len, "slots": self.slots_per_engine()})

    def default_slots(self) -> int:
        return 2

    def describe(self) -> dict:
        return {**super().describe(), "device": self.cfg.device, "actors": self.cfg.concurrency}
