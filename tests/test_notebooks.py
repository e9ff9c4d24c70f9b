"""notebooks/: both notebooks execute top to bottom (nbclient, a real kernel) on outputs this test makes
itself — a very small tiny-model synthesis run and a real tiny evaluation of two models through the
served endpoint — and produce the figures they promise, so they cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ports import free_port

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def synth_dir(ray_local, tmp_path_factory):
    """Two curriculum stages from two short books (the Python API, as `ctxforge synth` runs it)."""
    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import synthesize

    out = tmp_path_factory.mktemp("synth")
    cfg = load_config(SynthConfig, "tiny", [
        f"output.dir={out}", "input.limit=2", "qa.hierarchical_per_document=2", "qa.diverse_per_document=1",
        "concat.stages=[{name: 4K, target_tokens: 4096, documents_per_sample: 1, samples: 2},"
        " {name: 8K, target_tokens: 8192, documents_per_sample: 2, samples: 1}]",
        "runtime.progress=false"])
    synthesize(cfg)
    return out


@pytest.fixture(scope="module")
def eval_dir(ray_local, tiny_model_path, tmp_path_factory):
    """A real evaluation: the tiny model served by Ray Serve, RULER NIAH + VT at 1K/2K under two labels."""
    from ray import serve

    from ctxforge.serve.app import run_app
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import evaluate

    out = tmp_path_factory.mktemp("eval")
    endpoint = run_app(ServeConfig(model=tiny_model_path, port=free_port(), max_model_len=4096,
                                   max_ongoing_requests=8, app_name="test-notebooks"))
    try:
        cfg = EvalConfig.model_validate({
            "output": {"dir": str(out)},
            "models": [{"name": "base", "model": tiny_model_path, "base_url": endpoint},
                       {"name": "trained", "model": tiny_model_path, "base_url": endpoint}],
            "ruler": {"tasks": ["niah_single_1", "niah_single_2", "vt"], "lengths": [1024, 2048],
                      "num_samples": 2, "depths": [10, 50, 90]},
            "infinitebench": {"enabled": False},
            "client": {"concurrency": 8, "max_retries": 2, "timeout_s": 300},
            "references": [{"name": "published-row", "benchmark": "ruler", "scores": {"1024": 90.0, "2048": 80.0}}],
        })
        evaluate(cfg, config_label="test-notebooks")
    finally:
        serve.shutdown()
    assert (out / "results.json").exists()
    return out


def _execute(name: str, env: dict, monkeypatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()            # raises CellExecutionError on the first failing cell
    return nb


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"one cell tagged {tag!r} expected"
    return cells[0]


def _pngs(cell) -> int:
    return sum(1 for o in cell.get("outputs", []) if "image/png" in o.get("data", {}))


def _text(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            parts.append(o.get("text", ""))
            parts += [str(v) for k, v in o.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(parts)


def test_notebooks_are_stored_rendered_and_read_their_inputs_from_the_environment():
    """Shipped with the outputs of a SmolLM2 demo run, so they can be read without running them: every code
    cell ran, none failed, the figures are there."""
    for name, var, default in (("01_synthesized_data.ipynb", "CTXFORGE_SYNTH_DIR", '"runs" / "smollm2" / "synth"'),
                               ("02_evaluation.ipynb", "CTXFORGE_EVAL_DIR", '"runs" / "smollm2" / "eval"')):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.get("execution_count") for c in code), name
        assert not [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"], name
        assert sum(_pngs(c) for c in code) >= 3, name
        src = "\n".join(c.source for c in nb.cells)
        assert var in src and default in src, name
        assert "mean nothing" in src, name       # the tiny model's numbers are said to mean nothing


def test_01_synthesized_data(synth_dir, monkeypatch):
    manifest = json.loads((synth_dir / "manifest.json").read_text())
    nb = _execute("01_synthesized_data.ipynb", {"CTXFORGE_SYNTH_DIR": synth_dir}, monkeypatch)
    hist = _tagged(nb, "length-histogram")
    assert _pngs(hist) == 1
    for tag in ("qa-types", "grounding", "loss-mask-strip"):
        assert _pngs(_tagged(nb, tag)) == 1, tag
    html_out = [o["data"]["text/html"] for o in _tagged(nb, "loss-mask-html")["outputs"] if "text/html" in o.get("data", {})]
    assert len(html_out) == 1 and 'class="loss-mask"' in html_out[0] and "background:#b7f0b1" in html_out[0]
    text = _text(nb)
    assert "all spans inside assistant turns: True" in text
    assert f"grounding rate: {100 * manifest['grounding']['overall']['rate']:.1f}%" in text
    assert "Random-weight tiny model" in text
    assert set(manifest["stages"]) == {"4K", "8K"}


def test_02_evaluation(eval_dir, monkeypatch):
    results = json.loads((eval_dir / "results.json").read_text())
    assert set(results["models"]) == {"base", "trained"}
    nb = _execute("02_evaluation.ipynb", {"CTXFORGE_EVAL_DIR": eval_dir}, monkeypatch)
    assert _pngs(_tagged(nb, "niah-heatmap")) == 1
    assert _pngs(_tagged(nb, "score-vs-length")) == 1
    assert _pngs(_tagged(nb, "tasks-vs-length")) == 1
    text = _text(nb)
    for name in ("base", "trained"):
        needles = len(results["models"][name]["ruler"]["niah_depth"])
        assert needles > 0 and f"{name}: {needles} needles" in text
    # the trained-minus-base table has a number for every length (a score of 0 is a score, not a gap)
    diff = [o["data"]["text/plain"] for c in nb.cells for o in c.get("outputs", [])
            if "points over" in "".join(str(v) for v in o.get("data", {}).values())]
    assert diff
    assert "NaN" not in _text(nb).split("points over **base**")[1].split("</table>")[0]
    assert "points over **base**" in text and "meaningless" in text


def test_a_missing_input_fails_the_notebook(tmp_path, monkeypatch):
    """Negative control: the executor really reports a failing cell (here: no results.json)."""
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="results.json"):
        _execute("02_evaluation.ipynb", {"CTXFORGE_EVAL_DIR": tmp_path}, monkeypatch)
