"""cluster/: every stage under `ray job submit` on a real multi-node Ray cluster, and the cluster YAMLs
validated against the schemas they must meet.

The slow tests start a real two-node Ray cluster on this machine: a head with 0 CPUs (as in
cluster/aws.yaml: no work on the head, the job drivers run there) and a worker node process with 2 CPUs
and a custom resource. Every `ray` command gets RAY_AUTH_MODE=disabled (Ray >= 2.59 turns token auth on
for local clusters; the CLI and the cluster must agree), its own --temp-dir and free ports, so nothing
clashes with another Ray on the machine. Teardown kills exactly the processes of this cluster (found by
their temp dir / GCS address, and their children), never `ray stop`, which would kill every Ray on the
machine, including other people's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ports import free_port
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")


# ---------------------------------------------------------------------------------------------------------
# a real local multi-node Ray cluster
# ---------------------------------------------------------------------------------------------------------


class LocalCluster:
    """A head node and worker nodes started with `ray start`, each with its own temp dir and ports."""

    def __init__(self):
        # short root: Ray's unix socket paths must stay under ~107 characters
        self.root = Path(tempfile.mkdtemp(prefix="cfx-", dir="/tmp"))
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ)
        self.env.update({
            "PATH": f"{VENV_BIN}{os.pathsep}{self.env.get('PATH', '')}",   # job entrypoints find `ctxforge`
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        })
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, Path] = {}

    def _ray(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([RAY, *args], env=self.env, cwd=str(REPO), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def _node_ports(self) -> list[str]:
        return ["--node-ip-address=127.0.0.1", f"--node-manager-port={free_port()}",
                f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                f"--metrics-export-port={free_port()}"]

    def start_head(self, num_cpus: int = 0) -> None:
        temp = self.root / "h"
        self.nodes["head"] = temp
        self._ray("start", "--head", f"--num-cpus={num_cpus}", f"--port={self.gcs_port}",
                  f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                  f"--ray-client-server-port={free_port()}", "--disable-usage-stats", f"--temp-dir={temp}",
                  *self._node_ports())

    def add_worker(self, name: str, num_cpus: int = 2) -> None:
        temp = self.root / name
        self.nodes[name] = temp
        self._ray("start", f"--address={self.address}", f"--num-cpus={num_cpus}",
                  '--resources={"worker_node": 1}', f"--temp-dir={temp}", *self._node_ports())

    def _processes(self, node: str | None = None) -> list:
        """This cluster's processes (of one node, or all), with their children."""
        import psutil

        marks = [str(self.nodes[node])] if node else [str(self.root), self.address]
        found = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(p.info["cmdline"] or [])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if any(m in cmd for m in marks):
                found[p.pid] = p
                try:
                    for c in p.children(recursive=True):
                        found[c.pid] = c
                except psutil.NoSuchProcess:
                    pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def kill_node(self, node: str) -> int:
        """SIGKILL a worker node: its raylet, agents, log monitor and every worker process under them
        (what a spot reclaim does to the node's processes)."""
        import psutil

        procs = self._processes(node)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=20)
        return len(procs)

    def stop(self) -> list:
        """Kill every process of this cluster; returns the ones still alive afterwards (should be none)."""
        import psutil

        for _ in range(3):
            procs = self._processes()
            if not procs:
                break
            for p in procs:
                try:
                    p.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=20)
        left = []
        for p in self._processes():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.root, ignore_errors=True)
        return left

    # --- jobs -------------------------------------------------------------------------------------------
    def submit(self, entrypoint: list[str], submission_id: str) -> None:
        """`ray job submit --working-dir . --no-wait -- <entrypoint>`; retried while the head's job agent
        is still registering ("No available agent to submit job")."""
        for _ in range(60):
            proc = self._ray("job", "submit", f"--address={self.dashboard}", "--working-dir", ".",
                             f"--submission-id={submission_id}", "--no-wait", "--", *entrypoint, check=False)
            if proc.returncode == 0:
                return
            if "No available agent" not in proc.stdout + proc.stderr:
                raise RuntimeError(f"ray job submit failed:\n{proc.stdout}\n{proc.stderr}")
            time.sleep(2)
        raise RuntimeError("the job agent never became available")

    def status(self, submission_id: str) -> str:
        proc = self._ray("job", "status", f"--address={self.dashboard}", submission_id)
        out = proc.stdout + proc.stderr
        m = re.search(r"Job '[^']+' (succeeded|failed|was stopped)", out)
        if m:
            return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[m.group(1)]
        m = re.search(r"Status for job '[^']+': (?:JobStatus\.)?(\w+)", out)
        return m.group(1) if m else out

    def wait(self, submission_id: str, timeout_s: float = 900) -> tuple[str, str]:
        """Block until the job ends (`ray job logs --follow`), then return its status and logs.

        The limit is generous: a loaded 2-core CI machine has taken over 4 minutes for the training job.
        """
        proc = self._ray("job", "logs", f"--address={self.dashboard}", "--follow", submission_id,
                         timeout=timeout_s, check=False)
        for _ in range(30):
            status = self.status(submission_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, proc.stdout + proc.stderr
            time.sleep(1)
        return status, proc.stdout + proc.stderr

    def logs(self, submission_id: str) -> str:
        return self._ray("job", "logs", f"--address={self.dashboard}", submission_id, check=False).stdout


SYNTH_SMALL = ["input.limit=2", "qa.hierarchical_per_document=2", "qa.diverse_per_document=1",
               "concat.stages=[{name: 4K, target_tokens: 4096, documents_per_sample: 1, samples: 2}]",
               "runtime.progress=false"]


# ---------------------------------------------------------------------------------------------------------
# validators for the YAMLs in cluster/
# ---------------------------------------------------------------------------------------------------------

STAGE_CONFIG_CLASS = {
    "synth": ("ctxforge.pipeline.config", "SynthConfig"),
    "train": ("ctxforge.train.config", "TrainConfig"),
    "eval": ("ctxforge.serve.eval_config", "EvalConfig"),
    "serve": ("ctxforge.serve.config", "ServeConfig"),
}


def ray_autoscaler_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _is_spot(node_config: dict) -> bool:
    aws = (node_config.get("InstanceMarketOptions") or {}).get("MarketType") == "spot"
    gcp = any(isinstance(s, dict) and (s.get("provisioningModel") == "SPOT" or s.get("preemptible") is True)
              for s in node_config.get("scheduling") or [])
    return aws or gcp


def _gpus_of(node_config: dict) -> int:
    """GPUs of an AWS/GCP instance type (the ones these configs use)."""
    t = node_config.get("InstanceType") or node_config.get("machineType") or ""
    known = {"p5.48xlarge": 8, "p4d.24xlarge": 8, "g5.12xlarge": 4, "a3-highgpu-8g": 8, "a3-megagpu-8g": 8,
             "a2-ultragpu-8g": 8}
    if t in known:
        return known[t]
    return sum(int(a.get("acceleratorCount", 0)) for a in node_config.get("guestAccelerators") or [])


def validate_launcher_config(cfg: dict) -> list[str]:
    """Ray's own JSON schema, plus what ctxforge needs from the node types. Returns the problems."""
    import jsonschema

    errors = [f"schema: {'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(ray_autoscaler_schema()).iter_errors(cfg)]
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    if errors:
        return errors
    if head not in types:
        errors.append(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")
        return errors
    if (types[head].get("resources") or {}).get("CPU") != 0:
        errors.append("the head must advertise CPU: 0 (no work on the head)")
    workers = {name: t for name, t in types.items() if name != head}
    spot_gpu = [n for n, t in workers.items() if _is_spot(t["node_config"]) and _gpus_of(t["node_config"]) > 0
                and t.get("min_workers", 0) == 0]
    ondemand_gpu = [n for n, t in workers.items() if not _is_spot(t["node_config"]) and _gpus_of(t["node_config"]) > 1]
    if not spot_gpu:
        errors.append("no autoscaling (min_workers 0) spot GPU worker type for generation")
    if not ondemand_gpu:
        errors.append("no on-demand multi-GPU worker type for training")
    for n in ondemand_gpu:
        cmds = " ".join(types[n].get("worker_setup_commands") or []) + json.dumps(types[n]["node_config"])
        if "NCCL" not in cmds:
            errors.append(f"training node type {n!r} sets no NCCL/interconnect settings")
    for n, t in workers.items():
        if t.get("max_workers", 0) > cfg.get("max_workers", 0):
            errors.append(f"node type {n!r}: max_workers {t.get('max_workers')} > cluster max_workers")
    setup = " ".join(cfg.get("setup_commands") or [])
    if 'pip install --no-build-isolation -e ".[gpu]"' not in setup:  # flash-attn's setup.py imports torch
        errors.append('setup_commands do not install ctxforge with its GPU extra '
                      '(pip install --no-build-isolation -e ".[gpu]")')
    if not any("--head" in c for c in cfg.get("head_start_ray_commands") or []):
        errors.append("head_start_ray_commands do not start a head")
    return errors


def check_stage_command(command: str) -> list[str]:
    """`ctxforge <stage> --config <packaged name> key=value...`: the config exists and loads with the overrides."""
    import importlib
    import shlex

    from ctxforge.config import ConfigError, load_config, packaged_config_names

    argv = shlex.split(command)
    if len(argv) < 4 or argv[0] != "ctxforge" or argv[1] not in STAGE_CONFIG_CLASS or argv[2] != "--config":
        return [f"not a `ctxforge <stage> --config NAME` command: {command!r}"]
    name, overrides = argv[3], argv[4:]
    if name not in packaged_config_names():
        return [f"--config {name!r} is not a packaged config ({packaged_config_names()})"]
    module, cls = STAGE_CONFIG_CLASS[argv[1]]
    try:
        load_config(getattr(importlib.import_module(module), cls), name, overrides)
    except (ConfigError, ValueError) as err:
        return [f"{command!r}: {err}"]
    return []


def _containers(pod_template: dict) -> list[dict]:
    return ((pod_template or {}).get("spec") or {}).get("containers") or []


def _gpus_per_pod(group: dict) -> int:
    n = 0
    for c in _containers(group.get("template")):
        res = c.get("resources") or {}
        lim = (res.get("limits") or {}).get("nvidia.com/gpu")
        req = (res.get("requests") or {}).get("nvidia.com/gpu")
        if lim is not None and req is not None and str(lim) != str(req):
            return -1
        n += int(lim or 0)
    return n


def validate_ray_cluster_spec(spec: dict, where: str) -> list[str]:
    errors = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}: headGroupSpec missing"]
    if not _containers(head.get("template")):
        errors.append(f"{where}: headGroupSpec.template has no containers")
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        errors.append(f"{where}: the head should start with num-cpus: \"0\" (no work on the head)")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return errors + [f"{where}: workerGroupSpecs missing or empty"]
    for g in groups:
        for key in ("groupName", "minReplicas", "maxReplicas", "template"):
            if key not in g:
                errors.append(f"{where}: worker group {g.get('groupName')!r} lacks {key}")
        if not _containers(g.get("template")):
            errors.append(f"{where}: worker group {g.get('groupName')!r} has no containers")
        if isinstance(g.get("minReplicas"), int) and isinstance(g.get("maxReplicas"), int) \
                and g["minReplicas"] > g["maxReplicas"]:
            errors.append(f"{where}: worker group {g.get('groupName')!r}: minReplicas > maxReplicas")
        if _gpus_per_pod(g) < 0:
            errors.append(f"{where}: worker group {g.get('groupName')!r}: GPU requests != limits")
    return errors


def _groups_by_name(spec: dict) -> dict:
    return {g.get("groupName"): g for g in spec.get("workerGroupSpecs") or []}


def validate_kuberay(doc: dict, clusters: dict[str, dict]) -> list[str]:
    """A KubeRay ray.io/v1 manifest. `clusters`: RayCluster name -> spec, for RayJobs with a clusterSelector."""
    kind = doc.get("kind")
    where = f"{kind} {((doc.get('metadata') or {}).get('name') or (doc.get('metadata') or {}).get('generateName'))}"
    if kind == "PersistentVolumeClaim":
        modes = (doc.get("spec") or {}).get("accessModes") or []
        ok = doc.get("apiVersion") == "v1" and "ReadWriteMany" in modes
        return [] if ok else [f"{where}: the shared volume must be a v1 PVC with accessModes [ReadWriteMany]"]
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"{where}: apiVersion {doc.get('apiVersion')!r} is not ray.io/v1"]
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        return validate_ray_cluster_spec(spec, where)
    if kind == "RayJob":
        errors = check_stage_command(spec.get("entrypoint") or "") if spec.get("entrypoint") else \
            [f"{where}: no entrypoint"]
        if "rayClusterSpec" in spec:
            cluster = spec["rayClusterSpec"]
            errors += validate_ray_cluster_spec(cluster, where)
        elif "clusterSelector" in spec:
            name = (spec["clusterSelector"] or {}).get("ray.io/cluster")
            if name not in clusters:
                return errors + [f"{where}: clusterSelector names RayCluster {name!r}, not among {sorted(clusters)}"]
            cluster = clusters[name]
        else:
            return errors + [f"{where}: neither rayClusterSpec nor clusterSelector"]
        if "runtimeEnvYAML" in spec:
            yaml.safe_load(spec["runtimeEnvYAML"])
        if errors:
            return errors
        errors += _stage_fits_cluster(spec.get("entrypoint") or "", cluster, where)
        return errors
    if kind == "RayService":
        errors = []
        try:
            serve_cfg = yaml.safe_load(spec.get("serveConfigV2") or "")
        except yaml.YAMLError as err:
            return [f"{where}: serveConfigV2 is not YAML: {err}"]
        apps = (serve_cfg or {}).get("applications")
        if not isinstance(apps, list) or not apps or not all(isinstance(a, dict) and a.get("import_path") for a in apps):
            return [f"{where}: serveConfigV2 needs applications[] with import_path"]
        cluster = spec.get("rayClusterConfig")
        if not isinstance(cluster, dict):
            return [f"{where}: rayClusterConfig missing"]
        errors += validate_ray_cluster_spec(cluster, where)
        pod_gpus = max([_gpus_per_pod(g) for g in cluster.get("workerGroupSpecs") or []] or [0])
        for app in apps:
            for llm in (app.get("args") or {}).get("llm_configs") or []:
                tp = (llm.get("engine_kwargs") or {}).get("tensor_parallel_size", 1)
                if tp > pod_gpus:
                    errors.append(f"{where}: tensor_parallel_size {tp} > GPUs per worker pod {pod_gpus}")
        return errors
    return [f"{where}: unknown kind {kind!r}"]


def _stage_fits_cluster(entrypoint: str, cluster: dict, where: str) -> list[str]:
    """The GPUs a stage's config asks for exist in the cluster's worker groups."""
    import importlib
    import shlex

    from ctxforge.config import load_config

    argv = shlex.split(entrypoint)
    if len(argv) < 4 or argv[1] not in STAGE_CONFIG_CLASS:
        return []
    module, cls = STAGE_CONFIG_CLASS[argv[1]]
    cfg = load_config(getattr(importlib.import_module(module), cls), argv[3], argv[4:])
    groups = [g for g in cluster.get("workerGroupSpecs") or [] if _gpus_per_pod(g) > 0]
    most = max([_gpus_per_pod(g) * g.get("maxReplicas", 0) for g in groups] or [0])
    per_pod = max([_gpus_per_pod(g) for g in groups] or [0])
    if argv[1] == "synth" and cfg.generator.backend == "vllm":
        tp = cfg.generator.tensor_parallel_size
        if tp > per_pod:
            return [f"{where}: generator tensor_parallel_size {tp} > GPUs per pod {per_pod}"]
    if argv[1] == "train" and cfg.runtime.device != "cpu":
        need = max(s.workers for s in cfg.stages)
        if need > most:
            return [f"{where}: training needs {need} GPU workers; the cluster has at most {most} GPUs"]
    if argv[1] == "eval" and any(m.base_url is None for m in cfg.models):
        if cfg.serve.tensor_parallel_size > per_pod:
            return [f"{where}: eval serves with tensor_parallel_size {cfg.serve.tensor_parallel_size} > {per_pod}"]
    if not groups and argv[1] in ("synth", "train") and "tiny" not in argv[3]:
        return [f"{where}: no worker group requests GPUs (nvidia.com/gpu)"]
    return []


def load_kuberay_dir(path: Path) -> list[dict]:
    docs = []
    for f in sorted(path.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def validate_kuberay_docs(docs: list[dict]) -> list[str]:
    clusters = {(d.get("metadata") or {}).get("name"): d.get("spec") or {} for d in docs if d.get("kind") == "RayCluster"}
    errors = []
    for d in docs:
        errors += validate_kuberay(d, clusters)
    claims = {(d.get("metadata") or {}).get("name") for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    used = set(re.findall(r"claimName': '([^']+)'", repr(docs)))
    errors += [f"persistentVolumeClaim {name!r} is used but no manifest defines it" for name in sorted(used - claims)]
    return errors


# ---------------------------------------------------------------------------------------------------------
# YAML validation (fast)
# ---------------------------------------------------------------------------------------------------------

LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_meets_rays_schema_and_node_types(name):
    cfg = _load(name)
    assert validate_launcher_config(cfg) == []
    types = cfg["available_node_types"]
    spot = [n for n, t in types.items() if _is_spot(t["node_config"])]
    assert spot == ["gpu_spot"] and types["gpu_spot"]["min_workers"] == 0
    assert not _is_spot(types["train_h100"]["node_config"]) and _gpus_of(types["train_h100"]["node_config"]) == 8
    # the 1M stage of train-llama8b-1m fits the training node type (8 GPUs per node)
    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig

    train = load_config(TrainConfig, "train-llama8b-1m")
    assert max(s.workers for s in train.stages) <= 8 * types["train_h100"]["max_workers"]


def test_launcher_validator_negative_controls():
    good = _load("aws.yaml")

    def broken(mutate):
        cfg = json.loads(json.dumps(good))
        mutate(cfg)
        return validate_launcher_config(cfg)

    assert any("head_node_type 'haed'" in e for e in broken(lambda c: c.update(head_node_type="haed")))
    assert any(e.startswith("schema:") for e in broken(lambda c: c.update(max_wokers=3)))             # unknown key
    assert any(e.startswith("schema:") for e in broken(
        lambda c: c["available_node_types"]["gpu_spot"].update(resources={"GPU": 0.5})))             # not an integer
    assert any(e.startswith("schema:") for e in broken(
        lambda c: c["available_node_types"]["gpu_spot"].pop("node_config")))                         # required
    assert any("spot GPU" in e for e in broken(
        lambda c: c["available_node_types"]["gpu_spot"]["node_config"].pop("InstanceMarketOptions")))
    assert any("CPU: 0" in e for e in broken(lambda c: c["available_node_types"]["head"].update(resources={})))
    assert any("GPU extra" in e for e in broken(lambda c: c.update(setup_commands=["pip install ctxforge"])))
    assert any("NCCL" in e for e in broken(lambda c: c["available_node_types"]["train_h100"].pop("worker_setup_commands")))


def test_kuberay_manifests():
    docs = load_kuberay_dir(CLUSTER / "kuberay")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["PersistentVolumeClaim", "RayCluster", "RayJob", "RayJob", "RayJob", "RayService"]
    assert validate_kuberay_docs(docs) == []
    stages = sorted(d["spec"]["entrypoint"].split()[1] for d in docs if d["kind"] == "RayJob")
    assert stages == ["eval", "synth", "train"]
    cluster = next(d for d in docs if d["kind"] == "RayCluster")["spec"]
    groups = _groups_by_name(cluster)
    assert set(groups) == {"gpu-spot", "train-h100"} and groups["gpu-spot"]["minReplicas"] == 0
    assert all(_gpus_per_pod(g) == 8 for g in groups.values())
    assert cluster["authOptions"] == {"mode": "token"}


def test_rayservice_llm_config_is_what_ctxforge_serve_builds():
    """serveConfigV2's llm_config == ctxforge.serve.app.build_llm_config(serve-llama8b-1m) (vLLM backend)."""
    from ctxforge.config import load_config
    from ctxforge.serve.app import build_llm_config
    from ctxforge.serve.config import ServeConfig

    svc = next(d for d in load_kuberay_dir(CLUSTER / "kuberay") if d["kind"] == "RayService")
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    cfg = load_config(ServeConfig, "serve-llama8b-1m",
                      [f"max_model_len={llm['engine_kwargs']['max_model_len']}"])
    assert llm == build_llm_config(cfg, llm["model_loading_config"]["model_source"])


def test_kuberay_validator_negative_controls():
    docs = load_kuberay_dir(CLUSTER / "kuberay")

    def errors_after(kind, mutate):
        copy = json.loads(json.dumps(docs))
        mutate(next(d for d in copy if d["kind"] == kind and (kind != "RayJob" or "synth" in d["spec"]["entrypoint"])))
        return validate_kuberay_docs(copy)

    assert errors_after("RayCluster", lambda d: d.update(apiVersion="ray.io/v1alpha1"))
    assert any("lacks maxReplicas" in e for e in errors_after(
        "RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas")))
    assert any("headGroupSpec" in e for e in errors_after("RayCluster", lambda d: d["spec"].pop("headGroupSpec")))
    assert any("not a packaged config" in e for e in errors_after(
        "RayJob", lambda d: d["spec"].update(entrypoint="ctxforge synth --config qwen72b-vlm")))
    assert any("unknown key" in e for e in errors_after(
        "RayJob", lambda d: d["spec"].update(entrypoint=d["spec"]["entrypoint"] + " generator.modle=x")))
    assert any("not a `ctxforge" in e for e in errors_after(
        "RayJob", lambda d: d["spec"].update(entrypoint="python -m ctxforge.pipeline")))
    assert any("clusterSelector names" in e for e in errors_after(
        "RayJob", lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "ctxforg"})))

    def no_gpus(d):
        for g in d["spec"]["workerGroupSpecs"]:
            for c in g["template"]["spec"]["containers"]:
                for part in ("requests", "limits"):
                    c["resources"][part].pop("nvidia.com/gpu")
    assert any("tensor_parallel_size 4" in e for e in errors_after("RayCluster", no_gpus))
    assert any("import_path" in e for e in errors_after(
        "RayService", lambda d: d["spec"].update(serveConfigV2="applications:\n  - name: x\n")))
    assert any("tensor_parallel_size 8" in e for e in errors_after(
        "RayService", lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        ["resources"].update(requests={"nvidia.com/gpu": "4"}, limits={"nvidia.com/gpu": "4"})))


