"""Behaviour pinned across refactors of the generation layer: `ctxforge synth --config tiny` on two short
books and one tiny Self-Lengthen iteration (no training) must write the same samples, QA tables, text files
and manifests as the golden digest in tests/fixtures/generation_equivalence.json.

Compared: every output file (Parquet rows and JSON/JSONL contents, hashed after normalization) and the
manifests themselves, leaving out what legitimately varies between runs and machines: durations and
rates derived from them, timestamps, paths, host and engine identities, and the echoed config (an input,
not a behaviour). The hf engine generates one request at a time, seeded from the request id and attempt,
so the outputs depend only on which requests are made, not on their order or batching.

Regenerate the golden only for a change that is meant to alter outputs:
    CTXFORGE_WRITE_GOLDEN=1 python -m pytest tests/test_generation_equivalence.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ctxforge.config import load_config

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "fixtures" / "generation_equivalence.json"

SYNTH = [
    "input.limit=2", "qa.hierarchical_per_document=3", "qa.diverse_per_document=2",
    "concat.n1_hierarchical=1", "concat.n1_diverse=1", "concat.n2_earlier_diverse=1", "concat.n3_followups=1",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 2},"
    " {name: 4K, target_tokens: 4096, documents_per_sample: 2, samples: 2}]",
    "runtime.progress=false",
]
LENGTHEN = ["self_instruct.count=2", "extend.rounds=1", "train.enabled=false", "runtime.progress=false"]

# Keys whose values vary from run to run or machine to machine (durations, clocks, identities, paths).
VOLATILE_KEY = re.compile(
    r"(_s|_at|_per_s|_per_busy_s|_per_engine_busy_s|_share|_usd|_hours?)$|^(wall|timings|pid|node_id|engine_id|"
    r"host|hostname|ctxforge_version|config|config_source|render_workers|generating_s|idle_s|alive_s|busy|"
    r"throughput|measured|projection|busy_fraction)$")


def normalize(value, out: str):
    """`value` with volatile keys left out and the output directory written as <OUT>."""
    if isinstance(value, dict):
        return {k: normalize(v, out) for k, v in sorted(value.items()) if not VOLATILE_KEY.search(str(k))}
    if isinstance(value, (list, tuple)):
        return [normalize(v, out) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, str):
        value = value.replace(out, "<OUT>")
        # other absolute paths (model cache, checkout) differ per machine: their last component is what counts
        return os.path.basename(value) if value.startswith("/") and " " not in value else value
    return value


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:16]


def outputs(out: Path) -> dict:
    """{"files": {relative path: digest of its normalized contents}, "manifest": normalized manifest}."""
    root = str(out)
    files = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith("work/") or rel == "manifest.json":
            continue
        if path.suffix == ".parquet":
            files[rel] = _digest(normalize(pq.read_table(path).to_pylist(), root))
        elif path.suffix == ".jsonl":
            files[rel] = _digest([normalize(json.loads(x), root) for x in path.read_text().splitlines() if x.strip()])
        elif path.suffix == ".json":
            files[rel] = _digest(normalize(json.loads(path.read_text()), root))
        else:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    manifest = normalize(json.loads((out / "manifest.json").read_text()), root)
    return {"files": files, "manifest": manifest}


def run_both(base: Path) -> dict:
    from ctxforge.lengthen.config import LengthenConfig
    from ctxforge.lengthen.loop import run_lengthen
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    synthesize(load_config(SynthConfig, "tiny", [f"output.dir={base / 'synth'}", *SYNTH]))
    run_lengthen(load_config(LengthenConfig, "lengthen-tiny", [f"output.dir={base / 'lengthen'}", *LENGTHEN]))
    return {"synth": outputs(base / "synth"), "lengthen": outputs(base / "lengthen")}


def _differences(want, got, where: str = "") -> list[str]:
    """What changed from `want` to `got`. A key a manifest gained is an addition, not a changed behaviour;
    a new or missing output file, a missing key and a changed value are differences."""
    if isinstance(want, dict) and isinstance(got, dict):
        diffs = []
        for key in sorted(set(want) | set(got)):
            if key not in got:
                diffs.append(f"{where}.{key}: missing")
            elif key not in want:
                if ".manifest" not in where + "." + key:
                    diffs.append(f"{where}.{key}: new ({json.dumps(got[key], default=str)[:120]})")
            else:
                diffs += _differences(want[key], got[key], f"{where}.{key}")
        return diffs
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got)) for d in _differences(w, g, f"{where}[{i}]")]
    return [] if want == got else [f"{where}: {json.dumps(want, default=str)[:120]} -> {json.dumps(got, default=str)[:120]}"]


def test_synthesis_and_lengthen_outputs_match_the_golden(ray_local, tmp_path):
    got = run_both(tmp_path)
    if os.environ.get("CTXFORGE_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())
    diffs = _differences(want, got)
    assert not diffs, "outputs differ from the golden:\n" + "\n".join(diffs[:40])
    assert got["synth"]["files"] and got["lengthen"]["files"]   # the comparison covered real files


def test_normalization_keeps_what_is_compared():
    """Negative control: a changed answer or count shows in the digest; a changed duration or path does not."""
    record = {"answer": "a", "requests": 3, "wall_s": 1.5, "dir": "/tmp/x/samples", "engine_id": "e1",
              "model": "/home/a/.cache/models/tiny"}
    base = normalize(record, "/tmp/x")
    assert normalize({**record, "model": "/root/models/tiny"}, "/tmp/x") == base
    assert normalize({**record, "wall_s": 9.0, "engine_id": "e2"}, "/tmp/x") == base
    assert normalize({**record, "dir": "/tmp/y/samples"}, "/tmp/y") == base
    assert normalize({**record, "answer": "b"}, "/tmp/x") != base
    assert normalize({**record, "requests": 4}, "/tmp/x") != base
    assert _differences({"files": {"a": "1"}}, {"files": {"a": "1", "b": "2"}})        # a new output file counts
    assert not _differences({"manifest": {"a": 1}}, {"manifest": {"a": 1, "loads": 2}})  # an added manifest key not
    assert not _differences({"manifest": {"it": [{"a": 1}]}}, {"manifest": {"it": [{"a": 1, "engines": {}}]}})
    assert _differences({"manifest": {"it": [{"a": 1}]}}, {"manifest": {"it": [{"a": 2, "engines": {}}]}})
    assert _differences({"manifest": {"a": 1}}, {"manifest": {"a": 2}})
