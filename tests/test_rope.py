"""Stepwise RoPE: each stage's setting reaches the rotary buffers, config.json, and a reload."""

from __future__ import annotations

import json

import pytest
import torch

from ctxforge.train.model import load_stage_model
from ctxforge.train.rope import (RopeConfig, expected_inv_freq, recompute_rotary, stage_rope_parameters,
                                 verify_rotary)
from ctxforge.train.sequence_parallel import DOC_SDPA


def _inv(model):
    return model.get_decoder().rotary_emb.inv_freq.clone()


def test_editing_the_config_of_a_built_model_changes_nothing(tiny_model_path):
    """Negative control: the transformers pitfall the stage code exists to avoid."""
    model = load_stage_model(tiny_model_path, RopeConfig(), 4096, DOC_SDPA)
    before = _inv(model)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 5e7}
    assert torch.equal(_inv(model), before)
    with pytest.raises(RuntimeError, match="does not match"):
        verify_rotary(model)
    assert recompute_rotary(model) == 1       # the in-place alternative does take effect
    verify_rotary(model)
    assert not torch.equal(_inv(model), before)


def test_stage_theta_is_built_saved_and_reloaded(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM

    base = load_stage_model(tiny_model_path, RopeConfig(), 4096, DOC_SDPA)
    stage = load_stage_model(tiny_model_path, RopeConfig(theta=2.5e7), 65536, DOC_SDPA)
    assert not torch.allclose(_inv(stage), _inv(base))
    torch.testing.assert_close(_inv(stage), expected_inv_freq(stage.config)[0])
    ids = torch.arange(100, 140)[None]
    pos = torch.arange(40)[None] + 1000
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids, position_ids=pos).logits,
                                  stage(input_ids=ids, position_ids=pos).logits)

    stage.save_pretrained(tmp_path, safe_serialization=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_theta"] == 2.5e7
    assert saved["max_position_embeddings"] == 65536
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_inv(reloaded), _inv(stage))
    verify_rotary(reloaded)


@pytest.mark.parametrize("rope", [
    RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=32768),
    RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
               original_max_position_embeddings=8192, theta=5e5),
    RopeConfig(type="linear", factor=2.0),
])
def test_scaling_types_take_effect(tiny_model_path, rope):
    base = load_stage_model(tiny_model_path, RopeConfig(), 4096, DOC_SDPA)
    model = load_stage_model(tiny_model_path, rope, 131072, DOC_SDPA)
    assert model.config.rope_parameters["rope_type"] == rope.type
    verify_rotary(model)
    assert not torch.allclose(_inv(model), _inv(base))


def test_changing_type_drops_the_previous_scaling_keys():
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert stage_rope_parameters(llama3, RopeConfig(type="default", theta=1e8)) == {"rope_type": "default",
                                                                                    "rope_theta": 1e8}
    kept = stage_rope_parameters(llama3, RopeConfig(factor=16.0))
    assert kept["rope_type"] == "llama3" and kept["factor"] == 16.0 and kept["low_freq_factor"] == 1.0
