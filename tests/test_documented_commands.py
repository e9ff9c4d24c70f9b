"""Every documented command parses and passes preflight against a fixture tree.

The commands are read from the ```bash blocks of README.md and cluster/README.md (lines that start with
`ctxforge`, or `ray job submit ... -- ctxforge`). Each goes through the real argument parser and config
loader with its overrides; then the stage's own preflight runs where it needs no Ray: synth
(pipeline.run.preflight), train (data index, model/layout checks, and the GPUs through the planner's check
and the capacity check against the launcher's training node type), plan (the whole command), serve and eval
(serve.preflight), lengthen (lengthen.loop.preflight). Paths the commands name that do not exist here
(/mnt/shared/ctxforge/..., ~/books, /data/books, /tmp/cfx/...) are mapped into a fixture tree: sample shards
per curriculum stage, a checkpoint directory, the evaluation data files. Offline stand-ins: the gated hub
student is the tiny model with Llama-3.1's RoPE and window in its config.json (its architecture comes from the
planner's table), and the
LLM judge's endpoint listing is answered locally. Nothing trains, serves or generates.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from ctxforge.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "cluster" / "README.md"]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
HUB_STUDENT = "meta-llama/Llama-3.1-8B-Instruct"
# The hub student's RoPE and window as its config.json states them: the stand-in (the tiny model's weights and
# tokenizer) carries them, so a documented RoPE override is checked against the window it is written for.
LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


_STAGE = r"ctxforge (?:synth|train|plan|serve|eval|lengthen|demo)\b"


def documented_commands() -> list[tuple[str, str]]:
    """(doc, command) for every `ctxforge ...` line of the docs' bash blocks (continuation lines joined), and the
    commands the product itself shows: the KubeRay jobs' entrypoints, the example lines in the headers of the
    shipped configs and cluster files, and what `ctxforge demo` prints for a real model."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                m = re.match(r"^\s*(?:ray job submit\b.*?-- )?(ctxforge\s.*)$", line)
                if m:
                    found.append((doc.relative_to(REPO).as_posix(), m.group(1)))
    for f in sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "cluster").rglob("*.yaml")]):
        where = f.relative_to(REPO).as_posix()
        for line in f.read_text(encoding="utf-8").splitlines():      # `#   [ray job submit ... -- ]ctxforge ...`
            m = re.match(rf"^#\s{{2,}}(?:export [^;]*;\s*)?(?:ray job submit\b.*?-- )?({_STAGE}.*?)(?:\s{{2,}}\(.*\))?$", line)
            if m:
                found.append((where, m.group(1)))
        for doc in yaml.safe_load_all(f.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                found.append((where, " ".join(doc["spec"]["entrypoint"].split())))
    from ctxforge.demo import REAL_SCALE

    found += [("ctxforge/demo.py", line.strip()) for line in REAL_SCALE.splitlines() if re.match(rf"^\s+{_STAGE}", line)]
    return found


COMMANDS = documented_commands()


def test_the_docs_document_every_stage():
    stages = {(doc, shlex.split(cmd, comments=True)[1]) for doc, cmd in COMMANDS}
    assert {s for d, s in stages if d == "README.md"} >= {"synth", "train", "plan", "serve", "eval", "lengthen"}
    assert {s for d, s in stages if d == "cluster/README.md"} >= {"synth", "train", "serve", "eval"}
    assert {s for d, s in stages if d.startswith("cluster/kuberay/rayjob")} == {"synth", "train", "eval"}
    assert {s for d, s in stages if d == "ctxforge/demo.py"} == {"synth", "plan", "train", "serve", "eval"}


# ---------------------------------------------------------------------------------------------------------
# the fixture tree
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tree(tmp_path_factory, tiny_model_path, tiny_tokenizer, smollm2_tokenizer):
    from test_train_config import _rows, _write

    root = tmp_path_factory.mktemp("docs")
    (root / "books").mkdir()
    (root / "books" / "book.jsonl").write_text(json.dumps({"text": "In the beginning. " * 50}) + "\n")
    shared = root / "mnt" / "shared" / "ctxforge"
    for synth, stages in ((shared / "synth", ["180K", "350K", "650K", "1M"]),
                          (root / "runs" / "tiny" / "synth", ["4K", "8K"]),
                          (root / "tmp" / "cfx" / "synth", ["4K"])):
        for stage in stages:
            _write(synth, stage, _rows(tiny_tokenizer, stage))
    for stage in ("2K", "4K"):                                   # the demo's synthesis: SmolLM2's tokenizer
        _write(root / "runs" / "smollm2" / "synth", stage, _rows(smollm2_tokenizer, stage))
    student = root / "hub" / "Llama-3.1-8B-Instruct"    # the hub student's stand-in: see _hub_student
    student.mkdir(parents=True)
    for f in Path(tiny_model_path).iterdir():
        if f.name != "config.json":
            (student / f.name).symlink_to(f)
    config = json.loads((Path(tiny_model_path) / "config.json").read_text())
    config.update(max_position_embeddings=131072, rope_parameters=LLAMA31_ROPE)
    (student / "config.json").write_text(json.dumps(config))
    checkpoint = shared / "train" / "llama8b-1m" / "checkpoints" / "1M"
    checkpoint.mkdir(parents=True)
    for f in Path(tiny_model_path).iterdir():
        (checkpoint / f.name).symlink_to(f)
    data = shared / "data"
    (data / "ruler").mkdir(parents=True)
    shutil.copy(FIXTURES / "ruler_squad_v2_mini.json", data / "ruler" / "dev-v2.0.json")
    shutil.copy(FIXTURES / "ruler_hotpotqa_mini.json", data / "ruler" / "hotpot_dev_distractor_v1.json")
    shutil.copytree(FIXTURES / "infinitebench", data / "InfiniteBench")
    shutil.copytree(FIXTURES / "longbench_chat", data / "LongBench-Chat")
    (data / "lmeval-tasks").mkdir()
    (data / "books").symlink_to(root / "books")
    from ctxforge.pipeline import prompts

    shutil.copy(prompts.DEFAULT_PROMPTS, root / "my-prompts.yaml")   # README: cp "$(...DEFAULT_PROMPTS)" my-prompts.yaml
    return root


def _remap(value, root: Path, hub: bool):
    """Paths of the docs -> the fixture tree (and, with `hub`, the gated hub student -> the tiny model)."""
    if isinstance(value, dict):
        return {k: _remap(v, root, hub) for k, v in value.items()}
    if isinstance(value, list):
        return [_remap(v, root, hub) for v in value]
    if not isinstance(value, str):
        return value
    for old, new in (("~/books", f"{root}/books"), ("/data/books", f"{root}/books"),
                     ("/mnt/shared/", f"{root}/mnt/shared/"), ("/tmp/cfx/", f"{root}/tmp/cfx/")):
        if value.startswith(old) or f"={old}" in value:
            value = value.replace(old, new, 1)
    if hub and value == HUB_STUDENT:
        value = str(root / "hub" / "Llama-3.1-8B-Instruct")
    return value


def _on_fixtures(cfg, root: Path, hub: bool = True):
    """The loaded config with its paths in the fixture tree (fields left unset stay unset)."""
    return type(cfg).model_validate(_remap(cfg.model_dump(mode="json", exclude_unset=True), root, hub))


def _training_node(name: str = "aws.yaml") -> dict[str, float]:
    """One node of the launcher's on-demand training type: what Ray would see (8 H100s, 192 vCPUs)."""
    node = yaml.safe_load((REPO / "cluster" / name).read_text())["available_node_types"]["train_h100"]
    return {"CPU": 192.0, "GPU": 8.0, **{k: float(v) for k, v in node["resources"].items()}}


class _Cluster:
    def __init__(self, totals):
        self._totals = totals

    def totals(self):
        return dict(self._totals)

    def node_gpus(self):
        return [self._totals.get("GPU", 0.0)]

    def request(self, bundles):
        pass


# ---------------------------------------------------------------------------------------------------------
# per stage: load with the overrides, then that stage's preflight
# ---------------------------------------------------------------------------------------------------------

def _synth(args, root):
    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.pipeline.run import preflight

    cfg = _on_fixtures(load_config(SynthConfig, args.config, args.overrides, default="tiny"), root)
    preflight(cfg)


def _train(args, root):
    from transformers import AutoConfig, LlamaConfig

    from ctxforge.config import load_config
    from ctxforge.models import load_tokenizer, resolve_model_path, tokenizer_hash
    from ctxforge.train.command import DEFAULT_TRAIN_CONFIG
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.curriculum import preflight
    from ctxforge.train.memory_plan import KNOWN_ARCHITECTURES, plan_curriculum
    from ctxforge.train.resources import check_capacity, worker_resources

    cfg = load_config(TrainConfig, args.config, args.overrides, default=DEFAULT_TRAIN_CONFIG)
    # the model and its layouts: the real architecture (the planner's table for a hub id offline)
    if cfg.model in KNOWN_ARCHITECTURES:
        a = KNOWN_ARCHITECTURES[cfg.model]
        model_config = LlamaConfig(num_hidden_layers=a["layers"], hidden_size=a["hidden"], num_attention_heads=a["heads"],
                                   num_key_value_heads=a["kv_heads"], head_dim=a["head_dim"], intermediate_size=a["ffn"],
                                   vocab_size=a["vocab"], max_position_embeddings=131072)
    else:
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model))
    cfg.validate_for(model_config)
    # the data: every stage's shards indexed from metadata, as `ctxforge train` does before any worker
    local = _on_fixtures(cfg, root)
    local.input.path = str(Path(local.input.path).absolute())
    tokenizer = load_tokenizer(resolve_model_path(local.model))
    preflight(local, tokenizer, tokenizer_hash(tokenizer))
    # the GPUs, stubbed: the planner says every stage fits the training node, and the capacity check passes
    # against one node of the launcher's training type (its custom resource included)
    use_gpu = cfg.runtime.device == "cuda"
    if use_gpu:
        rows = plan_curriculum(cfg, gpu_memory_gib=80.0, max_sp=8, gpus=8, gpus_per_node=8)
        short = [r.stage for r in rows if not r.configured_fits or r.on_gpus is None]
        if short:
            raise ValueError(f"stages {short}: their layout does not fit 80 GiB GPUs on an 8-GPU node (ctxforge plan)")
        check_capacity(cfg.stages, worker_resources(cfg.runtime, True), _Cluster(_training_node()))
    else:  # CPU: the CI machine's 2 CPUs (the local rehearsal's worker node has 2 too)
        check_capacity(cfg.stages, worker_resources(cfg.runtime, False), _Cluster({"CPU": 2.0}))


