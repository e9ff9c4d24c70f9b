"""The serve/eval command surfaces: shipped configs load, --help works, flags and overrides become
configs (models.N.*), the GPU builder's config, checkpoint windows, preflight errors as one line on
stderr naming the key or URL, and `ctxforge eval` serving the tiny model itself (under its own route
prefix, beside a model already served at "/") end to end."""

from __future__ import annotations

import argparse
import json

import pytest
from ports import free_port

from ctxforge.config import ConfigError, load_config, packaged_config_names
from ctxforge.serve import command
from ctxforge.cli import main
from ctxforge.serve.config import ServeConfig, checkpoint_context_length
from ctxforge.serve.eval_config import EvalConfig

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", [n for n in packaged_config_names() if n.startswith(("eval-", "serve-"))])
def test_shipped_configs_load(name):
    model = EvalConfig if name.startswith("eval-") else ServeConfig
    cfg = load_config(model, name)
    if name == "eval-llama8b-1m":
        assert max(cfg.ruler.lengths) == 1048576 and cfg.infinitebench.enabled and len(cfg.models) == 2
    if name == "eval-tiny":
        assert cfg.models[0].model == "ctxforge:tiny" and max(cfg.ruler.lengths) <= 2048


def test_both_eval_configs_are_shipped():
    assert {"eval-tiny", "eval-llama8b-1m"} <= set(packaged_config_names())


