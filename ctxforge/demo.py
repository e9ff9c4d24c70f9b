"""`ctxforge demo`: every stage on the embedded default, chained through their files.

synthesize (tiny config, KJV corpus) -> train (2-stage tiny curriculum) -> serve + evaluate the base
and the trained tiny model side by side. Each stage keeps its own resume state under runs/tiny/, so
re-running the demo reuses what is finished (the request cache, finished training stages, scored
evaluation samples). The stages meet only through their outputs: samples Parquet + manifest,
Hugging Face checkpoints, and the HTTP API.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctxforge.config import load_config

SYNTH_CONFIG, TRAIN_CONFIG, EVAL_CONFIG = "tiny", "train-tiny", "eval-tiny"
ROOT = Path("runs/tiny")

REAL_SCALE = """\
The demo used the random-weight tiny model: its data is noise and its scores mean nothing. It proves
that every stage runs end to end. For a real model (cluster commands: cluster/README.md):
  ctxforge synth --config qwen72b-vllm input.path=s3://bucket/books/
  ctxforge plan  --config train-llama8b-1m --gpus 8
  ctxforge train --config train-llama8b-1m
  ctxforge serve --config serve-llama8b-1m
  ctxforge eval  --config eval-llama8b-1m
Their paths share one root, /mnt/shared/ctxforge: each stage reads the previous stage's output."""


def run_demo(synth_config: str | None, synth_overrides: list[str], root: Path = ROOT) -> int:
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize
    from ctxforge.pipeline.write import print_summary
    from ctxforge.serve.config import EvalConfig
    from ctxforge.serve.evaluate import evaluate
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.curriculum import run_curriculum

    synth_dir, train_dir, eval_dir = root / "synth", root / "train", root / "eval"
    print(f"== 1/3 synthesize -> {synth_dir}", flush=True)
    synth_cfg = load_config(SynthConfig, synth_config, [f"output.dir={synth_dir}", *synth_overrides],
                            default=SYNTH_CONFIG)
    print_summary(synthesize(synth_cfg, config_label=synth_config or SYNTH_CONFIG))

    print(f"\n== 2/3 train (2-stage curriculum) -> {train_dir}", flush=True)
    train_cfg = load_config(TrainConfig, TRAIN_CONFIG, [f"input.path={synth_dir}", f"output.dir={train_dir}"])
    train_report = run_curriculum(train_cfg, label=TRAIN_CONFIG)
    final_checkpoint = list(train_report.stages.values())[-1]["checkpoint"]
    for name, st in train_report.stages.items():
        loss = f", final loss {st['loss']:.4f}" if "loss" in st else ""
        print(f"   stage {name}: {st['status']}{loss} -> {st['checkpoint']}")

    print(f"\n== 3/3 serve + evaluate base vs trained -> {eval_dir}", flush=True)
    models = json.dumps([{"name": "base", "model": synth_cfg.target.tokenizer},
                         {"name": "trained", "model": final_checkpoint}])
    eval_cfg = load_config(EvalConfig, EVAL_CONFIG, [f"output.dir={eval_dir}", f"models={models}"])
    results = evaluate(eval_cfg, config_label=EVAL_CONFIG)
    for name, m in results["models"].items():
        ruler = m.get("ruler") or {}
        avg = ruler.get("average")
        print(f"   {name}: {ruler.get('label', 'RULER')} average {avg:.1f}" if avg is not None else f"   {name}: no scores")

    print(f"\ndata:        {synth_dir}/samples/<stage>/*.parquet  (manifest: {synth_dir}/manifest.json)\n"
          f"checkpoints: {train_dir}  (final: {final_checkpoint})\n"
          f"report:      {eval_dir}/report.md  (plots: {eval_dir}/plots/, results: {eval_dir}/results.json)\n")
    print(REAL_SCALE)
    return 0 if all(m["requests"]["errors"] == 0 for m in results["models"].values()) else 1