def _plan(args, root):
    from ctxforge.train.command import run_plan

    assert run_plan(args) == 0


def _serve(args, root):
    from ctxforge.serve.command import serve_config_from_args
    from ctxforge.serve.preflight import preflight_serve

    preflight_serve(_on_fixtures(serve_config_from_args(args), root))


def _eval(args, root, monkeypatch):
    from ctxforge.config import load_config
    from ctxforge.serve import lmeval, preflight as serve_preflight
    from ctxforge.serve.command import DEFAULT_EVAL_CONFIG, eval_api_keys
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.preflight import preflight_eval

    cfg = _on_fixtures(load_config(EvalConfig, args.config, args.overrides, default=DEFAULT_EVAL_CONFIG), root)
    judge = cfg.longbench_chat.judge
    monkeypatch.setenv(judge.api_key_env, "sk-fixture")
    real_check = serve_preflight.check_endpoint

    def check_endpoint(base_url, api_key, key, timeout=20.0):
        if base_url == judge.base_url:             # the hosted judge: its model listing, answered offline
            return [{"id": judge.model}]
        if "//127.0.0.1" not in base_url and "//localhost" not in base_url:   # a cluster service (the RayService)
            return [{"id": "ctxforge-1m"}]
        return real_check(base_url, api_key, key, timeout)

    def lmeval_check(c):                           # lm-eval's own registry and datasets are not here
        if c.lmeval.enabled:
            assert Path(c.lmeval.include_path).is_dir() and c.lmeval.tasks

    monkeypatch.setattr(serve_preflight, "check_endpoint", check_endpoint)
    monkeypatch.setattr(lmeval, "check", lmeval_check)
    preflight_eval(cfg, eval_api_keys(cfg))


