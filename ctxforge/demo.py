"""`ctxforge demo`: every stage on the embedded default, chained through their files.

synthesize (SmolLM2-135M-Instruct writes summaries and QA about two short books of the King James Bible)
-> train (SmolLM2 through a 2-stage curriculum: 2K data-parallel, then 4K with Ulysses SP 3 and a larger
rope_theta) -> serve + evaluate the base and the trained model side by side on RULER needle retrieval.
`--model tiny` runs the same chain on the random-weight tiny model (minutes, noise; for plumbing).

Each stage keeps its own resume state under runs/<model>/, so re-running the demo reuses what is finished
(the request cache, finished training stages, scored evaluation samples). The stages meet only through
their outputs: samples Parquet + manifest, Hugging Face checkpoints, and the HTTP API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ctxforge.config import load_config

REAL_SCALE = """\
For a real model (cluster commands: cluster/README.md):
  ctxforge synth --config qwen72b-vllm input.path=s3://bucket/books/
  ctxforge plan  --config train-llama8b-1m --gpus 8
  ctxforge train --config train-llama8b-1m
  ctxforge serve --config serve-llama8b-1m
  ctxforge eval  --config eval-llama8b-1m
Their paths share one root, /mnt/shared/ctxforge: each stage reads the previous stage's output."""


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    synth: str
    train: str
    eval: str
    real_model: bool

    @property
    def root(self) -> Path:
        return Path("runs") / self.name


PRESETS = {
    "smollm2": Preset("smollm2", "SmolLM2-135M-Instruct (real weights, Llama architecture)", "smollm2",
                      "train-smollm2", "eval-smollm2", real_model=True),
    "tiny": Preset("tiny", "the random-weight tiny model (plumbing only)", "tiny", "train-tiny", "eval-tiny",
                   real_model=False),
}
DEFAULT_PRESET = "smollm2"


def _console():
    import sys

    from rich.console import Console

    # a log file or a pipe gets 120 columns (rich's default there is 80, too narrow for the tables)
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)


def _qa_examples(synth_dir: Path, n: int = 2) -> list[dict]:
    """A few kept QA pairs to show what the generator wrote (grounded first, then the shortest)."""
    import pyarrow.parquet as pq

    path = synth_dir / "qa" / "qa.parquet"
    if not path.is_file():
        return []
    rows = pq.read_table(path, columns=["kind", "qtype", "question", "answer", "grounded"]).to_pylist()
    rows = [r for r in rows if r["kind"] != "summary"] or rows   # questions first: summary turns are in it too
    rows.sort(key=lambda r: (not r["grounded"], len(r["question"]) + len(r["answer"])))
    return rows[:n]


def _stage_losses(train_dir: Path, stage: str) -> tuple[float | None, float | None]:
    path = train_dir / "metrics" / f"{stage}.jsonl"
    if not path.is_file():
        return None, None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if not r.get("crashed")]
    return (rows[0]["loss"], rows[-1]["loss"]) if rows else (None, None)


def _train_table(train_cfg, report, train_dir: Path):
    from rich.table import Table

    table = Table(title=f"ctxforge train: {train_dir}")
    for col in ("stage", "layout", "max_seq_len", "rope", "status", "steps", "loss first -> last"):
        table.add_column(col, justify="right" if col in ("max_seq_len", "steps") else "left")
    for stage in train_cfg.stages:
        st = report.stages.get(stage.name, {})
        first, last = _stage_losses(train_dir, stage.name)
        loss = f"{first:.4f} -> {last:.4f}" if first is not None else "-"
        rope = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in stage.rope.model_dump(exclude_none=True).items()) or "model's"
        table.add_row(stage.name, f"{stage.workers} workers = dp {stage.dp_degree} x sp {stage.sp_degree}",
                      str(stage.max_seq_len), rope, st.get("status", "-"), str(st.get("steps", "-")), loss)
    return table


