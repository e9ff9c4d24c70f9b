"""Shared test set-up: offline, quiet Ray, GPU tests skipped without a GPU, one local Ray per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # no test may reach a model hub
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with `make test-gpu` where one is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _console_state_per_test():
    """A CLI command run in-process calls quiet_ray(), which sets RAY_DATA_LOGGING_CONFIG and the console's
    quiet flag for the whole process; put both back so that no test depends on which ran before it."""
    from ctxforge import console

    env = os.environ.get("RAY_DATA_LOGGING_CONFIG")
    state = (console._State.quiet, console._State.session_logs)
    yield
    if env is None:
        os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
    else:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = env
    console._State.quiet, console._State.session_logs = state


@pytest.fixture(scope="session")
def tiny_model_path():
    from ctxforge.models import resolve_model_path
    return resolve_model_path("ctxforge:tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from ctxforge.models import load_tokenizer
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def ray_local():
    """A 2-CPU local Ray like CI's machine (actor pools must not deadlock it)."""
    import ray
    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm2_path():
    """SmolLM2-135M-Instruct materialized once per machine (cached under $CTXFORGE_CACHE, ~45 s the first time)."""
    from ctxforge.models import resolve_model_path
    return resolve_model_path("ctxforge:smollm2")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from ctxforge.models import load_tokenizer
    return load_tokenizer(smollm2_path)


SMOLLM2_CORPUS = [  # one short book (Obadiah, 837 tokens: 5 passages of <= 192 tokens), 7+ QA, one 2K sample
    "input.limit=1", "input.max_document_tokens=900",
    "grounding.on_ungrounded=flag",  # keep every validated QA: the training tests need a sample whatever the rate
    "concat.n1_hierarchical=4", "concat.n1_diverse=3", "concat.n2_earlier_diverse=0", "concat.n3_followups=0",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 1}]",
]


@pytest.fixture(scope="session")
def smollm2_corpus(smollm2_path, tmp_path_factory):
    """ONE small corpus synthesized by SmolLM2 (generator and target) per test session, through the CLI
    (`ctxforge synth --config smollm2` + SMOLLM2_CORPUS), shared by the real-model tests. Set
    CTXFORGE_TEST_SMOLLM2_SYNTH_DIR to reuse the output of an earlier identical run."""
    import pathlib
    import subprocess
    import sys

    reuse = os.environ.get("CTXFORGE_TEST_SMOLLM2_SYNTH_DIR")
    if reuse:
        return pathlib.Path(reuse)
    out = tmp_path_factory.mktemp("smollm2-synth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ctxforge", "synth", "--config", "smollm2", f"output.dir={out}", *SMOLLM2_CORPUS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out
