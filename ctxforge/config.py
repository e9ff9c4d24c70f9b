"""Config loading shared by every stage: YAML file + dotted `key=value` overrides -> a pydantic model.

A stage's config is one typed pydantic v2 model with `extra="forbid"`; this module only knows how
to find a YAML file (a path, or the name of a config shipped in the package `ctxforge.configs`, which is
the checkout's configs/), apply dotted overrides, and turn validation errors into one message that names the file and the key.
It knows nothing about what any stage does with its config.
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
import textwrap
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypeVar, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the file and the key."""


class PreflightError(ValueError):
    """Bad input found before any work starts (a missing model, an unreadable input path...)."""


def one_line(exc: BaseException) -> str:
    """An error message on one line: a config error lists each bad key on its own line, joined here with '; '."""
    return "; ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated.

    A stage's top-level model may set `deprecated_keys` ({old dotted key: new dotted key}): load_config moves
    a value given under an old spelling to the new one and prints a deprecation notice on stderr.
    It may also set `removed_keys` ({dotted key: what replaced it}): a config or override that still sets one
    stops with one line naming the key and its replacement (a ConfigError), before anything runs.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    deprecated_keys: ClassVar[dict[str, str]] = {}
    removed_keys: ClassVar[dict[str, str]] = {}


def check_weights(weights: dict[str, float], known, kind: str) -> dict[str, float]:
    """Sampling weights over named kinds: every name known, every weight >= 0, a positive sum. Returns
    `weights`; raises ValueError naming the unknown `kind`(s) or the bad weights (for a field validator)."""
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; known: {list(known)}")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return weights


_ENV_VAR = re.compile(r"\$(\w+|\{[^}]*\})")


def expand_path(value: str | None) -> str | None:
    """`~` and `$VAR` / `${VAR}` expanded in a local path or URI; an unset variable is an error (ValueError,
    which pydantic reports under the field's key). `builtin:` names and None pass through."""
    if value is None or value.startswith("builtin:"):
        return value
    missing = [m.strip("{}") for m in _ENV_VAR.findall(value) if m.strip("{}") not in os.environ]
    if missing:
        raise ValueError(f"{value!r} uses the environment variable ${missing[0]}, which is not set")
    value = os.path.expandvars(value)
    return os.path.expanduser(value) if value.startswith("~") else value


# A path-or-URI field: `input.path=~/books` and `output.dir=$SCRATCH/run` mean what a shell would make of them.
PathStr = Annotated[str, AfterValidator(expand_path)]


# The stages' top-level config models, by subcommand; imported lazily (only to name the stage a config fits).
STAGE_MODELS = {
    "synth": "ctxforge.pipeline.config:SynthConfig",
    "train": "ctxforge.train.config:TrainConfig",
    "serve": "ctxforge.serve.config:ServeConfig",
    "eval": "ctxforge.serve.eval_config:EvalConfig",
    "lengthen": "ctxforge.lengthen.config:LengthenConfig",
}