def test_readme_commands_are_ctxforge_stages_with_packaged_configs():
    """Every `ray job submit ... -- ctxforge <stage> ...` in cluster/README.md loads with its overrides."""
    text = (CLUSTER / "README.md").read_text()
    commands = [re.sub(r"\s*\\\n\s*", " ", m).strip()
                for m in re.findall(r"ray job submit [^\n]*?-- (ctxforge (?:[^\n]*\\\n)*[^\n]*)", text)]
    stages = {c.split()[1] for c in commands}
    assert {"synth", "train", "serve", "eval"} <= stages, commands
    for c in commands:
        assert check_stage_command(c) == [], c
    for node_type in re.findall(r"`(gpu_spot|train_h100|head)`", text):
        assert node_type in _load("aws.yaml")["available_node_types"]


# ---------------------------------------------------------------------------------------------------------
# real multi-node cluster (slow)
# ---------------------------------------------------------------------------------------------------------

def _cache_rows(db: Path) -> tuple[int, int]:
    if not db.exists():
        return 0, 0
    con = sqlite3.connect(str(db), timeout=30)
    try:
        # (attempts answered, requests): one row per attempt, never duplicated
        return con.execute("SELECT COUNT(*), COUNT(DISTINCT request_id) FROM attempts").fetchone()
    except sqlite3.OperationalError:         # table not created yet
        return 0, 0
    finally:
        con.close()


