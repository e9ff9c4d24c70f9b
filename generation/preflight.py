"""The generator's preflight: everything a run needs from its generator, checked before any work.

`generator_backend(gen)` refuses a GPU no node can offer (generator.device=cuda on a local Ray without
one), resolves the model (a `ctxforge:` name is materialized once, a directory is
checked to hold a model), runs the backend's own checks (hf: a local directory; http: the API key's
variable is set and the endpoint answers) and builds the engine's factory (vllm: the engine arguments),
so a typo costs one line at once, not a failed engine after minutes of loading.
"""

from __future__ import annotations

from ctxforge.config import PreflightError
from ctxforge.generation.backends import backend_class, make_backend
from ctxforge.generation.backends.base import GeneratorBackend


def generator_backend(gen, cache_dir: str | None = None, ray_address: str | None = None) -> GeneratorBackend:
    """The checked backend for `gen` (a GeneratorConfig); `cache_dir` holds materialized `ctxforge:` models;
    `ray_address` is the run's runtime.address (None: RAY_ADDRESS, else a local Ray this run starts).

    Raises PreflightError with one line naming the generator key at fault (device, model, backend settings,
    endpoint, engine arguments)."""
    from ctxforge.models import resolve_model_path

    cls = backend_class(gen.backend)
    cls.check_device(gen, ray_address)   # first: cheap, and a GPU no node can offer makes the rest moot
    model_path = gen.model
    if cls.uses_model_path:
        try:
            model_path = resolve_model_path(gen.model, cache_dir)
        except FileNotFoundError as exc:
            raise PreflightError(f"generator.model: {exc}") from None
    try:
        cls.check(gen, model_path)
        backend = make_backend(gen, model_path)
        backend.engine_factory()
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    return backend