def packaged_config_names() -> list[str]:
    """Names of the configs shipped with ctxforge (usable as `--config NAME`)."""
    folder = resources.files("ctxforge.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _shown_path(packaged) -> str:
    """Where a packaged config really lies (relative to the working directory when under it, as in a
    checkout: configs/tiny.yaml), so an error names a file the user can open; the package name
    `ctxforge.configs` is not a folder in a checkout."""
    path = Path(str(packaged))
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_config_path(spec: str) -> tuple[str, str]:
    """Return (label, yaml_text) for a path or a packaged config name such as `tiny`.

    Raises ConfigError listing the packaged names when `spec` is neither a file nor one of them.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    name = spec[: -len(".yaml")] if spec.endswith(".yaml") else spec
    packaged = resources.files("ctxforge.configs").joinpath(f"{name}.yaml")
    if "/" not in name and packaged.is_file():
        return _shown_path(packaged), packaged.read_text(encoding="utf-8")
    raise ConfigError(
        f"config {spec!r}: no such file, and not a packaged config "
        f"(packaged: {', '.join(packaged_config_names())})"
    )


def _parse_override_value(raw: str) -> Any:
    """`key=value` values are YAML scalars/lists (`4096`, `true`, `[1, 2]`, `null`); else strings."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str], label: str = "command line") -> dict[str, Any]:
    """Apply `a.b.c=value` overrides in place. List items are addressed by index (`stages.0.samples=3`).

    Raises ConfigError naming the override when it is not key=value, has an empty key, or descends into a value.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{label}: override {item!r} is not of the form key=value")
        dotted, raw = item.split("=", 1)
        keys = dotted.strip().split(".")
        if not all(keys):
            raise ConfigError(f"{label}: override {item!r} has an empty key")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, key, dotted, label)]
                continue
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{label}: override {dotted!r}: {'.'.join(keys[: depth + 1])} is a value, not a section")
        last = keys[-1]
        if isinstance(node, list):
            node[_list_index(node, last, dotted, label)] = _parse_override_value(raw)
        else:
            node[last] = _parse_override_value(raw)
    return data


def _list_index(node: list, key: str, dotted: str, label: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{label}: override {dotted!r}: {key!r} is not an index of a list of {len(node)} items")
    return int(key)


def format_validation_error(err: ValidationError, label: str, model: type[BaseModel] | None = None,
                            data: dict | None = None) -> str:
    """One line per error naming the file and the dotted key; unknown keys get their close matches, and a
    config written for another stage says which stage it is for."""
    lines = []
    errors = err.errors()
    unknown_top = [e["loc"][0] for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    if model is not None and data is not None and unknown_top:
        other = _stage_fitting(data, model)
        if other:
            return (f"{label}: this is a `ctxforge {other}` config (its top-level keys "
                    f"{', '.join(sorted(map(str, data)))} are {other}'s), not a {_stage_of(model) or model.__name__} "
                    f"one: run `ctxforge {other} --config ...`")
    for e in errors:
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = _close_matches(model, e["loc"]) if model is not None else ""
            lines.append(f"{label}: unknown key '{key}'{hint}")
        else:
            # a validator's ValueError reaches us as "Value error, <message>": the user needs only the message
            msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
            lines.append(f"{label}: {key}: {msg}")
    return "\n".join(lines)


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The config section model that holds the key at `loc` (list indices skipped)."""
    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = node.model_fields.get(part) if node is not None else None
        if field is None:
            return None
        node = _submodel(field.annotation) or _item_model(field.annotation)
    return node


def _close_matches(model: type[BaseModel], loc: tuple) -> str:
    section = _model_at(model, loc)
    if section is None:
        return ""
    names = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _stage_of(model: type[BaseModel]) -> str | None:
    for stage, ref in STAGE_MODELS.items():
        if ref.endswith(":" + model.__name__):
            return stage
    return None


def _stage_fitting(data: dict, model: type[BaseModel]) -> str | None:
    """The subcommand whose config model knows every top-level key of `data`, when `model` does not."""
    keys = set(map(str, data))
    for stage, ref in STAGE_MODELS.items():
        module, name = ref.split(":")
        try:
            other = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if other is model:
            continue
        known = set(other.model_fields) | {k.split(".")[0] for k in other.deprecated_keys}
        if keys <= known:
            return stage
    return None


def _rename_deprecated(data: dict, overrides: list[str], aliases: dict[str, str], label: str) -> list[str]:
    """Move values given under deprecated dotted keys to their new keys (in the YAML data in place, and in the
    overrides); print one notice per old key on stderr."""
    for old, new in aliases.items():
        parts = old.split(".")
        node: Any = data
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and parts[-1] in node:
            value, present = node.pop(parts[-1]), _get_dotted(data, new)
            if isinstance(value, dict) and isinstance(present, dict):  # a renamed section beside the new one
                clash = sorted(set(value) & set(present))
                if clash:
                    raise ConfigError(f"{label}: both '{old}.{clash[0]}' (deprecated) and '{new}.{clash[0]}' are "
                                      f"set; keep only '{new}.{clash[0]}'")
                value = {**present, **value}
            elif present is not None:
                raise ConfigError(f"{label}: both '{old}' (deprecated) and '{new}' are set; keep only '{new}'")
            _set_dotted(data, new, value)
            print(f"{label}: '{old}' is deprecated, use '{new}'", file=sys.stderr)
    renamed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        for old, new in aliases.items():
            if key == old or key.startswith(old + "."):
                renamed_key = new + key[len(old):]
                print(f"command line: '{key}' is deprecated, use '{renamed_key}'", file=sys.stderr)
                key = renamed_key
                break
        renamed.append(f"{key}{sep}{raw}")
    return renamed


def _refuse_removed(data: dict, overrides: list[str], removed: dict[str, str], label: str) -> None:
    """Raises ConfigError naming the first removed key that the YAML data or an override still sets."""
    for key, replacement in removed.items():
        parent, _, leaf = key.rpartition(".")
        node = _get_dotted(data, parent) if parent else data
        if isinstance(node, dict) and leaf in node:
            raise ConfigError(f"{label}: '{key}' was removed: {replacement}; delete it from the config")
        for item in overrides:
            given = item.partition("=")[0]
            if given == key or given.startswith(key + "."):
                raise ConfigError(f"command line: '{given}' was removed: {replacement}; drop the override")


def _get_dotted(data: dict, dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_config(model: type[ConfigT], spec: str | None, overrides: list[str] | None = None,
                default: str | None = None) -> ConfigT:
    """Load `spec` (path or packaged name; `default` when None), apply overrides, validate.

    Raises ConfigError, one line naming the file and key: no config given, not YAML, not a mapping, an unknown key
    or an invalid value.
    """
    spec = spec or default
    if spec is None:
        raise ConfigError("no --config given")
    label, text = resolve_config_path(spec)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of sections")
    overrides = list(overrides or [])
    aliases = getattr(model, "deprecated_keys", {}) or {}
    if aliases:
        overrides = _rename_deprecated(data, overrides, aliases, label)
    _refuse_removed(data, overrides, getattr(model, "removed_keys", {}) or {}, label)
    if overrides:
        label = f"{label} (+ {len(overrides)} override{'s' if len(overrides) > 1 else ''})"
        apply_overrides(data, overrides, label)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, label, model, data)) from None


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field: the text of `--help`.

    Sections nest as `a.b`; the items of a list of sections as `a.N.b` (N = the item's index), after a row
    for the list itself."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        sub = _submodel(annotation)
        if sub is not None:
            rows.extend(describe_fields(sub, key + "."))
            continue
        if field.is_required():
            rows.append((key, _type_name(annotation), "required", field.description or ""))
        else:
            default = field.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(mode="json") for d in default]
            rows.append((key, _type_name(annotation), json.dumps(default, default=str), field.description or ""))
        item = _item_model(annotation)
        if item is not None:
            rows.extend(describe_fields(item, key + ".N."))
    return rows