def _samples(out: Path) -> dict:
    import pyarrow.parquet as pq

    rows = {}
    for f in sorted((out / "samples").glob("*/part-*.parquet")):
        t = pq.read_table(f, columns=["sample_id", "input_ids", "loss_mask"]).to_pylist()
        rows.update({r["sample_id"]: (r["input_ids"], r["loss_mask"]) for r in t})
    return rows


@pytest.fixture
def cluster():
    """Head (0 CPUs, as in cluster/aws.yaml) + one 2-CPU worker node; every process killed afterwards."""
    c = LocalCluster()
    try:
        c.start_head(num_cpus=0)
        c.add_worker("w1", num_cpus=2)
        yield c
    finally:
        left = c.stop()
        assert left == [], f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.cluster
def test_synth_then_train_as_ray_jobs(cluster):
    synth_out, train_out = cluster.root / "synth", cluster.root / "train"
    cluster.submit(["ctxforge", "synth", "--config", "tiny", f"output.dir={synth_out}", *SYNTH_SMALL], "synth")
    status, logs = cluster.wait("synth")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "Ray cluster:" in logs                    # the driver joined the cluster (RAY_ADDRESS), no local Ray
    manifest = json.loads((synth_out / "manifest.json").read_text())
    parts = sorted((synth_out / "samples" / "4K").glob("part-*.parquet"))
    assert parts and manifest["stages"]["4K"]["samples_built"] == len(_samples(synth_out)) >= 1
    rows, distinct = _cache_rows(synth_out / "work" / "requests.sqlite")
    assert rows >= distinct == manifest["requests"]["total"]["requests"] > 0

    # training reads the synthesis output; one stage, 2 gloo workers (1 CPU each) on the worker node,
    # one optimizer step (sort batching: one sample per micro-batch so both data-parallel ranks get one)
    cluster.submit(["ctxforge", "train", "--config", "train-tiny", f"input.path={synth_out}", f"output.dir={train_out}",
                    "stages=[{name: 4K, data_stage: 4K, max_seq_len: 4096, workers: 2, sp_degree: 1, "
                    "batching: sort, batch_size: 1, max_steps: 1, checkpoint_every: 1, rope: {theta: 2000000}}]",
                    "runtime.progress=false", "runtime.max_failures=0"], "train")
    status, logs = cluster.wait("train")
    assert status == "SUCCEEDED", logs[-4000:]
    ckpt = train_out / "checkpoints" / "4K"
    config = json.loads((ckpt / "config.json").read_text())
    rope = config.get("rope_parameters") or config
    assert rope["rope_theta"] == 2000000                          # the stage's RoPE is written into the checkpoint
    assert (ckpt / "model.safetensors").stat().st_size > 0 and (ckpt / "stage_complete.json").exists()
    assert list((train_out / "ray" / "tiny-4K").glob("checkpoint_*/train_state.json"))   # a Ray Train checkpoint


