"""Config loading shared by every stage: YAML file + dotted `key=value` overrides -> a pydantic model.

A stage's config is one typed pydantic v2 model with `extra="forbid"`; this module only knows how
to find a YAML file (a path, or the name of a config shipped in `ctxforge/configs`), apply dotted
overrides, and turn validation errors into one message that names the file and the key.
It knows nothing about what any stage does with its config.
"""

from __future__ import annotations

import json
import textwrap
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(ValueError):
    """A config problem found before any work starts; the message names the file and the key."""


class PreflightError(ValueError):
    """Bad input found before any work starts (a missing model, an unreadable input path...)."""


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def packaged_config_names() -> list[str]:
    """Names of the configs shipped with ctxforge (usable as `--config NAME`)."""
    folder = resources.files("ctxforge.configs")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(spec: str) -> tuple[str, str]:
    """Return (label, yaml_text) for a path or a packaged config name such as `tiny`."""
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    name = spec[: -len(".yaml")] if spec.endswith(".yaml") else spec
    packaged = resources.files("ctxforge.configs").joinpath(f"{name}.yaml")
    if "/" not in name and packaged.is_file():
        return f"ctxforge/configs/{name}.yaml", packaged.read_text(encoding="utf-8")
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
    """Apply `a.b.c=value` overrides in place. List items are addressed by index (`stages.0.samples=3`)."""
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


def format_validation_error(err: ValidationError, label: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{label}: unknown key '{key}'")
        else:
            lines.append(f"{label}: {key}: {e['msg']}")
    return "\n".join(lines)


def load_config(model: type[ConfigT], spec: str | None, overrides: list[str] | None = None,
                default: str | None = None) -> ConfigT:
    """Load `spec` (path or packaged name; `default` when None), apply overrides, validate."""
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
    if overrides:
        label = f"{label} (+ {len(overrides)} override{'s' if len(overrides) > 1 else ''})"
        apply_overrides(data, overrides, label)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, label)) from None


def describe_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, description) for every leaf field: the text of `--help`."""
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
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        if isinstance(default, list) and default and isinstance(default[0], BaseModel):
            default = [d.model_dump(mode="json") for d in default]
        rows.append((key, _type_name(annotation), json.dumps(default, default=str), field.description or ""))
    return rows


def options_help(model: type[BaseModel], header: str, extra: tuple[str, ...] = ()) -> str:
    """The `--help` epilog of a stage: every dotted key with its type, default and description."""
    lines = [header, ""]
    for key, typ, default, desc in describe_fields(model):
        # defaults are JSON text, so a string default prints quoted and never reads as the bare word
        lines.append(f"  {key}  ({typ}, {'required' if default == 'required' else 'default ' + default})")
        lines.extend(f"      {part}" for part in textwrap.wrap(desc, 92))
    lines.extend(extra)
    return "\n".join(lines)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = ", ".join(_type_name(a) for a in get_args(annotation))
    name = getattr(origin, "__name__", str(origin)).replace("UnionType", "Union")
    return f"{name}[{args}]"