def options_help(model: type[BaseModel], header: str, extra: tuple[str, ...] = (),
                 config: BaseModel | None = None, config_label: str = "") -> str:
    """The `--help` epilog of a stage: every dotted key with its type, default and description.

    With `config` (the config named by --config, loaded), each key shows that config's value instead of the
    built-in default, and list items are listed per index (`stages.0.name`, `stages.1.name`)."""
    lines = [header, ""]
    values = _flatten(config.model_dump(mode="json")) if config is not None else None
    if config is not None:
        lines.insert(1, f"values shown are those of {config_label or 'the chosen config'}")
    for key, typ, default, desc in describe_fields(model):
        if values is not None:
            shown = _values_for(key, values)
            if shown:
                for concrete, value in shown:
                    lines.append(f"  {concrete}  ({typ}, value {json.dumps(value, default=str)})")
                lines.extend(f"      {part}" for part in textwrap.wrap(desc, 92))
                continue
        # defaults are JSON text, so a string default prints quoted and never reads as the bare word
        lines.append(f"  {key}  ({typ}, {'required' if default == 'required' else 'default ' + default})")
        lines.extend(f"      {part}" for part in textwrap.wrap(desc, 92))
    lines.extend(extra)
    renamed = getattr(model, "deprecated_keys", {}) or {}
    if renamed:
        lines.append("")
        lines.append("deprecated spellings (still accepted, with a notice): "
                     + ", ".join(f"{old} -> {new}" for old, new in renamed.items()))
    return "\n".join(lines)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a dumped config; list items addressed by index, every level kept."""
    out: dict[str, Any] = {}
    if prefix:
        out[prefix[:-1]] = data
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}{i}."))
    return out


def _values_for(key: str, values: dict[str, Any]) -> list[tuple[str, Any]]:
    """The concrete keys (N replaced by indices) of a described key, with their values; [] if absent."""
    if ".N." not in key:
        return [(key, values[key])] if key in values else []
    pattern = re.compile("^" + re.escape(key).replace(r"\.N\.", r"\.\d+\.") + "$")
    return [(k, v) for k, v in values.items() if pattern.match(k)]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a `list[Section]` (or Optional of it) field, else None."""
    origin = get_origin(annotation)
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin in (list, tuple) and args:
        return _submodel(args[0])
    if args and origin is not None and len(args) == 1:  # Optional[list[Section]]
        return _item_model(args[0])
    return None


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = ", ".join(_type_name(a) for a in get_args(annotation))
    name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
    return f"{name}[{args}]"