def _eval_table(results: dict, eval_dir: Path):
    from rich.table import Table

    lengths = sorted({int(n) for m in results["models"].values() for n in (m.get("ruler") or {}).get("per_length", {})})
    tasks = sorted({t for m in results["models"].values() for t in (m.get("ruler") or {}).get("tasks", {})})
    table = Table(title=f"ctxforge eval: RULER score (% of samples right) — {eval_dir}/report.md")
    table.add_column("model")
    table.add_column("task")
    for n in lengths:
        table.add_column(f"{n // 1024}K" if n % 1024 == 0 else str(n), justify="right")
    table.add_column("samples", justify="right")
    for name, m in results["models"].items():
        ruler = m.get("ruler") or {}
        for task in tasks:
            per = ruler.get("tasks", {}).get(task, {})
            cells = [f"{per[str(n)]['score']:.1f}" if per.get(str(n), {}).get("score") is not None else "-"
                     for n in lengths]
            table.add_row(name, task, *cells, str(max((per.get(str(n), {}).get("n", 0) for n in lengths), default=0)))
        cells = [f"{ruler['per_length'][str(n)]:.1f}" if str(n) in ruler.get("per_length", {}) else "-" for n in lengths]
        table.add_row(name, "[bold]mean[/]", *cells, "", end_section=True)
    return table


def _what_it_shows(preset: Preset, synth_cfg, synth_report, train_cfg, train_dir: Path, results: dict) -> str:
    if not preset.real_model:
        return ("The demo used the random-weight tiny model: its data is noise and its scores mean nothing. It proves\n"
                "that every stage runs end to end. `ctxforge demo` (SmolLM2) shows them on real language.")
    overall = synth_report.grounding.get("overall", {})
    generated = sum(synth_report.qa_generated.values())
    losses = []
    for stage in train_cfg.stages:
        first, last = _stage_losses(train_dir, stage.name)
        if first is not None:
            losses.append(f"{stage.name} {first:.3f} -> {last:.3f}")
    scores = []
    for name, m in results["models"].items():
        avg = (m.get("ruler") or {}).get("average")
        scores.append(f"{name} {avg:.1f}" if avg is not None else f"{name} -")
    lengths = ", ".join(f"{n // 1024}K" for n in results["config"]["ruler"]["lengths"])
    return (
        f"What this run shows ({preset.title}, CPU):\n"
        f"  data:     the model summarized {synth_report.chunks} passages of {synth_report.documents} books and wrote "
        f"{generated} QA pairs; {synth_report.qa_kept} kept (grounding rate {overall.get('rate', 0.0):.0%}: the "
        f"answer's verbatim quote was found in its evidence; the others were "
        f"{'dropped' if synth_cfg.grounding.on_ungrounded == 'drop' else 'kept, flagged'})\n"
        f"  training: the curriculum code a Llama-3.1 student runs (GQA 9/3 heads, Llama RoPE with theta raised per "
        f"stage, loss mask without template markers, Ulysses SP 3); loss per stage: {'; '.join(losses) or '-'}\n"
        f"  eval:     RULER needle retrieval at {lengths} (mean score): {', '.join(scores)}\n"
        "A 135M model writes weak QA, and a few training steps on a few thousand tokens barely move its scores: the\n"
        "demo shows every stage working on real language at laptop scale, not a better long-context model.\n"
        "bench/bench_context_extension.py takes SmolLM2 past its 8K window with the same curriculum.")


def vllm_import_error(module: str = "vllm", timeout_s: float = 300.0) -> str | None:
    """None when `import vllm` (`module`) works in a fresh interpreter, else the reason in one line. A child process,
    because a broken install (a torchvision built for another torch) fails at import, and the demo must not
    carry vLLM's import side effects into its driver. Raises nothing."""
    import subprocess
    import sys

    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit {proc.returncode}"


def production_engine_overrides(preset: Preset, synth_overrides: list[str]) -> tuple[list[str], list[str], str]:
    """(synthesis overrides, evaluation overrides, a line saying which engine runs and why). The real-model
    demo generates and serves with vLLM (the production engine) where it imports; otherwise, and for the
    tiny model, with the transformers backend. The user's own `generator.backend=` override wins."""
    if not preset.real_model:
        return [], [], "engine: transformers (hf), the tiny model's plumbing run"
    if any(o.split("=", 1)[0].strip() == "generator.backend" for o in synth_overrides):
        return [], [], "engine: generator.backend as given; serving with transformers (hf)"
    reason = vllm_import_error()
    if reason is None:
        # one engine: vLLM batches on its own, and two engines would split 2 cores; a 1 GiB KV cache holds the
        # demo's 2K-token requests many times over
        return (["generator.backend=vllm", "generator.concurrency=1", "generator.kv_cache_gib=1"], ["serve.backend=vllm"],
                "engine: vLLM on this machine for synthesis and serving (generator.backend=hf for transformers)")
    return [], [], f"engine: transformers (hf); vllm does not import here ({reason})"


