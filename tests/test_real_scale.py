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


# ---------------------------------------------------------------------------------------------------------
# each stage requests its node type's custom resource, and the launcher configs' node types provide it
# ---------------------------------------------------------------------------------------------------------

def _kuberay_groups(cluster_spec: dict) -> dict[str, dict]:
    """{group: {resources, spot, gpus}} of a KubeRay cluster spec (rayStartParams.resources is JSON in a string)."""
    import json

    groups = {}
    for g in cluster_spec.get("workerGroupSpecs") or []:
        raw = (g.get("rayStartParams") or {}).get("resources")
        pod = g["template"]["spec"]
        gpus = sum(int(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)) for c in pod["containers"])
        groups[g["groupName"]] = {"resources": json.loads(raw.strip('"').replace('\\"', '"')) if raw else {},
                                  "spot": (pod.get("nodeSelector") or {}).get("karpenter.sh/capacity-type") == "spot",
                                  "gpus": gpus}
    return groups


def _launcher_node_types(name: str) -> dict[str, dict]:
    """{node type: {resources, spot, gpus}} of a Ray cluster launcher config (aws.yaml, gcp.yaml)."""
    cfg = yaml.safe_load((CLUSTER / name).read_text())
    types = {}
    for node_type, t in cfg["available_node_types"].items():
        nc = t["node_config"]
        spot = ((nc.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
                or any((s or {}).get("provisioningModel") == "SPOT" for s in nc.get("scheduling") or []))
        gpu_type = nc.get("InstanceType", nc.get("machineType", ""))
        gpus = 8 if gpu_type.startswith(("p5.", "a3-")) else 0
        types[node_type] = {"resources": dict(t.get("resources") or {}), "spot": spot, "gpus": gpus}
    return types


def stage_requests(configs: dict) -> dict[str, tuple[dict, int]]:
    """{stage config: (custom resources of one GPU bundle/worker, GPUs one node must hold of them)}."""
    synth = configs["synth"]["qwen72b-vllm"].generator
    train = configs["train"]["train-llama8b-1m"]
    serve = configs["serve"]["serve-llama8b-1m"]
    evaluation = configs["eval"]["eval-llama8b-1m"].serve
    return {"qwen72b-vllm": (synth.resources, synth.tensor_parallel_size),
            "train-llama8b-1m": (train.runtime.resources, max(s.sp_degree for s in train.stages)),
            "serve-llama8b-1m": (serve.resources, serve.tensor_parallel_size),
            "eval-llama8b-1m": (evaluation.resources, evaluation.tensor_parallel_size)}


def resource_errors(requests: dict[str, tuple[dict, int]], node_types: dict[str, dict], where: str) -> list[str]:
    """A requested custom resource that no GPU node type of `node_types` provides (enough of, for one node's
    bundles), or training's provided by a spot type."""
    errors = []
    for config, (wanted, per_node) in requests.items():
        if not wanted:
            errors.append(f"{where}: {config} requests no custom resource: it can land on any node type")
        for key, amount in wanted.items():
            hosts = [n for n, t in node_types.items() if t["gpus"] and t["resources"].get(key, 0) >= amount * per_node]
            if not hosts:
                errors.append(f"{where}: {config} requests {key}: {amount:g} per GPU, which no GPU node type provides "
                              f"({ {n: t['resources'] for n, t in node_types.items()} })")
            if config.startswith("train") and any(node_types[n]["spot"] for n in hosts):
                errors.append(f"{where}: training's {key} is provided by a spot node type "
                              f"({[n for n in hosts if node_types[n]['spot']]})")
    return errors


@pytest.mark.parametrize("launcher", ["aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml"])
def test_each_stage_requests_a_resource_its_node_type_provides(launcher):
    requests = stage_requests(_shipped())
    if launcher.startswith("kuberay"):
        types = _kuberay_groups(yaml.safe_load((CLUSTER / launcher).read_text())["spec"])
    else:
        types = _launcher_node_types(launcher)
    assert resource_errors(requests, types, launcher) == []
    # generation on the spot GPUs, training on the on-demand ones: the two requests differ
    assert requests["qwen72b-vllm"][0] != requests["train-llama8b-1m"][0]
    spot_only = {k for t in types.values() if t["spot"] for k in t["resources"]}
    assert set(requests["qwen72b-vllm"][0]) <= spot_only and not set(requests["train-llama8b-1m"][0]) & spot_only


def test_kuberay_job_and_service_clusters_provide_what_their_stage_requests():
    requests = stage_requests(_shipped())
    train_job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text())
    assert resource_errors({"train-llama8b-1m": requests["train-llama8b-1m"]},
                           _kuberay_groups(train_job["spec"]["rayClusterSpec"]), "rayjob-train") == []
    svc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert resource_errors({"serve-llama8b-1m": requests["serve-llama8b-1m"]},
                           _kuberay_groups(svc["spec"]["rayClusterConfig"]), "rayservice") == []


