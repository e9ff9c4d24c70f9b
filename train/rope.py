"""Stepwise RoPE scaling: each curriculum stage sets the model's RoPE parameters for its length.

transformers computes `inv_freq` once, in the rotary embedding's constructor, and keeps it as a
non-persistent buffer: editing `config.rope_parameters` of a built model changes nothing, and
`inv_freq` is never saved. So a stage (1) writes its RoPE parameters into the config *before* the model
is built from the previous stage's weights (`stage_config`), (2) checks after the build that the
rotary buffers equal what the config implies (`verify_rotary`), and (3) saves that config with every
checkpoint, so transformers and vLLM load each checkpoint with the stage's positions.

Supported for training: theta per stage (`rope_type: default`) and the static scaling types transformers
knows (linear, yarn, llama3), with their factor and parameters. `dynamic` (dynamic NTK) is refused
(`check_trainable`): it rescales `inv_freq` at inference from the current length beyond
`max_position_embeddings`, which a stage raises to its own length, so in training it would never rescale,
and under SP each rank would pick a scale from its own shard.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Literal

import torch
from pydantic import Field

from ctxforge.config import StrictModel

RopeType = Literal["default", "linear", "dynamic", "yarn", "llama3"]


class RopeConfig(StrictModel):
    """A stage's RoPE setting. Unset fields keep the previous stage's (or the base model's) value."""

    # finite only: an infinite factor or theta passes gt=0 and reaches config.json
    theta: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="rope_theta (base); null = keep the model's")
    type: RopeType | None = Field(None, description="rope_type: default | linear | yarn | llama3 (dynamic is "
                                                    "refused for training); null = keep the model's")
    factor: float | None = Field(None, gt=0, allow_inf_nan=False,
                                 description="scaling factor (linear, dynamic, yarn, llama3)")
    original_max_position_embeddings: int | None = Field(
        None, gt=0, description="context length the scaling is relative to (yarn, llama3)")
    low_freq_factor: float | None = Field(None, gt=0, allow_inf_nan=False, description="llama3 only")
    high_freq_factor: float | None = Field(None, gt=0, allow_inf_nan=False, description="llama3 only")
    beta_fast: float | None = Field(None, gt=0, allow_inf_nan=False, description="yarn only")
    beta_slow: float | None = Field(None, gt=0, allow_inf_nan=False, description="yarn only")
    attention_factor: float | None = Field(None, gt=0, allow_inf_nan=False,
                                           description="yarn: attention temperature; null = default")


TRAINABLE_TYPES = ("default", "linear", "yarn", "llama3")


def dynamic_rope_message(where: str) -> str:
    return (f"{where}: rope type 'dynamic' cannot be trained: dynamic NTK rescales RoPE at inference from the current "
            f"sequence length beyond max_position_embeddings, which training raises to the stage length (it would never "
            f"rescale), and under sequence parallelism each rank would pick its own scale; use rope.type default with a "
            f"larger rope.theta (ABF), or linear, yarn or llama3 with a factor")


def check_trainable(rope_parameters: dict, where: str) -> None:
    """Raise ValueError naming the alternatives unless the RoPE type is one training can use."""
    rope_type = rope_parameters.get("rope_type", rope_parameters.get("type", "default"))
    if rope_type == "dynamic":
        raise ValueError(dynamic_rope_message(where))
    if rope_type not in TRAINABLE_TYPES:
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported for training (supported: "
                         f"{', '.join(TRAINABLE_TYPES)})")


_SCALING_KEYS = ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor",
                 "beta_fast", "beta_slow", "attention_factor")