def run_demo(synth_config: str | None, synth_overrides: list[str], preset_name: str = DEFAULT_PRESET,
             root: Path | None = None) -> int:
    from ctxforge import console as ray_console
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize
    from ctxforge.pipeline.write import print_summary
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import evaluate
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.curriculum import run_curriculum, stage_checkpoint_dir

    preset = PRESETS[preset_name]
    root = root or preset.root
    con = _console()
    synth_dir, train_dir, eval_dir = root / "synth", root / "train", root / "eval"
    engine_synth, engine_eval, engine_line = production_engine_overrides(preset, synth_overrides)
    # every stage's config is loaded (and so checked) before any work: a typo fails at once, in one line
    synth_cfg = load_config(SynthConfig, synth_config, [f"output.dir={synth_dir}", *engine_synth, *synth_overrides],
                            default=preset.synth)
    train_cfg = load_config(TrainConfig, preset.train, [f"input.path={synth_dir}", f"output.dir={train_dir}"])
    models = json.dumps([{"name": "base", "model": train_cfg.model},
                         {"name": "trained", "model": str(stage_checkpoint_dir(train_dir, train_cfg.stages[-1].name))}])
    eval_cfg = load_config(EvalConfig, preset.eval, [f"output.dir={eval_dir}", f"models={models}", *engine_eval])
    con.print(f"[bold]ctxforge demo[/]: {preset.title}; local Ray on this machine; outputs in {root}/")
    con.print(engine_line, markup=False)

    con.print(f"\n[bold]== 1/3 synthesize[/] -> {synth_dir}")
    synth_report = synthesize(synth_cfg, config_label=synth_config or preset.synth)
    print_summary(synth_report, console=con)
    for qa in _qa_examples(synth_dir):
        con.print(f"   e.g. ({qa['kind']}/{qa['qtype']}{'' if qa['grounded'] else ', ungrounded'}) "
                  f"Q: {qa['question']}\n        A: {qa['answer']}", markup=False)

    layout = "; ".join(f"{s.name} dp {s.dp_degree} x sp {s.sp_degree}" for s in train_cfg.stages)
    con.print(f"\n[bold]== 2/3 train[/] ({len(train_cfg.stages)}-stage curriculum: {layout}) -> {train_dir}")
    plain = lambda line: con.print(line, markup=False)  # noqa: E731 - lines carry [stage] and dict reprs
    with ray_console.follow_training(train_dir / "metrics", emit=plain):
        train_report = run_curriculum(train_cfg, label=preset.train, log=plain)
    final_checkpoint = list(train_report.stages.values())[-1]["checkpoint"]
    con.print(_train_table(train_cfg, train_report, train_dir))

    con.print(f"\n[bold]== 3/3 serve + evaluate base vs trained[/] -> {eval_dir}")
    results = evaluate(eval_cfg, config_label=preset.eval)
    con.print(_eval_table(results, eval_dir))

    con.print("\n" + _what_it_shows(preset, synth_cfg, synth_report, train_cfg, train_dir, results))
    con.print(f"\ndata:        {synth_dir}/samples/<stage>/*.parquet  (QA: {synth_dir}/qa/qa.parquet, manifest: "
              f"{synth_dir}/manifest.json)\n"
              f"checkpoints: {train_dir}/checkpoints/<stage>/  (final: {final_checkpoint}; metrics: {train_dir}/metrics/)\n"
              f"report:      {eval_dir}/report.md  (plots: {eval_dir}/plots/, results: {eval_dir}/results.json)")
    note = ray_console.ray_logs_note()
    if note:
        con.print(note)
    con.print("\n" + REAL_SCALE)
    return 0 if all(m["requests"]["errors"] == 0 for m in results["models"].values()) else 1
