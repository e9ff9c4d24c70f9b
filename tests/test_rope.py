"""Stepwise RoPE: each stage's setting reaches the rotary buffers, config.json, and a reload."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- settings transformers refuses: one line naming the key, at preflight, on every path ---------------

REFUSED_ROPE = [  # (override, the key the line must name)
    ({"type": "linear"}, "factor"),
    ({"type": "dynamic"}, "factor"),
    ({"type": "yarn"}, "factor"),
    ({"type": "llama3", "factor": 8.0}, "high_freq_factor, {}.low_freq_factor"),
    ({"type": "linear", "factor": 0.5}, "factor"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, "high_freq_factor"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast"),   # transformers only warns
]
ACCEPTED_ROPE = [  # every type with what it needs; yarn and llama3 without original_max_position_embeddings
    {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}, {"type": "yarn", "factor": 4.0},
    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}, {"theta": 2e6},
]


@pytest.mark.parametrize("override, key", REFUSED_ROPE)
def test_serve_and_eval_preflight_refuse_a_rope_setting_transformers_refuses(tiny_model_path, override, key):
    from ctxforge.config import PreflightError
    from ctxforge.serve.preflight import check_model

    rope = RopeConfig(**override)
    for model_key, rope_key in (("model", "rope"), ("models.0.model", "models.0.rope")):  # serve, eval
        with pytest.raises(PreflightError) as err:
            check_model(tiny_model_path, model_key, rope)
        msg = str(err.value)
        assert msg.startswith(f"{rope_key}.{key.format(rope_key)}: ") and "\n" not in msg, msg


@pytest.mark.parametrize("override, key", [c for c in REFUSED_ROPE if c[0]["type"] != "dynamic"])  # config refuses it
def test_train_preflight_refuses_a_rope_setting_transformers_refuses(tiny_model_path, override, key):
    from transformers import AutoConfig

    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig

    cfg = load_config(TrainConfig, "train-tiny", [f"stages.1.rope={json.dumps(override)}"])
    rope_key = "stage 8K: rope"
    with pytest.raises(ValueError, match=rf"^{rope_key}\.{key.format(rope_key)}: "):
        cfg.validate_for(AutoConfig.from_pretrained(tiny_model_path))


@pytest.mark.parametrize("override", ACCEPTED_ROPE)
def test_every_scaling_type_with_what_it_needs_passes_both_paths(tiny_model_path, override):
    from transformers import AutoConfig

    from ctxforge.config import load_config
    from ctxforge.serve.preflight import check_model
    from ctxforge.train.config import TrainConfig

    check_model(tiny_model_path, "model", RopeConfig(**override))  # negative control: no error
    if override.get("type") != "dynamic":
        load_config(TrainConfig, "train-tiny", [f"stages.1.rope={json.dumps(override)}"]).validate_for(
            AutoConfig.from_pretrained(tiny_model_path))


def test_the_original_window_defaults_to_the_checkpoints_window_before_it_is_raised(tiny_model_path):
    """The tiny checkpoint's window is 32768; serving (or a stage) raises max_position_embeddings to 131072.
    yarn/llama3 scale from the window the weights were trained at: 32768, never the raised 131072."""
    from ctxforge.serve.vllm_app import vllm_hf_overrides
    from ctxforge.serve.config import ServeConfig, checkpoint_context_length
    from ctxforge.train.rope import serving_config, stage_config

    trained = json.loads((Path(tiny_model_path) / "config.json").read_text())["max_position_embeddings"]
    assert trained == 32768
    yarn = RopeConfig(type="yarn", factor=4.0)
    for config in (serving_config(tiny_model_path, yarn, 131072), stage_config(tiny_model_path, yarn, 131072)):
        text = config.get_text_config()
        assert text.max_position_embeddings == 131072
        assert text.rope_parameters["original_max_position_embeddings"] == trained
    assert checkpoint_context_length(tiny_model_path, yarn) == 4 * trained
    served = ServeConfig.model_validate({"model": tiny_model_path, "rope": yarn.model_dump()})
    overrides = vllm_hf_overrides(served, tiny_model_path, 131072)
    assert overrides["rope_parameters"]["original_max_position_embeddings"] == trained
    assert overrides["max_position_embeddings"] == 131072
    llama3 = RopeConfig(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    assert serving_config(tiny_model_path, llama3, 262144).get_text_config().rope_parameters[
        "original_max_position_embeddings"] == trained
    given = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=8192)  # a set value is kept
    assert serving_config(tiny_model_path, given, 131072).get_text_config().rope_parameters[
        "original_max_position_embeddings"] == 8192
    model = load_stage_model(tiny_model_path, yarn, 131072, DOC_SDPA)  # and the model builds with it
    verify_rotary(model)


# --- original_max_position_embeddings: never more than the window the checkpoint's scaling is relative to ---

def _serve_eval_train_errors(model_path: str, override: dict) -> list[str]:
    """The error line of every path that takes a RoPE override: serve (hf and vllm), eval, train ('' = accepted)."""
    from transformers import AutoConfig

    from ctxforge.config import PreflightError, load_config
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.preflight import check_model, preflight_serve
    from ctxforge.train.config import TrainConfig

    lines = []
    for backend in ("hf", "vllm"):
        served = ServeConfig.model_validate({"model": model_path, "backend": backend, "device": "cpu", "rope": override})
        try:
            check_model(served.model, "model", served.rope, served.max_model_len)
            if backend == "vllm":
                preflight_serve(served)  # the vllm path's whole preflight refuses it too
            lines.append("")
        except PreflightError as exc:
            lines.append(str(exc))
    try:
        check_model(model_path, "models.0.model", RopeConfig(**override))
        lines.append("")
    except PreflightError as exc:
        lines.append(str(exc))
    cfg = load_config(TrainConfig, "train-tiny", [f"model={model_path}", f"stages.0.rope={json.dumps(override)}"])
    try:
        cfg.validate_for(AutoConfig.from_pretrained(model_path))
        lines.append("")
    except ValueError as exc:
        lines.append(str(exc))
    return lines


def test_an_original_window_above_the_checkpoints_is_refused_on_every_path(tiny_model_path):
    """The tiny checkpoint was trained at 32768 positions: yarn from 65536 would claim twice the context."""
    lines = _serve_eval_train_errors(tiny_model_path, {"type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 65536})
    keys = ["rope", "rope", "models.0.rope", "stage 4K: rope"]   # serve hf, serve vllm, eval, train
    for line, key in zip(lines, keys):
        assert line.startswith(f"{key}.original_max_position_embeddings: 65536 is larger than the checkpoint's "
                               f"window of 32768 positions (max_position_embeddings"), line
        assert "\n" not in line


@pytest.mark.parametrize("original", [32768, 8192])   # equal: what an unset value becomes; smaller: a shorter truth
def test_an_original_window_equal_to_or_below_the_checkpoints_is_accepted(tiny_model_path, original):
    assert _serve_eval_train_errors(tiny_model_path, {"type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": original}) == [""] * 4


def _llama31_like(tmp_path: Path, tiny_model_path: str) -> str:
    """The tiny checkpoint with Llama-3.1's RoPE: llama3 scaling from 8192, max_position_embeddings 131072."""
    import shutil

    for f in Path(tiny_model_path).iterdir():   # tokenizer files: check_model resolves a whole model directory
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((Path(tiny_model_path) / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg["max_position_embeddings"] = 131072
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_an_already_scaled_checkpoint_is_relative_to_its_own_original_window(tiny_model_path, tmp_path):
    from ctxforge.config import PreflightError
    from ctxforge.serve.preflight import check_model

    path = _llama31_like(tmp_path, tiny_model_path)
    # keeping llama3: its frequencies were learned relative to 8192, not to the 131072 it was trained at
    with pytest.raises(PreflightError, match=r"^rope\.original_max_position_embeddings: 131072 is larger than the "
                                             r"checkpoint's window of 8192 positions \(its rope original_max_pos"):
        check_model(path, "model", RopeConfig(factor=16.0, original_max_position_embeddings=131072))
    check_model(path, "model", RopeConfig(factor=16.0))                               # negative control: unset
    check_model(path, "model", RopeConfig(factor=16.0, original_max_position_embeddings=8192))   # equal
    # a new type drops llama3's keys: it scales from the trained window (configs/eval-llama8b-1m.yaml's yarn to 1M)
    check_model(path, "model", RopeConfig(type="yarn", factor=8.0, original_max_position_embeddings=131072))
    with pytest.raises(PreflightError, match=r"^rope\.original_max_position_embeddings: 262144 .* 131072 positions "
                                             r"\(max_position_embeddings"):
        check_model(path, "model", RopeConfig(type="yarn", factor=8.0, original_max_position_embeddings=262144))


def test_transformers_warning_about_a_refused_factor_is_not_printed(tiny_model_path, caplog):
    """A factor below 1: ctxforge's line only, not transformers' warning before it; a setting that is accepted
    keeps transformers' remarks (negative control: they are not swallowed)."""
    from ctxforge.config import PreflightError
    from ctxforge.serve.preflight import check_model

    caplog.set_level("WARNING")
    with pytest.raises(PreflightError, match=r"^rope\.factor: 0\.5 is below 1"):
        check_model(tiny_model_path, "model", RopeConfig(type="linear", factor=0.5))
    assert not [r for r in caplog.records if r.name.startswith("transformers")], caplog.text
    # yarn whose factor disagrees with window / original: transformers warns, the setting stands
    check_model(tiny_model_path, "model", RopeConfig(type="yarn", factor=2.0, original_max_position_embeddings=4096),
                window=131072)
    assert [r for r in caplog.records if r.name == "transformers.modeling_rope_utils"
            and "does not match the ratio" in r.getMessage()], caplog.text


@pytest.mark.parametrize("argv", [["serve", "--model", "ctxforge:tiny", "rope.type=linear", "rope.factor=0.5"],
                                  ["train", "--config", "train-tiny", 'stages.1.rope={"type": "linear", "factor": 0.5}']])
def test_a_factor_below_one_is_one_line_on_stderr(argv):
    """The real process, with transformers' own logging set up as a user gets it."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ctxforge", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"ctxforge {argv[0]}: ") and "factor: 0.5 is below 1" in lines[0]
    assert "[transformers]" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("override, field, rope_type", [
    ({"factor": 4.0}, "factor", "default"),                       # the tiny checkpoint has no scaling: unset type
    ({"type": "default", "factor": 4.0}, "factor", "default"),
    ({"type": "linear", "factor": 2.0, "original_max_position_embeddings": 4096}, "original_max_position_embeddings",
     "linear"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "beta_fast": 32.0},
     "beta_fast", "llama3"),
    ({"type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}, "low_freq_factor", "yarn"),
])
def test_a_field_the_rope_type_does_not_read_is_refused(tiny_model_path, override, field, rope_type):
    """transformers drops such a key with a warning and the model runs unscaled (or from defaults) while the config
    says otherwise; here it is one line naming the field and the type, on every path."""
    lines = _serve_eval_train_errors(tiny_model_path, override)
    for line, key in zip(lines, ["rope", "rope", "models.0.rope", "stage 4K: rope"]):
        assert line.startswith(f"{key}.{field}: {override[field]} has no effect with rope type {rope_type!r}"), line
        assert "\n" not in line


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_the_fields_each_type_reads_are_the_keys_transformers_validates(rope_type):
    """FIELDS_READ_BY_TYPE against transformers' own lists: the keys `_validate_<type>_rope_parameters` requires
    or allows, recorded from its call to `_check_received_keys`."""
    from transformers import LlamaConfig

    from ctxforge.train.rope import _FIELD, FIELDS_READ_BY_TYPE

    seen = {}

    def record(rope_type, received_keys, required_keys, optional_keys=None, ignore_keys=None):
        seen["keys"] = set(required_keys) | set(optional_keys or ())

    config = LlamaConfig()
    full = {"rope_type": rope_type, "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 4096,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LlamaConfig, "_check_received_keys", staticmethod(record))
        getattr(config, f"_validate_{rope_type}_rope_parameters")(full)
    ours = {k for k in seen["keys"] if k in {*RopeConfig.model_fields, *_FIELD}}
    theirs = {_FIELD.get(k, k) for k in ours} - {"type"}
    assert set(FIELDS_READ_BY_TYPE[rope_type]) == theirs


@pytest.mark.parametrize("field", ["factor", "theta", "beta_fast"])
@pytest.mark.parametrize("value", ["1e400", "inf", "nan"])
def test_a_rope_number_that_is_not_finite_is_refused_naming_it(field, value):
    """An infinite factor passes gt=0 and would reach config.json (serving then fails on int(inf))."""
    from ctxforge.config import ConfigError, load_config
    from ctxforge.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=rf"rope\.{field}.*finite number"):
        load_config(ServeConfig, "serve-tiny", [f"rope.{field}={value}"])
    load_config(ServeConfig, "serve-tiny", [f"rope.{field}=4.0"])   # negative control
