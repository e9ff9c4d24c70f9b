"""`ctxforge lengthen`: argument wiring and the console summary. No loop logic here.

Wired into ctxforge/cli.py as:
    add_lengthen_arguments(sub.add_parser("lengthen", help=...))   ...   run_lengthen_command(args)
"""

from __future__ import annotations

import argparse

from ctxforge.config import load_config, options_help, packaged_config_names

DEFAULT_LENGTHEN_CONFIG = "lengthen-tiny"


def add_lengthen_arguments(parser: argparse.ArgumentParser, help_config: tuple = (None, "")) -> None:
    from .config import LengthenConfig

    parser.description = (
        "Self-Lengthen: grow the longest answers a model writes with the model itself. Per iteration: self-instruct "
        "long-writing instructions from seed instructions, answer them with the generator, enrich the answers in "
        "extension rounds with the extender (kept when more than extend.min_ratio x longer and clean), write "
        "Generator SFT and Extender SFT sets in the sample contract, train both roles (ctxforge train, one stage) "
        "and continue from the new checkpoints. The final long-output set (OUTPUT/final, queries with word-count "
        "suffixes) can be mixed into a curriculum stage (train: input.long_output, stages.N.long_output_ratio). "
        "Reruns resume: finished requests come from OUTPUT/work/requests.sqlite, finished training is not re-run.")
    config, label = help_config  # from `--config X --help`: that config's values instead of the defaults
    parser.epilog = options_help(LengthenConfig, "options (override any as key=value after --config):",
                                 config=config, config_label=label)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", default=None, metavar="FILE.yaml|NAME",
                        help=f"YAML config or packaged name "
                             f"({', '.join(n for n in packaged_config_names() if n.startswith('lengthen-'))}); "
                             f"default: {DEFAULT_LENGTHEN_CONFIG}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. iterations=1")


def run_lengthen_command(args) -> int:
    from .config import LengthenConfig
    from .loop import run_lengthen

    cfg = load_config(LengthenConfig, args.config, args.overrides, default=DEFAULT_LENGTHEN_CONFIG)
    manifest = run_lengthen(cfg, label=args.config or DEFAULT_LENGTHEN_CONFIG)
    print("\niter  instructions  initial (median/p90 words)  extended (median/p90)  rounds ok  kept  trained")
    for i in manifest["iterations"]:
        st = i["steps"]
        ini, ext = st["initial"]["words"], st["extend"]["words_extended"]
        rate = st["extend"]["round_acceptance_rate"]
        trained = "yes" if "checkpoint" in st.get("train_generator", {}) else "no"
        print(f"{i['iteration']:>4}  {st['self_instruct']['instructions']:>12}  "
              f"{ini.get('median', '-')!s:>14}/{ini.get('p90', '-')!s:<11}  "
              f"{ext.get('median', '-')!s:>10}/{ext.get('p90', '-')!s:<10}  "
              f"{'-' if rate is None else f'{rate:.0%}':>9}  {st['extend']['kept']:>4}  {trained}")
    final = manifest["final"]
    print(f"\nlong-output set: {final['dir']}/samples/{final['stage']}/ ({final['samples']} samples)\n"
          f"models:          {manifest['final_models']}\n"
          f"manifest:        {cfg.output.dir}/manifest.json  ({manifest['requests_sent']} generation requests sent "
          f"this run)")
    for note in manifest["notes"]:
        print(f"note: {note}")
    return 0
