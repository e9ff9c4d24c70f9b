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
