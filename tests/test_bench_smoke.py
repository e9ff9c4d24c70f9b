"""Every benchmark in bench/ runs to completion at its `--smoke` size, so that a bench cannot rot unseen.

Each case runs `python bench/<script> --smoke` as its own process (the benches start their own Ray, spawn
their own workers) and checks the exit status and the line that carries the bench's result (its table
header or ratio line). The sizes are the benches' own (bench/smoke_sizes.py); nothing here is timed.
A bench left out says why in SKIPPED.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# script -> (extra arguments, a regular expression the output must contain: the result line)
SMOKES = {
    "bench_chunking.py": ([], r"throughput ratio chunking/tokenizer: \d"),
    "bench_http_throughput.py": ([], r"ours/ray\.data\.llm(.|\n)*\n\s+5%\s+4\s"),
    "bench_synth_engines.py": ([], r"same samples and QA table in every run: True"),
    "bench_synth_memory.py": ([], r"documents_in_flight 4: 2x documents -> peak RssAnon x\d"),
    "bench_concat_parallel.py": ([], r"shards byte-identical: True"),
    "bench_serve.py": ([], r"concurrency 16: .* ratio \d"),
    "bench_train_sp.py": ([], r"longest of \[512\] within 64 MiB per rank"),
    "bench_train_packing.py": ([], r"pack\s+\d+ tok/s"),
    "bench_lengthen.py": (["{tmp}/lengthen"], r"after: trained generator, same instructions"),
    "bench_memory_plan.py": ([], r"formula/measured\n.*\d+\.\d{3}\n"),
    "bench_train_data.py": ([], r"whole\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
    "bench_train_grad_scale.py": ([], r"dp1 x sp2\s+told SP\s+\d"),
    "bench_data_quality.py": (["--out", "{tmp}/quality"], r"QA kept:"),
    "gpu_checks.py": (["--out", "{tmp}/gpu"], r"the GPU checks did not run|all checks ran"),
}

SKIPPED = {
    "bench_context_extension.py": "trains and serves SmolLM2 (four models, RULER past 8K): tens of minutes at any "
                                  "size; run it by hand (`make bench-context-extension`)",
    "bench_backends.py": "has its own smoke test",
    "smoke_sizes.py": "the --smoke helper, not a bench",
}


def test_every_bench_is_listed():
    """A new bench must get a smoke case (or a stated reason to have none)."""
    scripts = {p.name for p in BENCH.glob("*.py")}
    assert scripts - SMOKES.keys() - SKIPPED.keys() == set()
    assert SMOKES.keys() - scripts == set()


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKES))
def test_bench_smoke(script, tmp_path):
    import re

    extra, expected = SMOKES[script]
    cmd = [sys.executable, str(BENCH / script), "--smoke", *(a.format(tmp=tmp_path) for a in extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --smoke exited {proc.returncode}:\n{out[-4000:]}"
    assert re.search(expected, proc.stdout), f"{script} --smoke printed no result line /{expected}/:\n{proc.stdout[-4000:]}"