@pytest.mark.slow
@pytest.mark.cluster
def test_worker_node_killed_during_synthesis(cluster):
    """SIGKILL the worker node (the only node with CPUs, so the generator actor and every Ray Data task run
    there) in the middle of synthesis, then let a replacement node join, as the autoscaler does after a
    spot reclaim. Measured truth (Ray 2.60): the job does NOT fail — Ray Data restarts its actor
    (max_restarts=-1) and retries its tasks on the new node; the driver on the head keeps its state.
    The request cache ends with exactly one row per request. Resubmitting the same command (the documented
    recovery path when a job does fail) then answers every request from the cache and writes the same samples."""
    out = cluster.root / "synth"
    db = out / "work" / "requests.sqlite"
    cmd = ["ctxforge", "synth", "--config", "tiny", f"output.dir={out}", *SYNTH_SMALL]
    cluster.submit(cmd, "synth-1")
    deadline = time.monotonic() + 240            # a bound so a broken run cannot hang CI, not a timing assertion
    while _cache_rows(db)[0] == 0:
        assert cluster.status("synth-1") in ("PENDING", "RUNNING"), cluster.logs("synth-1")[-4000:]
        assert time.monotonic() < deadline, "no request finished"
        time.sleep(0.5)
    before, _ = _cache_rows(db)
    assert cluster.kill_node("w1") > 0
    assert cluster._processes("w1") == []
    assert cluster.status("synth-1") == "RUNNING"  # the driver lives on the head
    cluster.add_worker("w2", num_cpus=2)

    status, logs = cluster.wait("synth-1", timeout_s=300)
    assert status == "SUCCEEDED", logs[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    rows, distinct = _cache_rows(db)
    total = manifest["requests"]["total"]
    assert rows >= distinct == total["requests"] and rows > before   # work was finished after the kill, on w2
    assert total["failed"] == 0 and manifest["requests"]["cache_hits"] == 0
    first = _samples(out)
    assert first

    # the recovery path for a job that does fail: the same submit again
    cluster.submit(cmd, "synth-2")
    status, logs = cluster.wait("synth-2")
    assert status == "SUCCEEDED", logs[-4000:]
    again = json.loads((out / "manifest.json").read_text())
    assert again["requests"]["cache_hits"] == again["requests"]["total"]["requests"] == distinct
    assert again["requests"]["total"]["sent"] == 0
    assert _cache_rows(db) == (rows, distinct)
    assert _samples(out) == first


# Values in cluster/ that only stand for the user's own (account ids, images, file systems): each must sit on a
# line marked CHANGE-ME and be listed in the README's checklist, so nothing fake reaches `ray up` unnoticed.
PLACEHOLDER = re.compile(r"ami-0123456789abcdef0|sg-0123456789abcdef0|subnet-0123456789abcdef0|fs-0123456789abcdef0"
                         r"|my-gcp-project|10\.0\.0\.2:/ctxforge|ghcr\.io/your-org|storageClassName: efs-sc")


def test_every_placeholder_is_marked_and_listed_in_the_checklist():
    readme = (CLUSTER / "README.md").read_text()
    checklist = readme.split("## Before the first `ray up`", 1)[1].split("\n## ", 1)[0]
    found = set()
    for path in sorted(CLUSTER.rglob("*")):
        if not path.is_file() or path.name == "README.md":
            continue
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            for value in PLACEHOLDER.findall(line):
                context = "\n".join(lines[max(0, n - 2): n + 1])
                assert "CHANGE-ME" in context, f"{path.name}:{n + 1}: {value} is not marked CHANGE-ME"
                found.add(value.replace("storageClassName: ", ""))
    assert len(found) >= 8
    for value in found:
        assert value in checklist, f"{value} is missing from cluster/README.md's checklist"


def test_job_upload_leaves_out_git_and_venv(tmp_path):
    """`ray job submit --working-dir .` zips the repository with Ray's own packaging: .git and .venv stay home."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    root = CLUSTER.parent
    target = tmp_path / "pkg.zip"
    create_package(str(root), target, include_gitignore=True)
    names = zipfile.ZipFile(target).namelist()
    assert "pyproject.toml" in names and "cluster/aws.yaml" in names
    assert not [n for n in names if n.startswith((".git/", ".venv/", "runs/"))]