# The RopeConfig fields each type's frequencies are computed from (transformers' modeling_rope_utils: the keys its
# `_validate_<type>_rope_parameters` requires or allows; tests/test_rope.py checks this table against them). A
# field set for a type that does not read it would be dropped with at most a warning: the run would go on
# unscaled, or scaled from defaults, while the config says otherwise.
FIELDS_READ_BY_TYPE = {
    "default": ("theta",),
    "linear": ("theta", "factor"),
    "dynamic": ("theta", "factor"),
    "yarn": ("theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor"),
    "llama3": ("theta", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def check_fields_take_effect(rope: RopeConfig, rope_type: str, where: str) -> None:
    """Raise ValueError naming `{where}.<field>` when `rope` sets a field that `rope_type` (the resulting type:
    rope.type, or the checkpoint's when rope.type is unset) does not read, e.g. a factor with type default."""
    reads = FIELDS_READ_BY_TYPE.get(rope_type)
    if reads is None:   # a type ctxforge does not offer (the checkpoint's own, e.g. longrope): transformers decides
        return
    for name in RopeConfig.model_fields:
        value = getattr(rope, name)
        if name == "type" or value is None or name in reads:
            continue
        users = [t for t, fields in FIELDS_READ_BY_TYPE.items() if name in fields]
        whose = f"{where}.type" if rope.type is not None else f"the checkpoint's; {where}.type is unset"
        raise ValueError(f"{where}.{name}: {value} has no effect with rope type {rope_type!r} ({whose}): only "
                         f"{', '.join(users)} read it; set {where}.type to one of them, or leave {where}.{name} unset")


# Scaling types whose frequencies are relative to the window the checkpoint was trained at.
WINDOW_RELATIVE_TYPES = ("yarn", "llama3", "longrope")


def stage_rope_parameters(current: dict, rope: RopeConfig, trained_window: int | None = None) -> dict:
    """The model's `rope_parameters` (transformers v5 dict) after applying a stage's setting.

    Changing the rope type drops the previous type's scaling keys, so no stale llama3 factor rides
    along into a yarn or default config. `trained_window`: the checkpoint's max_position_embeddings
    *before* a stage or a served window raises it; a yarn/llama3 setting without
    original_max_position_embeddings gets it as that value (filling it from the raised window would
    scale from the wrong length, the fault of Megatron-LM issue 1418).
    """
    params = dict(current)
    if rope.type is not None and rope.type != params.get("rope_type", "default"):
        params = {k: v for k, v in params.items() if k not in _SCALING_KEYS}
        params["rope_type"] = rope.type
    if rope.theta is not None:
        params["rope_theta"] = float(rope.theta)
    for key in _SCALING_KEYS:
        value = getattr(rope, key)
        if value is not None:
            params[key] = value
    params.setdefault("rope_type", "default")
    if params["rope_type"] in WINDOW_RELATIVE_TYPES and trained_window and not params.get("original_max_position_embeddings"):
        params["original_max_position_embeddings"] = int(trained_window)
    return params


# transformers' names in rope_parameters -> the RopeConfig field a user sets
_FIELD = {"rope_theta": "theta", "rope_type": "type"}


def pretrained_window(text_config, rope: RopeConfig) -> tuple[int | None, str]:
    """(positions, which config.json field says so): the window a RoPE scaling of the checkpoint is relative
    to, i.e. the value original_max_position_embeddings takes when `rope` leaves it unset
    (stage_rope_parameters), read before any override raises max_position_embeddings.

    A checkpoint already scaled, when `rope` keeps its type, is relative to its own
    original_max_position_embeddings (Llama-3.1's llama3 scaling: 8192, under max_position_embeddings
    131072): its weights learned frequencies computed from that. Otherwise (no scaling yet, or a new type,
    which drops the old type's keys) it is max_position_embeddings, the length the checkpoint was trained
    at (a curriculum stage raises it to the length it trained)."""
    current = text_config.rope_parameters or {}
    current_type = current.get("rope_type", current.get("type", "default"))
    keeps_type = rope.type is None or rope.type == current_type
    if current_type != "default" and keeps_type and current.get("original_max_position_embeddings"):
        return int(current["original_max_position_embeddings"]), "its rope original_max_position_embeddings"
    return int(text_config.max_position_embeddings or 0) or None, "max_position_embeddings"


@contextlib.contextmanager
def _transformers_rope_warnings_held() -> Iterator[list[logging.LogRecord]]:
    """Hold the records transformers' RoPE validation logs (it warns, e.g. for a factor below 1, on the
    `transformers.modeling_rope_utils` logger) instead of printing them; the caller drops them when it
    refuses the setting with its own line, and logs them as transformers would when it accepts it."""
    logger = logging.getLogger("transformers.modeling_rope_utils")
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    hold, propagate = Hold(), logger.propagate
    logger.addHandler(hold)
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(hold)
        logger.propagate = propagate


def apply_rope(config, rope: RopeConfig, max_seq_len: int, where: str = "rope"):
    """Write `rope` into a transformers config (in place, returned) and raise max_position_embeddings to
    `max_seq_len`, then run transformers' own validation (`validate_rope`) on the result, so every
    setting it would refuse when a model is built is refused here, as a ValueError of one line naming
    `{where}.<key>`. Also refused: a scaling factor below 1 and llama3 with high_freq_factor <=
    low_freq_factor (transformers only warns; the inverse frequencies come out inverted or NaN), and an
    original_max_position_embeddings above the checkpoint's window (`pretrained_window`): yarn, llama3,
    longrope and dynamic compute their frequencies from it, so a larger value claims context the weights
    never saw and silently changes the scaling. Equal is what an unset value becomes; smaller is accepted
    (the true pretraining length may be shorter than the window a config states). And a field the resulting
    type does not read (`check_fields_take_effect`: a factor with type default, beta_fast with llama3).

    transformers' own warnings about a setting refused here are not printed: the ValueError is the one line."""
    import re

    text = config.get_text_config()
    trained = int(text.max_position_embeddings or 0) or None
    window, source = pretrained_window(text, rope)
    original = rope.original_max_position_embeddings
    if original is not None and window and original > window:
        raise ValueError(f"{where}.original_max_position_embeddings: {original} is larger than the checkpoint's "
                         f"window of {window} positions ({source} in its config.json): it claims more pretrained "
                         f"context than the weights saw, and the scaling is computed from it; set {window} or less "
                         f"(or leave it unset)")
    params = stage_rope_parameters(dict(text.rope_parameters or {}), rope, trained)
    check_fields_take_effect(rope, params.get("rope_type", "default"), where)
    text.rope_parameters = params
    text.max_position_embeddings = max(int(text.max_position_embeddings or 0), int(max_seq_len))
    rope_type = params.get("rope_type", "default")
    with _transformers_rope_warnings_held() as held:
        try:
            text.validate_rope()
        except KeyError as exc:
            keys = sorted(re.findall(r"'(\w+)'", str(exc).split(":", 1)[-1]))
            names = ", ".join(f"{where}.{_FIELD.get(k, k)}" for k in keys) or str(exc)
            raise ValueError(f"{names}: rope type {rope_type!r} needs {'them' if len(keys) > 1 else 'it'} (transformers refuses the setting without it)") from None
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    factor = params.get("factor")
    if rope_type != "default" and factor is not None and factor < 1:
        raise ValueError(f"{where}.factor: {factor} is below 1; a {rope_type} factor scales the window up (new / original)")
    if rope_type == "yarn" and params.get("beta_fast", 32) <= params.get("beta_slow", 1):   # transformers' defaults
        raise ValueError(f"{where}.beta_fast: {params.get('beta_fast', 32)} must exceed beta_slow "
                         f"{params.get('beta_slow', 1)} (yarn blends the frequencies between their correction dims)")
    if rope_type == "llama3" and params.get("high_freq_factor", 0) <= params.get("low_freq_factor", 0):
        raise ValueError(f"{where}.high_freq_factor: {params.get('high_freq_factor')} must exceed low_freq_factor "
                         f"{params.get('low_freq_factor')} (llama3 interpolates between them)")
    for record in held:  # a setting accepted here: transformers' remarks about it are printed as usual
        logging.getLogger(record.name).handle(record)
    return config


def stage_config(model_path: str, rope: RopeConfig, max_seq_len: int):
    """The model config for a stage: RoPE per the stage, max_position_embeddings >= the stage length.
    Raises ValueError for a RoPE type training cannot use (the model's own, when the stage keeps it)
    or a setting transformers refuses."""
    config = serving_config(model_path, rope, max_seq_len)
    check_trainable(config.get_text_config().rope_parameters,
                    f"{model_path}: rope (the model's, kept by the stage)" if rope.type is None else "rope.type")
    return config


def serving_config(model_path: str, rope: RopeConfig, window: int, where: str = "rope"):
    """The checkpoint's config with `rope` applied and max_position_embeddings raised to `window`
    (apply_rope: ValueError naming `{where}.<key>` for a setting transformers refuses). Any type,
    dynamic included: serving rescales at inference as the type intends."""
    from transformers import AutoConfig

    return apply_rope(AutoConfig.from_pretrained(model_path), rope, window, where)


def expected_inv_freq(config) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) that the config implies, computed like transformers' constructors."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = config.get_text_config()
    rope_type = text.rope_parameters.get("rope_type", "default")
    if rope_type == "default":
        base = text.rope_parameters["rope_theta"]
        dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dim = int(dim * text.rope_parameters.get("partial_rotary_factor", 1.0))
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](text, "cpu")


