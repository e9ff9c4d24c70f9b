"""Checks before any work, each failing with one line that names the config key or URL to fix:
the device (cuda where no GPU can appear), models (a local directory, a packaged model, or a hub id that can be loaded), every endpoint
reachable (`models.N` and its URL), and every enabled benchmark's data (its own `preflight`).
"""

from __future__ import annotations

import asyncio

from ctxforge.config import PreflightError


def check_model(spec: str, key: str, rope=None, window: int | None = None) -> str:
    """Resolve a model spec and read its config (window after a RoPE override); returns the path. A RoPE
    override goes through transformers' own validation on the checkpoint's config at the served window
    (`window`, else the window the override implies), so a setting a replica would crash on is one line
    naming `rope.<key>` (`models.N.rope.<key>` in eval) here.

    Raises PreflightError naming `key` when the model cannot be resolved or its config read.
    """
    from ctxforge.models import resolve_model_path
    from ctxforge.serve.config import checkpoint_context_length

    try:
        path = resolve_model_path(spec)
        served = checkpoint_context_length(path, rope)
    except (OSError, ValueError) as exc:  # FileNotFoundError, ModelUnavailableError, no window in config.json
        raise PreflightError(f"{key}: {' '.join(str(exc).split())}") from None
    if rope is not None:
        from ctxforge.train.rope import serving_config

        rope_key = f"{key.rsplit('.', 1)[0]}.rope" if "." in key else "rope"
        try:
            serving_config(path, rope, window or served, where=rope_key)
        except ValueError as exc:
            raise PreflightError(str(exc)) from None
    return path


def check_endpoint(base_url: str, api_key: str | None, key: str, timeout: float = 20.0) -> list[dict]:
    """The models an endpoint lists at /v1/models. Raises PreflightError naming `key` when it cannot be reached or
    answers with an error."""
    from ctxforge.serve.client import EndpointError, list_models

    try:
        return asyncio.run(list_models(base_url, api_key, timeout=timeout))
    except EndpointError as exc:
        raise PreflightError(f"{key}: {exc}") from None


def preflight_eval(cfg, api_keys: dict) -> None:
    """Every check before an eval does any work: models resolvable, endpoints reachable and serving the named
    model, tokenizers loadable, each enabled benchmark's data read. Raises PreflightError naming the first key
    that fails."""
    from ctxforge.models import load_tokenizer
    from ctxforge.serve.benchmarks import benchmarks

    for i, entry in enumerate(cfg.models):
        name = f"models.{i} ({entry.name})"
        if entry.base_url:
            cards = check_endpoint(entry.base_url, api_keys.get(entry.name), name)
            ids = [c.get("id") for c in cards]
            if entry.served_model_name and entry.served_model_name not in ids:
                raise PreflightError(f"models.{i}.served_model_name {entry.served_model_name!r} is not served at "
                                     f"{entry.base_url} (it lists {', '.join(map(str, ids[:5]))})")
        else:
            from ctxforge.serve.evaluate import served_here_config

            check_serving_device(cfg.serve, "serve.")
            path = check_model(entry.model, f"models.{i}.model", entry.rope)
            check_vllm_serving(served_here_config(cfg, entry), path, "serve.")
        tok_key = f"models.{i}.tokenizer" if entry.tokenizer else f"models.{i}.model"
        spec = entry.tokenizer or entry.model
        try:
            load_tokenizer(spec)
        except (OSError, ValueError) as exc:
            raise PreflightError(f"{tok_key} {spec!r}: cannot load its tokenizer ({' '.join(str(exc).split())[:300]})") from None
    for bench in benchmarks():
        if bench.enabled(cfg):
            bench.preflight(cfg, api_keys)


def check_serving_device(cfg, key: str = "") -> None:
    """PreflightError naming `{key}device` (or, for vllm, `{key}accelerator_type`) when the replicas ask for a GPU
    no node can ever offer: the local Ray these commands start (no RAY_ADDRESS) on a machine without a GPU."""
    from ctxforge.devices import check_gpu_reachable
    from ctxforge.serve.app import resolve_backend

    accelerator = cfg.accelerator_type if resolve_backend(cfg) == "vllm" else None   # hf replicas take num_gpus
    check_gpu_reachable(key, cfg.device, accelerator, None, "RAY_ADDRESS")


def check_vllm_serving(cfg, path: str, key: str = "") -> None:
    """For backend vllm: the engine arguments (vllm_app.check_engine_kwargs), the device, the KV-cache size
    and the window, each failing with one line naming the key (prefixed with `key`, e.g. `serve.`)."""
    from ctxforge.config import ConfigError
    from ctxforge.serve.app import resolve_backend, served_window
    from ctxforge.serve.vllm_app import build_llm_config, check_engine_kwargs

    if resolve_backend(cfg) != "vllm":
        return
    try:
        window = served_window(cfg, path)
        check_engine_kwargs(cfg, window, f"{key}engine_kwargs")
        build_llm_config(cfg, path, window)  # the device, the KV-cache size, a window past the checkpoint's
    except ConfigError as exc:
        raise PreflightError(str(exc)) from None


def preflight_serve(cfg) -> str:
    """The resolved model path; PreflightError naming `device` when it asks for a GPU none can offer, `model`
    when it is neither local, packaged, nor loadable from a model hub (a hub id with no hub reachable), or
    the engine argument vLLM cannot run with."""
    check_serving_device(cfg)
    path = check_model(cfg.model, "model", cfg.rope, cfg.max_model_len)
    check_vllm_serving(cfg, path)
    return path
