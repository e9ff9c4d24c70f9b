"""`ctxforge serve` and `ctxforge eval`: argument parsing and the only place these stages read the
environment (API keys). Each subcommand is a pair: `add_*_arguments(parser)` fills a subparser,
`run_*(args) -> int` runs it (ConfigError / PreflightError propagate to the CLI, which prints them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

from ctxforge.config import apply_overrides, load_config, options_help, packaged_config_names

log = logging.getLogger(__name__)
DEFAULT_EVAL_CONFIG = "eval-tiny"


def _epilog(model, help_config: tuple = (None, "")) -> str:
    """Every key with its type, default and meaning; with `help_config` = (config, label) from `--config X
    --help`, that config's values instead of the defaults."""
    config, label = help_config
    return options_help(model, "options (override any as key=value after the flags; lists as YAML, e.g. "
                               "ruler.lengths=[1024,2048]):", config=config, config_label=label)


def add_serve_arguments(parser: argparse.ArgumentParser, help_config: tuple = (None, "")) -> None:
    from ctxforge.serve.config import ServeConfig

    parser.description = ("Serve a checkpoint behind an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, "
                          "/v1/completions; /health on hf) with Ray Serve: backend=vllm via ray.serve.llm on a GPU or "
                          "the CPU (device), backend=hf a transformers deployment. Set $CTXFORGE_API_KEY (see "
                          "api_key_env) to require a bearer key.")
    parser.epilog = _epilog(ServeConfig, help_config)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--model", default=None, help="model directory, hub name (vllm) or ctxforge:tiny (default: ctxforge:tiny)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--config", default=None, metavar="FILE.yaml|NAME", help="optional ServeConfig YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. max_model_len=4096")


def serve_config_from_args(args):
    """The ServeConfig of `ctxforge serve`'s flags and key=value overrides (or of --config with them). Raises
    ConfigError naming the key when a value or key is invalid."""
    from ctxforge.serve.config import ServeConfig

    flags = [f"{k}={v}" for k, v in (("model", args.model), ("port", args.port), ("host", args.host)) if v is not None]
    overrides = list(args.overrides or []) + flags
    if args.config:
        return load_config(ServeConfig, args.config, overrides)
    from ctxforge.config import ConfigError, format_validation_error
    from pydantic import ValidationError
    try:
        return ServeConfig.model_validate(apply_overrides({}, overrides))
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, "command line")) from None


def run_serve(args) -> int:
    from ray import serve

    from ctxforge.raycluster import init_ray
    from ctxforge.serve.app import run_app
    from ctxforge.serve.preflight import preflight_serve

    cfg = serve_config_from_args(args)
    preflight_serve(cfg)  # a missing model or an unreachable hub: one line, before Ray starts
    api_key = os.environ.get(cfg.api_key_env) or None
    init_ray(progress=False)
    url = run_app(cfg, api_key)
    print(f"serving {cfg.model} as {cfg.model_id()!r} at {url}  (auth: {'bearer key from $' + cfg.api_key_env if api_key else 'none'})")
    print("Ctrl-C (or SIGTERM) to stop.", flush=True)

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill PID`, container stop: shut Serve down cleanly too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def add_eval_arguments(parser: argparse.ArgumentParser, help_config: tuple = (None, "")) -> None:
    from ctxforge.serve.eval_config import EvalConfig

    parser.description = ("Evaluate one or more models on RULER (generated here, any lengths), InfiniteBench (your JSONL "
                          "files), lm-evaluation-harness tasks (your task YAMLs and data) and LongBench-Chat (LongAlign's "
                          "files, an LLM judge) through their OpenAI-compatible endpoints (served here when base_url is "
                          "null, at route /eval-<name>). Every data path and endpoint is checked first. Writes "
                          "results.json, report.md and plots/ to output.dir; reruns resume from its cache.")
    parser.epilog = _epilog(EvalConfig, help_config)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default=None, metavar="FILE.yaml|NAME",
                        help=f"YAML config or packaged name ({', '.join(n for n in packaged_config_names() if n.startswith('eval-'))}); "
                             f"default: {DEFAULT_EVAL_CONFIG}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. ruler.num_samples=5 models.1.model=/ckpt/1M models.0.base_url=null")


def eval_api_keys(cfg) -> dict[str, str | None]:
    """The keys the evaluation needs, read from the environment variables the config names."""
    keys = {m.name: os.environ.get(m.api_key_env) or None for m in cfg.models if m.base_url and m.api_key_env}
    judge = cfg.longbench_chat.judge
    keys["judge"] = (os.environ.get(judge.api_key_env) or None) if judge.api_key_env else None
    judge = cfg.longgen.judge  # the long-output quality judge (serve/eval_longgen.py)
    keys["longgen_judge"] = (os.environ.get(judge.api_key_env) or None) if judge.base_url and judge.api_key_env else None
    return keys


def run_eval(args) -> int:
    """`ctxforge eval`: load the config, preflight, evaluate, print one line per model; returns the exit code.
    Raises ConfigError for a bad config, PreflightError when preflight fails or an endpoint goes away after it
    (the CLI prints either as one line and exits 2)."""
    from ctxforge.config import PreflightError
    from ctxforge.serve.benchmarks import benchmarks
    from ctxforge.serve.client import EndpointError
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import evaluate
    from ctxforge.serve.preflight import preflight_eval

    cfg = load_config(EvalConfig, args.config, args.overrides, default=DEFAULT_EVAL_CONFIG)
    api_keys = eval_api_keys(cfg)
    preflight_eval(cfg, api_keys)
    try:
        results = evaluate(cfg, api_keys, config_label=args.config or DEFAULT_EVAL_CONFIG)
    except EndpointError as exc:  # an endpoint that went away after preflight
        raise PreflightError(str(exc)) from None
    for name, m in results["models"].items():
        parts = [b.summary(m[b.key]) for b in benchmarks() if m.get(b.key) is not None]
        label = f" [{m['label']}]" if m.get("label") else ""
        print(f"{name}{label}: {'; '.join(p for p in parts if p)}  ({m['requests']['total']} requests, "
              f"{m['requests']['errors']} failed)")
    print(f"\nreport:  {cfg.output.dir}/report.md\nresults: {cfg.output.dir}/results.json\nplots:   {cfg.output.dir}/plots/")
    return 0 if all(m["requests"]["errors"] == 0 for m in results["models"].values()) else 1