def rotary_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def verify_rotary(model) -> None:
    """Raise unless every rotary module's inv_freq and attention_scaling match the model's config.

    Raises RuntimeError when the model has no rotary module or one disagrees with the config.
    """
    inv, scaling = expected_inv_freq(model.config)
    mods = rotary_modules(model)
    if not mods:
        raise RuntimeError(f"{type(model).__name__}: no rotary embedding module (inv_freq) found")
    for mod in mods:
        if not torch.allclose(mod.inv_freq.float().cpu(), inv, rtol=1e-6, atol=0):
            raise RuntimeError(f"{type(model).__name__}: rotary inv_freq does not match config.rope_parameters "
                               f"{model.config.get_text_config().rope_parameters}: was the config changed after the "
                               f"model was built?")
        if abs(float(getattr(mod, "attention_scaling", 1.0)) - float(scaling)) > 1e-9:
            raise RuntimeError(f"rotary attention_scaling {mod.attention_scaling} != {scaling} from the config")


def recompute_rotary(model) -> int:
    """Recompute inv_freq/original_inv_freq/attention_scaling of a built model from its config (the
    in-place alternative to rebuilding); returns the number of rotary modules updated."""
    inv, scaling = expected_inv_freq(model.config)
    mods = rotary_modules(model)
    for mod in mods:
        mod.inv_freq = inv.to(mod.inv_freq.device)
        if hasattr(mod, "original_inv_freq"):
            mod.original_inv_freq = inv.clone().to(mod.inv_freq.device)
        mod.attention_scaling = scaling
        mod.rope_type = model.config.get_text_config().rope_parameters.get("rope_type", "default")
    return len(mods)