def test_resource_check_negative_controls():
    configs = _shipped()
    types = _launcher_node_types("aws.yaml")
    typo = _shipped({"train-llama8b-1m": ["runtime.resources={ctxforge_trian: 1}"]})
    assert any("ctxforge_trian" in e for e in resource_errors(stage_requests(typo), types, "aws"))
    none = _shipped({"train-llama8b-1m": ["runtime.resources={}"]})
    assert any("train-llama8b-1m requests no custom resource" in e for e in resource_errors(stage_requests(none), types, "aws"))
    on_spot = {n: {**t, "resources": {**t["resources"], "ctxforge_train": 1000}} if t["spot"] else t
               for n, t in types.items()}
    assert any("spot node type" in e for e in resource_errors(stage_requests(configs), on_spot, "aws"))
    scarce = {n: {**t, "resources": {**t["resources"], "ctxforge_train": 4}} if n == "train_h100" else t
              for n, t in types.items()}
    assert any("ctxforge_train" in e for e in resource_errors(stage_requests(configs), scarce, "aws"))


# --- the wiring: what each stage hands to Ray -------------------------------------------------------------

def test_training_workers_request_the_training_node_resource():
    from ctxforge.train.resources import scaling_config, worker_resources

    train = _shipped()["train"]["train-llama8b-1m"]
    per_worker = worker_resources(train.runtime, use_gpu=True)
    assert per_worker == {"CPU": 8, "GPU": 1, "ctxforge_train": 1}
    for stage in train.stages:
        sc = scaling_config(stage, per_worker, use_gpu=True)
        assert sc.num_workers == stage.workers and sc.resources_per_worker == per_worker
    tiny = load_config(_model("train"), "train-tiny")
    assert worker_resources(tiny.runtime, use_gpu=False) == {"CPU": tiny.runtime.cpus_per_worker}   # local: none


class _View:
    def __init__(self, totals):
        self._totals = totals

    def totals(self):
        return dict(self._totals)

    def node_gpus(self):
        return [8.0]

    def request(self, bundles):
        pass


def test_training_preflight_names_a_missing_node_resource():
    from ctxforge.train.resources import ResourceError, check_capacity, worker_resources

    train = _shipped()["train"]["train-llama8b-1m"]
    per_worker = worker_resources(train.runtime, use_gpu=True)
    spot_only = _View({"CPU": 192, "GPU": 8, "ctxforge_generate": 1000})
    with pytest.raises(ResourceError, match=r"ctxforge_train 8 \(> 0\).*runtime.resources"):
        check_capacity(train.stages, per_worker, spot_only)
    check_capacity(train.stages, per_worker, _View({"CPU": 192, "GPU": 8, "ctxforge_train": 1000}))


def test_serve_and_eval_replicas_request_the_generation_node_resource(tiny_model_path):
    from ctxforge.serve.app import build_app, build_llm_config
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.evaluate import served_here_config

    configs = _shipped()
    serve = configs["serve"]["serve-llama8b-1m"].model_copy(update={"max_model_len": 1048576})
    llm = build_llm_config(serve, "/m")
    assert llm["placement_group_config"] == {"bundle_per_worker": {"CPU": 1, "GPU": 1, "ctxforge_generate": 1},
                                             "strategy": "PACK"}
    # what ray.serve.llm's engine config validates it with (LLMConfig itself needs vllm, absent on CPU)
    from ray.llm._internal.common.placement import PlacementGroupConfig

    checked = PlacementGroupConfig(**llm["placement_group_config"]).model_dump(exclude_unset=True)
    assert checked["bundle_per_worker"]["ctxforge_generate"] == 1
    evaluation = configs["eval"]["eval-llama8b-1m"]
    for entry in evaluation.models:
        served = served_here_config(evaluation, entry)
        assert served.resources == {"ctxforge_generate": 1}
        assert "ctxforge_generate" in build_llm_config(served.model_copy(update={"max_model_len": 1048576, "rope": None}), "/m")[
            "placement_group_config"]["bundle_per_worker"]
    # the CPU (transformers) deployment: its replica actor
    app = build_app(ServeConfig(model=tiny_model_path, resources={"ctxforge_generate": 1}))
    assert app._bound_deployment.ray_actor_options["resources"] == {"ctxforge_generate": 1}
    assert "placement_group_config" not in build_llm_config(ServeConfig(model="/m", max_model_len=4096), "/m")


def test_synthesis_generators_request_the_generation_node_resource():
    from ctxforge.generation.backends.hf import HFBackend
    from ctxforge.generation.backends.http import HTTPBackend
    from ctxforge.generation.backends.vllm import VLLMBackend

    gen = _shipped()["synth"]["qwen72b-vllm"].generator
    vllm = VLLMBackend(gen, "/models/qwen")
    # streaming scheduler (generation/pool.py): each TP-4 engine's placement group, every bundle on the node type
    bundles = vllm.placement_bundles()
    assert len(bundles) == 4 and all(b["ctxforge_generate"] == 1 and b["GPU"] == 1 for b in bundles)
    one_gpu = VLLMBackend(gen.model_copy(update={"tensor_parallel_size": 1}), "/models/qwen")
    assert one_gpu.placement_bundles() is None and one_gpu.actor_options()["resources"] == {"ctxforge_generate": 1}
    for backend, extra in ((HFBackend, {}), (HTTPBackend, {"base_url": "http://127.0.0.1:1/v1"})):
        cfg = gen.model_copy(update={"backend": backend.name, "concurrency": 1, **extra})
        assert backend(cfg, "/models/qwen").actor_options()["resources"] == {"ctxforge_generate": 1}
        local = backend(cfg.model_copy(update={"resources": {}}), "/m")
        assert "resources" not in local.actor_options()
