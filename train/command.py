"""`ctxforge train` and `ctxforge plan`: argument wiring and the console report. No training logic here.

Wired into ctxforge/cli.py as:
    train = sub.add_parser("train", help=...); add_train_arguments(train)   ... run_train(args)
    plan = sub.add_parser("plan", help=...);  add_plan_arguments(plan)     ... run_plan(args)
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from ctxforge.config import ConfigError, PreflightError, load_config, one_line, options_help, packaged_config_names

DEFAULT_TRAIN_CONFIG = "train-tiny"


def _epilog(model, help_config: tuple = (None, "")) -> str:
    """Every key with its type, default and meaning; with `help_config` = (config, label) from `--config X
    --help`, that config's values instead of the defaults."""
    config, label = help_config
    return options_help(
        model, "options (override any as key=value after --config; list items by index, e.g. stages.0.lr=1e-5):",
        config=config, config_label=label, extra=("  stages.N.*  see StageConfig: name, data_stage, max_seq_len, rope.{theta,type,factor,...}, lr, "
               "schedule, warmup_steps, min_lr_ratio, epochs, max_steps, workers, sp_degree, batching, batch_size, "
               "grad_accum, loss_weighting, short_ratio, long_output_ratio, checkpoint_every",))


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE.yaml|NAME",
                        help=f"train config (YAML path or packaged name: "
                             f"{', '.join(n for n in packaged_config_names() if n.startswith('train'))}); "
                             f"default: {DEFAULT_TRAIN_CONFIG}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. input.path=runs/x")


def add_train_arguments(parser: argparse.ArgumentParser, help_config: tuple = (None, "")) -> None:
    from .config import TrainConfig

    parser.description = ("Fine-tune the model through the staged context curriculum on Ray Train: per stage, RoPE "
                          "set for its length, Ulysses SP x DP, packing with LongAlign loss weighting, DeepSpeed ZeRO, "
                          "checkpoints in HF format. Rerunning the same command resumes from the last checkpoint; "
                          "finished stages are not re-run.")
    parser.epilog = _epilog(TrainConfig, help_config)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    _config_args(parser)


def run_train(args) -> int:
    from ray.exceptions import RayError
    from ray.train import TrainingFailedError

    from ctxforge.console import follow_training, is_quiet

    from .config import TrainConfig
    from .curriculum import run_curriculum
    from .data import DataError
    from .loop import ResumeError
    from .sequence_parallel import SequenceParallelError

    try:
        cfg = load_config(TrainConfig, args.config, args.overrides, default=DEFAULT_TRAIN_CONFIG)
        # `ray job submit` sets RAY_ADDRESS for the driver: join that cluster; else a local Ray.
        # A line per step from rank 0's metrics rows (workers' own output stays in Ray's logs unless -v).
        with follow_training(Path(cfg.output.dir).expanduser() / "metrics") if is_quiet() else nullcontext():
            report = run_curriculum(cfg, label=args.config or DEFAULT_TRAIN_CONFIG,
                                    ray_address=cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS"))
    except (ConfigError, PreflightError, DataError, ResumeError, SequenceParallelError, FileNotFoundError,
            ValueError) as exc:
        print(f"ctxforge train: {one_line(exc)}", file=sys.stderr)  # names the key or the file
        return 2
    except (TrainingFailedError, RayError) as exc:  # the worker's traceback is in the message
        print(f"ctxforge train: training failed: {exc}\nRun the same command again to resume from the last checkpoint.",
              file=sys.stderr)
        return 1
    print("\nstage      status    steps  final loss  checkpoint")
    for name, st in report.stages.items():
        loss = f"{st['loss']:.4f}" if "loss" in st else "-"
        print(f"{name:<10} {st['status']:<9} {st.get('steps', '-')!s:>5}  {loss:>10}  {st['checkpoint']}")
    print(f"\nmetrics: {report.output_dir}/metrics/<stage>.jsonl")
    return 0


def add_plan_arguments(parser: argparse.ArgumentParser, help_config: tuple = (None, "")) -> None:
    from .config import TrainConfig

    parser.epilog = _epilog(TrainConfig, help_config)  # plan reads a train config: the same keys
    parser.description = ("Estimate GPU memory per rank (and host memory per node) for each stage of a train config, "
                          "the smallest GPU count / SP degree that fits a GPU's memory, and with --gpus N the layout "
                          "each stage gets on N GPUs. The formula, term by term, is in the docstring of "
                          "ctxforge.train.memory_plan.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="say which stages fit on N GPUs and with which layout (dp x sp, total GPUs)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8); the largest SP "
                                                                     "degree considered unless --max-sp is given")
    parser.add_argument("--max-sp", type=int, default=None, help="largest SP degree considered (default: "
                                                                 "--gpus-per-node; Ulysses beyond one node's GPUs "
                                                                 "works but its all-to-all crosses the slower "
                                                                 "inter-node links)")
    _config_args(parser)


def run_plan(args) -> int:
    """`ctxforge plan`: print the memory plan; returns the exit code (2 with one line on stderr for a bad flag,
    config or model, which are raised inside as ValueError, ConfigError or FileNotFoundError)."""
    from .config import TrainConfig
    from .memory_plan import format_plan, plan_curriculum

    max_sp = args.max_sp or args.gpus_per_node
    try:
        for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node), ("--max-sp", max_sp)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} {value}: must be at least 1")
        cfg = load_config(TrainConfig, args.config, args.overrides, default=DEFAULT_TRAIN_CONFIG)
        rows = plan_curriculum(cfg, gpu_memory_gib=args.gpu_memory_gib, max_sp=max_sp, gpus=args.gpus,
                               gpus_per_node=args.gpus_per_node)
        text = format_plan(cfg, rows, args.gpu_memory_gib, gpus=args.gpus, gpus_per_node=args.gpus_per_node)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"ctxforge plan: {one_line(exc)}", file=sys.stderr)
        return 2
    print(text)
    return 0
