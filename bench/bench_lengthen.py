"""Self-Lengthen with SmolLM2-135M-Instruct on CPU: does one iteration run, and do output lengths move?

Runs `ctxforge lengthen --config lengthen-smollm2` (one iteration: self-instruct, initial responses,
extension rounds, training both roles), then asks the trained generator the same instructions with the
same checks and budget. Prints, side by side from this one run: response length in words (median, p90)
before (the base model's initial responses), of the accepted extensions, and after (the trained
generator); the acceptance rates of the extension rounds, tries and attempts; wall time per step.
A 135M model does not write 8,000 good words: the figures show that the loop runs and lengths move.

    python bench/bench_lengthen.py [OUT_DIR] [key=value ...]     # default OUT_DIR runs/bench-lengthen
    python bench/bench_lengthen.py --smoke [OUT_DIR]               # CI: lengthen-tiny, one instruction

Sized for a shared 2-core CPU (about an hour): 6 self-instructed instructions and one extension try per
response (BENCH_OVERRIDES); later key=value arguments override these.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ctxforge.config import load_config
from ctxforge.lengthen.checks import count_words, length_stats
from ctxforge.lengthen.config import LengthenConfig
from ctxforge.lengthen.loop import run_lengthen
from ctxforge.lengthen.tasks import ResponseTask, Role, drive

BENCH_OVERRIDES = ["iterations=1", "self_instruct.count=6", "extend.max_tries=1", "runtime.progress=false"]
# --smoke: the same loop and table on the random-weight tiny model (configs/lengthen-tiny.yaml), one instruction
SMOKE_OVERRIDES = ["self_instruct.count=1", "extend.rounds=1"]


def after_responses(cfg: LengthenConfig, model: str, instructions: list[dict], out: Path) -> tuple[list[int], dict]:
    """Word counts of the trained generator's responses to `instructions` (same checks, tries and budget)."""
    from ctxforge.generation.backends import make_backend
    from ctxforge.generation.session import Generation

    # the loop's cache: a rerun of the bench is free
    with Generation.open(make_backend(cfg.generator, model), cfg.generator, out / "work" / "requests.sqlite") as generation:
        role = Role("generator", generation, generation.backend.model_path)
        tasks = [ResponseTask(cfg, r["instruction_id"], r["instruction"], s) for r in instructions
                 for s in range(cfg.responses.per_instruction)]
        stats = drive(tasks, role, cfg, "after: trained generator")
    return [count_words(t.text) for t in tasks if t.text], stats.to_dict()


def main(argv: list[str]) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    config, model_name = ("lengthen-tiny", "the random-weight tiny model") if smoke else \
        ("lengthen-smollm2", "SmolLM2-135M-Instruct")
    out = Path(argv[0] if argv and "=" not in argv[0] else "runs/bench-lengthen" + ("-tiny" if smoke else "")).resolve()
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(LengthenConfig, config, [f"output.dir={out}", *BENCH_OVERRIDES,
                                               *(SMOKE_OVERRIDES if smoke else []), *overrides])
    t0 = time.time()
    manifest = run_lengthen(cfg, f"{config} (bench)")
    loop_s = time.time() - t0
    steps = manifest["iterations"][0]["steps"]
    instructions = [json.loads(line) for line in (out / "iter_001" / "instructions.jsonl").read_text().splitlines()]
    t1 = time.time()
    after, after_requests = after_responses(cfg, manifest["final_models"]["generator"], instructions, out)
    after_s = time.time() - t1
    before = steps["initial"]["words_all"]
    ext = steps["extend"]
    rows = [("before: base generator, initial responses", before),
            ("accepted extensions (extender)", ext["words_extended"]),
            ("after: trained generator, same instructions", length_stats(after))]
    print(f"\nSelf-Lengthen bench, {model_name} on CPU, 1 iteration, {len(instructions)} instructions "
          f"(output: {out})\n")
    print(f"{'response length (words)':<46} {'n':>4} {'median':>8} {'p90':>6} {'mean':>8}")
    for label, s in rows:
        print(f"{label:<46} {s.get('n', 0):>4} {s.get('median', '-')!s:>8} {s.get('p90', '-')!s:>6} "
              f"{s.get('mean', '-')!s:>8}")
    if before.get("median") and rows[2][1].get("median"):
        print(f"\nafter / before: median x{rows[2][1]['median'] / before['median']:.2f}, "
              f"p90 x{rows[2][1]['p90'] / before['p90']:.2f}")

    def rate(x):
        return "-" if x is None else f"{x:.0%}"

    print(f"\nextension: rounds accepted {ext['rounds_accepted']}/{ext['rounds']} ({rate(ext['round_acceptance_rate'])}), "
          f"tries kept {ext['accepted']}/{ext['tries']} ({rate(ext['try_acceptance_rate'])}), attempts kept "
          f"{ext['accepted']}/{ext['attempts']} ({rate(ext['attempt_acceptance_rate'])}); rejected rounds "
          f"{ext['rejected_rounds']}, rejected tries {ext['rejected_tries']}")
    print("\nwall time (s): " + ", ".join(f"{name} {st.get('wall_s', '-')}" for name, st in steps.items())
          + f", after-responses {after_s:.0f}; loop total {loop_s:.0f} (this run; cached requests cost nothing)")
    print(f"generation requests sent by the loop in this run: {manifest['requests_sent']}; "
          f"after-responses: {after_requests['sent']}")
    (out / "bench.json").write_text(json.dumps({"before": before, "extended": ext["words_extended"],
                                                "after": length_stats(after), "extension": ext,
                                                "loop_wall_s": loop_s, "after_wall_s": after_s,
                                                "steps": {k: v.get("wall_s") for k, v in steps.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