@pytest.mark.parametrize("add", [command.add_serve_arguments, command.add_eval_arguments])
def test_help_lists_every_option(add, capsys):
    parser = argparse.ArgumentParser(prog="ctxforge x")
    add(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and ("max_model_len" in out or "ruler.lengths" in out)


def test_serve_flags_and_overrides_become_a_config():
    parser = argparse.ArgumentParser()
    command.add_serve_arguments(parser)
    cfg = command.serve_config_from_args(parser.parse_args(["--model", "/m/x", "--port", "9001", "max_model_len=4096"]))
    assert (cfg.model, cfg.port, cfg.max_model_len, cfg.host) == ("/m/x", 9001, 4096, "127.0.0.1")
    with pytest.raises(ConfigError, match="max_len"):
        command.serve_config_from_args(parser.parse_args(["max_len=3"]))


def test_bad_eval_override_names_the_key():
    with pytest.raises(ConfigError, match=r"ruler.tasks.*niah_single_9"):
        load_config(EvalConfig, "eval-tiny", ["ruler.tasks=[niah_single_9]"])
    with pytest.raises(ConfigError, match="infinitebench.data_dir is not set"):
        load_config(EvalConfig, "eval-tiny", ["infinitebench.enabled=true"])


def test_eval_config_accepts_exactly_the_task_registries(monkeypatch):
    from ctxforge.serve import infinitebench, ruler_tasks
    from ctxforge.serve.eval_config import InfiniteBenchConfig, RulerConfig

    # the defaults are the registries: RULER's 13 tasks, InfiniteBench's 12
    assert RulerConfig().tasks == list(ruler_tasks.TASKS) and len(ruler_tasks.TASKS) == 13
    assert InfiniteBenchConfig().tasks == list(infinitebench.TASK_ORDER) and len(infinitebench.TASK_ORDER) == 12
    # a task added to a registry is accepted by the config, with nothing else to edit
    monkeypatch.setitem(ruler_tasks.TASKS, "niah_extra", dict(family="niah"))
    monkeypatch.setattr(infinitebench, "TASK_ORDER", infinitebench.TASK_ORDER + ("extra_task",))
    assert RulerConfig(tasks=["niah_extra"]).tasks == ["niah_extra"]
    assert InfiniteBenchConfig(tasks=["extra_task"]).tasks == ["extra_task"]
    # negative control: a name in neither registry is refused, named
    with pytest.raises(ValueError, match=r"unknown RULER task\(s\) \['niah_typo'\]"):
        RulerConfig(tasks=["niah_single_1", "niah_typo"])
    with pytest.raises(ValueError, match=r"unknown InfiniteBench task\(s\) \['passkeys'\]"):
        InfiniteBenchConfig(tasks=["passkeys"])


def _checkpoint(tmp_path, **cfg):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return str(tmp_path)


def test_checkpoint_context_length_follows_rope_scaling(tmp_path, tiny_model_path):
    assert checkpoint_context_length(tiny_model_path) == 32768
    yarn = _checkpoint(tmp_path, max_position_embeddings=131072,
                       rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 131072})
    assert checkpoint_context_length(yarn) == 1048576
    llama3 = _checkpoint(tmp_path, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    assert checkpoint_context_length(llama3) == 131072
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint_context_length(str(tmp_path / "nope"))


def test_gpu_builder_config_is_built_without_vllm(tmp_path):
    from ctxforge.serve.app import build_llm_config

    path = _checkpoint(tmp_path, max_position_embeddings=1048576, rope_parameters={"rope_type": "default", "rope_theta": 3.58e9})
    cfg = ServeConfig(model=path, served_model_name="ctx-1m", backend="vllm", tensor_parallel_size=8,
                      accelerator_type="H100", min_replicas=1, max_replicas=4, engine_kwargs={"gpu_memory_utilization": 0.95})
    llm = build_llm_config(cfg, path)
    assert llm["model_loading_config"] == {"model_id": "ctx-1m", "model_source": path}
    assert llm["engine_kwargs"]["max_model_len"] == 1048576 and llm["engine_kwargs"]["tensor_parallel_size"] == 8
    assert llm["engine_kwargs"]["gpu_memory_utilization"] == 0.95 and llm["accelerator_type"] == "H100"
    assert llm["deployment_config"]["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in llm["deployment_config"]


def test_model_paths_and_endpoints_are_overridable_per_model():
    cfg = load_config(EvalConfig, "eval-llama8b-1m", ["models.1.model=/ckpt/run7/1M", "models.0.base_url=http://h:9/v1",
                                                      "models.0.rope.factor=4.0"])
    assert cfg.models[1].model == "/ckpt/run7/1M" and cfg.models[0].base_url == "http://h:9/v1"
    assert cfg.models[0].rope.factor == 4.0 and cfg.models[0].rope.type == "yarn"
    with pytest.raises(ConfigError, match="models.2"):
        load_config(EvalConfig, "eval-llama8b-1m", ["models.2.model=/x"])


def test_models_served_here_get_their_own_app_and_route_with_their_rope():
    from ctxforge.serve.evaluate import served_here_config

    cfg = load_config(EvalConfig, "eval-llama8b-1m")
    base = served_here_config(cfg, cfg.models[0])
    assert (base.app_name, base.route_prefix) == ("eval-llama-3.1-8b-instruct", "/eval-llama-3.1-8b-instruct")
    assert base.rope.type == "yarn" and base.max_model_len == 1048576 and base.backend == "vllm"
    trained = served_here_config(cfg, cfg.models[1])
    assert trained.route_prefix == "/eval-ctxforge-1m" and trained.rope is None
    assert base.route_prefix != "/" != trained.route_prefix


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unreachable_endpoint_is_one_line_naming_the_model_and_url(tmp_path, capsys):
    from ports import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = _run(["eval", "--config", "eval-tiny", f"output.dir={tmp_path}", f"models.0.base_url={url}"], capsys)
    line = _one_line_error(err)
    assert code == 2 and "models.0 (tiny)" in line and url in line and out == ""
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("override, key", [
    ("ruler.squad_path=/no/such/dev-v2.0.json", "ruler.squad_path"),
    ("ruler.hotpotqa_path=/no/such/hotpot.json", "ruler.hotpotqa_path"),
    ("ruler.haystack=/no/such/essays", "ruler.haystack"),
    ("infinitebench.data_dir=/no/such/ib", "infinitebench.data_dir"),
    ("longbench_chat.path=/no/such/test_cases.json", "longbench_chat.path"),
    ("models.0.model=/no/such/model", "models.0.model"),
])
def test_every_data_path_is_checked_at_preflight(override, key, tmp_path, capsys):
    extra = []
    if key.startswith("infinitebench"):
        extra = ["infinitebench.enabled=true"]
    if key.startswith("longbench_chat"):
        extra = ["longbench_chat.enabled=true", f"longbench_chat.few_shots_path={FIXTURES / 'longbench_chat' / 'few_shots.json'}",
                 "longbench_chat.judge.base_url=http://127.0.0.1:9/v1", "longbench_chat.judge.model=j"]
    code, _, err = _run(["eval", "--config", "eval-tiny", f"output.dir={tmp_path}", override, *extra], capsys)
    line = _one_line_error(err)
    assert code == 2 and key in line, line
    assert not (tmp_path / "cache.sqlite").exists()  # nothing started


def test_malformed_data_file_is_one_line_naming_the_key(tmp_path, capsys):
    bad = tmp_path / "squad.json"
    bad.write_text("{not json")
    code, _, err = _run(["eval", "--config", "eval-tiny", f"output.dir={tmp_path / 'o'}", f"ruler.squad_path={bad}"], capsys)
    assert code == 2 and "ruler.squad_path" in _one_line_error(err)


def test_an_explicitly_listed_infinitebench_task_without_its_file_is_an_error(tmp_path, capsys):
    args = ["eval", "--config", "eval-tiny", f"output.dir={tmp_path}", "infinitebench.enabled=true",
            f"infinitebench.data_dir={FIXTURES / 'infinitebench'}"]
    empty = tmp_path / "ib"
    empty.mkdir()
    (empty / "passkey.jsonl").write_text((FIXTURES / "infinitebench" / "passkey.jsonl").read_text())
    code, _, err = _run(args[:-1] + [f"infinitebench.data_dir={empty}", "infinitebench.tasks=[passkey,kv_retrieval]"], capsys)
    assert code == 2 and "infinitebench.tasks: kv_retrieval" in _one_line_error(err)


def test_serve_with_a_hub_id_and_no_hub_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = _run(["serve", "--model", "Qwen/Qwen2.5-72B-Instruct-NotHere", "backend=hf"], capsys)
    line = _one_line_error(err)
    assert code == 2 and "model" in line and "Qwen/Qwen2.5-72B-Instruct-NotHere" in line and out == ""


def test_vllm_app_config_checks_the_bearer_key_in_front_of_its_ingress(tmp_path):
    from ctxforge.serve.app import vllm_builder_config
    from ctxforge.serve.auth import key_digest

    path = _checkpoint(tmp_path, max_position_embeddings=4096)
    builder = vllm_builder_config(ServeConfig(model=path, backend="vllm", device="cuda"), path, key_digest("s3cret-Key-42"))
    assert builder["ingress_cls_config"]["ingress_cls"] == "ctxforge.serve.vllm_ingress:AuthOpenAiIngress"
    assert "s3cret-Key-42" not in json.dumps(builder)  # only the digest travels to the replicas


@pytest.mark.gpu
def test_vllm_app_builds_on_gpu_with_a_key(tiny_model_path):
    pytest.importorskip("vllm")
    from ctxforge.serve.app import build_app

    app = build_app(ServeConfig(model=tiny_model_path, backend="vllm", max_model_len=4096), api_key="k")
    assert app is not None


@pytest.mark.slow
def test_eval_serves_its_model_beside_one_already_served_at_root(ray_local, tmp_path, tiny_model_path, capsys):
    """`ctxforge serve` holds route "/" on the cluster; `ctxforge eval` serves its own model at /eval-tiny
    through the same proxy, and both answer."""
    from ray import serve

    from ctxforge.serve.app import run_app

    port = free_port()
    served = run_app(ServeConfig(model=tiny_model_path, port=port, max_model_len=1024, app_name="ctxforge"))
    parser = argparse.ArgumentParser()
    command.add_eval_arguments(parser)
    args = parser.parse_args(["--config", "eval-tiny", f"output.dir={tmp_path}", f"serve.port={port}",
                              "ruler.tasks=[niah_single_1,fwe]", "ruler.lengths=[1024,8192]", "ruler.num_samples=1"])
    try:
        assert command.run_eval(args) == 0
        import httpx
        served_id = ServeConfig(model=tiny_model_path).model_id()   # the directory's name
        assert httpx.get(served + "/models").json()["data"][0]["id"] == served_id  # still served at "/"
    finally:
        serve.shutdown()
    out = capsys.readouterr().out
    assert "tiny: RULER (2 of 13 tasks) avg" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["models"]["tiny"]["endpoint"].endswith(f":{port}/eval-tiny/v1")
    ruler = results["models"]["tiny"]["ruler"]
    assert set(ruler["per_length"]) == {"1024"}
    assert ruler["skipped_lengths"] == {"8192": "longer than the endpoint's window (4096)"}
    assert "length 8192 skipped" in (tmp_path / "report.md").read_text()
