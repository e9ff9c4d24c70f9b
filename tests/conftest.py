"""Shared test set-up: offline, quiet Ray, GPU tests skipped without a GPU, one local Ray per session."""

from __future__ import annotations

import logging
import os
import sys

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


def _pytests(handler: logging.Handler) -> bool:
    """pytest's own capture handlers, which its logging plugin adds and removes around each test phase."""
    return type(handler).__module__.startswith("_pytest")


def _logger_settings() -> dict:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return {lg: ([h for h in lg.handlers if not _pytests(h)], lg.level, lg.propagate, lg.disabled) for lg in loggers}


@pytest.fixture(autouse=True)
def _console_state_per_test():
    """A CLI command run in-process (main([...])) sets up the console for the whole process, as it should in its
    own process: quiet_ray() sets RAY_DATA_LOGGING_CONFIG and the console's quiet flag, and logging handlers
    are bound to the sys.stderr of that moment, which under capsys is a stream pytest closes after the test (a
    later record then fails with "I/O operation on closed file", and pytest itself can die: "lost sys.stderr").
    Put the console state and every logger that existed before the test back, and point any handler still
    left on a closed stream at the session's stderr, so that no test depends on which ran before it."""
    from ctxforge import console

    env = os.environ.get("RAY_DATA_LOGGING_CONFIG")
    state = (console._State.quiet, console._State.session_logs, dict(console._State.pending))
    loggers = _logger_settings()
    yield
    if env is None:
        os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
    else:
        os.environ["RAY_DATA_LOGGING_CONFIG"] = env
    console._State.quiet, console._State.session_logs, pending = state
    console._State.pending.clear()
    console._State.pending.update(pending)
    for logger, (handlers, level, propagate, disabled) in loggers.items():
        logger.handlers[:] = [h for h in logger.handlers if _pytests(h)] + handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled
    for logger in _logger_settings():   # loggers made during the test (a library imported by it)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr   # not setStream(): it flushes the closed stream first


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
