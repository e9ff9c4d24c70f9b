"""Generator backends: one file per backend, each registering itself here by name.

A backend module defines a `GeneratorBackend` subclass decorated with `@register("name")`. Every module
of this package is imported on first use of the registry, so adding a backend is one new file (plus its
fields in `GeneratorConfig` when it needs settings of its own): `generator.backend` accepts every
registered name, and `make_backend` builds it for synthesis, Self-Lengthen and the judge alike.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from ctxforge.generation.backends.base import GeneratorBackend

_REGISTRY: dict[str, type[GeneratorBackend]] = {}
_LOADED = False


def register(name: str) -> Callable[[type[GeneratorBackend]], type[GeneratorBackend]]:
    """Class decorator: make a GeneratorBackend subclass available as `generator.backend = name`.

    Raises ValueError when another class already registered `name`."""
    def add(cls: type[GeneratorBackend]) -> type[GeneratorBackend]:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"generator backend {name!r} is registered twice ({_REGISTRY[name].__module__}, "
                             f"{cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def _load_all() -> None:
    """Import every backend module of this package (each registers itself on import)."""
    global _LOADED
    if _LOADED:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _LOADED = True


def backend_names() -> tuple[str, ...]:
    """Every registered backend name, sorted."""
    _load_all()
    return tuple(sorted(_REGISTRY))


def backend_class(name: str) -> type[GeneratorBackend]:
    """The class registered as `name`; raises ValueError listing the known names when there is none."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"generator.backend {name!r} is not a known backend; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_backend(gen: Any, model_path: str) -> GeneratorBackend:
    """The backend `gen.backend` (a GeneratorConfig) loading `model_path`, the resolved model directory or hub
    name; backends that reach a served model or none (`uses_model_path = False`) get `gen.model` instead."""
    cls = backend_class(gen.backend)
    return cls(gen, model_path if cls.uses_model_path else gen.model)