def _lengthen(args, root):
    from ctxforge.config import load_config
    from ctxforge.lengthen.command import DEFAULT_LENGTHEN_CONFIG
    from ctxforge.lengthen.config import LengthenConfig
    from ctxforge.lengthen.loop import preflight

    preflight(_on_fixtures(load_config(LengthenConfig, args.config, args.overrides, default=DEFAULT_LENGTHEN_CONFIG), root))


def _on_the_gpu_machines_they_are_written_for(monkeypatch):
    """The documented GPU commands (device=cuda, an accelerator_type) are written for a GPU machine or a cluster
    with GPU nodes; here a GPU can appear as there. The refusal where none can has its own tests (test_devices.py)."""
    monkeypatch.setattr("ctxforge.devices.gpu_can_appear", lambda address=None: True)


@pytest.mark.parametrize("doc,command", COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_documented_command_parses_and_passes_preflight(doc, command, tree, monkeypatch, capsys):
    monkeypatch.chdir(tree)                                       # relative paths (runs/...) land in the tree
    monkeypatch.setenv("TOGETHER_API_KEY", "fixture-key")         # the README exports it before qwen72b-http
    # no endpoint is up here: synthesis's reachability check has its own tests (test_http_backend.py)
    monkeypatch.setattr("ctxforge.generation.backends.http.check_endpoint", lambda cfg: None)
    # the tree holds a few samples per stage, not a step's worth for 8 ranks: the amount check has its own test
    monkeypatch.setattr("ctxforge.train.curriculum.check_enough_data", lambda *args: None)
    _on_the_gpu_machines_they_are_written_for(monkeypatch)
    argv = [_remap(a, tree, hub=False) for a in shlex.split(command, comments=True)[1:]]
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:                                     # `--help`
        assert exc.code == 0 and "--help" in argv, (command, capsys.readouterr().err)
        return
    check = {"synth": _synth, "train": _train, "plan": _plan, "serve": _serve, "lengthen": _lengthen}.get(args.command)
    if args.command == "eval":
        _eval(args, tree, monkeypatch)
    else:
        check(args, tree)
    assert "deprecated" not in capsys.readouterr().err, command   # the docs use the current spellings


def test_a_broken_command_fails_the_check(tree, monkeypatch):
    """Negative controls: a typo in a key, a path that is not in the tree, a layout the node cannot hold."""
    from ctxforge.config import ConfigError, PreflightError
    from ctxforge.train.data import DataError
    from ctxforge.train.resources import ResourceError

    monkeypatch.chdir(tree)
    monkeypatch.setattr("ctxforge.train.curriculum.check_enough_data", lambda *args: None)  # a few samples per stage
    _on_the_gpu_machines_they_are_written_for(monkeypatch)
    parse = lambda cmd: build_parser(cmd.split()).parse_args(cmd.split())    # noqa: E731
    with pytest.raises(ConfigError, match="input.paht"):
        _synth(parse("synth --config tiny input.paht=x"), tree)
    with pytest.raises(DataError, match="no-such-synth"):
        _train(parse(f"train --config train-tiny input.path={tree}/no-such-synth"), tree)
    with pytest.raises(ResourceError, match=r"stage 1M: workers 16 .*needs GPU 16 \(> 8\)"):
        _train(parse("train --config train-llama8b-1m stages.3.workers=16"), tree)
    with pytest.raises(PreflightError, match=r"^models.0.rope.original_max_position_embeddings: 262144 is larger than "
                                             r"the checkpoint's window of 131072 positions"):   # the stand-in's window
        _eval(parse("eval --config eval-llama8b-1m models.0.rope.original_max_position_embeddings=262144"), tree,
              monkeypatch)
    with pytest.raises(PreflightError, match=r"ruler.squad_path .*no such file"):
        _eval(parse("eval --config eval-llama8b-1m ruler.squad_path=/mnt/shared/ctxforge/data/none.json"), tree,
              monkeypatch)
