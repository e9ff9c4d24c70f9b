"""The serve/eval command surfaces: shipped configs load, --help works, flags become configs, the GPU
builder's config, checkpoint windows, and `ctxforge eval` serving the tiny model itself end to end."""

from __future__ import annotations

import argparse
import json

import pytest
from ports import free_port

from ctxforge.config import ConfigError, load_config, packaged_config_names
from ctxforge.serve import command
from ctxforge.serve.config import EvalConfig, ServeConfig, checkpoint_context_length


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
    with pytest.raises(ConfigError, match="unknown key 'max_len'"):
        command.serve_config_from_args(parser.parse_args(["max_len=3"]))


def test_bad_eval_override_names_the_key():
    with pytest.raises(ConfigError, match=r"ruler.tasks.*niah_single_9"):
        load_config(EvalConfig, "eval-tiny", ["ruler.tasks=[niah_single_9]"])
    with pytest.raises(ConfigError, match="infinitebench.data_dir is not set"):
        load_config(EvalConfig, "eval-tiny", ["infinitebench.enabled=true"])


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


def test_vllm_backend_refuses_an_api_key_it_cannot_check(tmp_path):
    from ctxforge.serve.app import build_vllm_app

    path = _checkpoint(tmp_path, max_position_embeddings=4096)
    with pytest.raises(ValueError, match=r"CTXFORGE_API_KEY.*cannot check it"):
        build_vllm_app(ServeConfig(model=path, backend="vllm"), path, api_key="k")


@pytest.mark.gpu
def test_vllm_app_builds_on_gpu(tiny_model_path):
    pytest.importorskip("vllm")
    from ctxforge.serve.app import build_app

    app = build_app(ServeConfig(model=tiny_model_path, backend="vllm", max_model_len=4096))
    assert app is not None


@pytest.mark.slow
def test_eval_command_serves_the_tiny_model_itself(ray_local, tmp_path, capsys):
    from ray import serve

    port = free_port()
    parser = argparse.ArgumentParser()
    command.add_eval_arguments(parser)
    args = parser.parse_args(["--config", "eval-tiny", f"output_dir={tmp_path}", f"serve.port={port}",
                              "ruler.tasks=[niah_single_1,fwe]", "ruler.lengths=[1024,8192]", "ruler.num_samples=1"])
    try:
        assert command.run_eval(args) == 0
    finally:
        serve.shutdown()
    out = capsys.readouterr().out
    assert "tiny: RULER (2 of 13 tasks) avg" in out
    results = json.loads((tmp_path / "results.json").read_text())
    ruler = results["models"]["tiny"]["ruler"]
    assert set(ruler["per_length"]) == {"1024"}
    assert ruler["skipped_lengths"] == {"8192": "longer than the endpoint's window (4096)"}
    assert "length 8192 skipped" in (tmp_path / "report.md").read_text()
