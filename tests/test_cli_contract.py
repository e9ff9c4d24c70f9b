"""The CLI's contract with its user, stage by stage: one spelling of the shared keys (old spellings still load,
with a notice naming old and new key), `--help` showing the chosen config's values, and every error on stderr
as one line naming the key, file or URL. Fast: configs are loaded and validated, no stage runs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctxforge.cli import main
from ctxforge.config import ConfigError, load_config, packaged_config_names

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _models():
    from ctxforge.lengthen.config import LengthenConfig
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.serve.config import ServeConfig
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.train.config import TrainConfig

    return {"synth": SynthConfig, "train": TrainConfig, "serve": ServeConfig, "eval": EvalConfig,
            "lengthen": LengthenConfig}


def stage_of(name: str) -> str:
    """The subcommand a packaged config is for (by its name's prefix; synthesis configs have none)."""
    for prefix in ("train", "serve", "eval", "lengthen"):
        if name.startswith(prefix + "-"):
            return prefix
    return "synth"


def _dotted(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------------------------------------------------
# one spelling of the shared keys: output.dir, input.path, runtime.*
# ---------------------------------------------------------------------------------------------------------

RENAMED = [("eval", "eval-tiny", "output_dir", "output.dir", "/tmp/renamed-eval"),
           ("eval", "eval-tiny", "ray_num_cpus", "runtime.num_cpus", 1),
           ("train", "train-tiny", "input.dir", "input.path", "/tmp/renamed-synth")]


@pytest.mark.parametrize("stage,config,old,new,value", RENAMED)
def test_old_spelling_on_the_command_line_loads_with_a_notice(stage, config, old, new, value, capsys):
    cfg = load_config(_models()[stage], config, [f"{old}={value}"])
    assert _dotted(cfg, new) == value
    err = capsys.readouterr().err
    assert f"'{old}' is deprecated, use '{new}'" in err and err.count("\n") == 1


def test_old_spellings_in_a_yaml_file_load_like_the_new_ones(tmp_path, capsys):
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.train.config import TrainConfig

    data = yaml.safe_load((CONFIGS / "eval-tiny.yaml").read_text())
    data["output_dir"] = data.pop("output")["dir"]
    data["ray_num_cpus"] = data.pop("runtime")["num_cpus"]
    (tmp_path / "old-eval.yaml").write_text(yaml.safe_dump(data))
    old = load_config(EvalConfig, str(tmp_path / "old-eval.yaml"))
    assert old.model_dump() == load_config(EvalConfig, "eval-tiny").model_dump()

    data = yaml.safe_load((CONFIGS / "train-tiny.yaml").read_text())
    data["input"]["dir"] = data["input"].pop("path")
    (tmp_path / "old-train.yaml").write_text(yaml.safe_dump(data))
    old = load_config(TrainConfig, str(tmp_path / "old-train.yaml"))
    assert old.model_dump() == load_config(TrainConfig, "train-tiny").model_dump()
    err = capsys.readouterr().err
    for o, n in (("output_dir", "output.dir"), ("ray_num_cpus", "runtime.num_cpus"), ("input.dir", "input.path")):
        assert f"old-{'train' if o == 'input.dir' else 'eval'}.yaml: '{o}' is deprecated, use '{n}'" in err


def test_old_and_new_spelling_together_is_an_error(tmp_path):
    from ctxforge.train.config import TrainConfig

    data = yaml.safe_load((CONFIGS / "train-tiny.yaml").read_text())
    data["input"]["dir"] = "/somewhere/else"
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"both.yaml: both 'input.dir' \(deprecated\) and 'input.path' are set"):
        load_config(TrainConfig, str(tmp_path / "both.yaml"))


def test_no_shipped_config_uses_an_old_spelling(capsys):
    for name in packaged_config_names():
        load_config(_models()[stage_of(name)], name)
        assert "deprecated" not in capsys.readouterr().err, name


def test_train_fingerprint_survives_the_rename():
    """A run started before `input.dir` became `input.path` resumes: the stage fingerprint (what run.json and
    stage_complete.json compare) is the one computed before the rename for the same config."""
    from ctxforge.train.config import TrainConfig

    cfg = load_config(TrainConfig, "train-tiny", ["input.path=/data/synth"])
    assert [cfg.stage_fingerprint(i) for i in range(len(cfg.stages))] == FINGERPRINTS_BEFORE_RENAME
    # negative control: the input does enter the fingerprint
    other = load_config(TrainConfig, "train-tiny", ["input.path=/data/other"])
    assert other.stage_fingerprint(0) != FINGERPRINTS_BEFORE_RENAME[0]


# train-tiny with input.dir=/data/synth, computed by the code before the rename
FINGERPRINTS_BEFORE_RENAME = ["505691d73adf6a08", "723c99c78e0bc292"]


# ---------------------------------------------------------------------------------------------------------
# --help shows the chosen config's values, for every stage
# ---------------------------------------------------------------------------------------------------------

HELP = [
    (["train", "--config", "train-llama8b-1m"], ['runtime.resources  (dict[str, float], value {"ctxforge_train": 1.0})',
                                                  'stages.3.name  (str, value "1M")']),
    (["plan", "--config", "train-llama8b-1m"], ["stages.3.sp_degree  (int, value 8)"]),
    (["serve", "--config", "serve-llama8b-1m"], ["tensor_parallel_size  (int, value 8)"]),
    (["eval", "--config", "eval-llama8b-1m"],
     ['models.1.model  (str, value "/mnt/shared/ctxforge/train/llama8b-1m/checkpoints/1M")',
      'output.dir  (str, value "/mnt/shared/ctxforge/eval/llama8b-1m")']),
    (["lengthen", "--config", "lengthen-smollm2"], ['generator.model  (str, value "ctxforge:smollm2")']),
    (["synth", "--config", "qwen72b-vllm"], ['generator.resources  (dict[str, float], value {"ctxforge_generate": 1.0})']),
]


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv,shown", HELP, ids=[h[0][0] for h in HELP])
def test_help_shows_the_chosen_configs_values(argv, shown, capsys):
    out = _help(argv, capsys)
    assert f"values shown are those of {argv[2]}\n" in out
    for line in shown:
        assert line in out, line


def test_help_applies_the_overrides_and_otherwise_shows_the_default_config(capsys):
    out = _help(["train", "--config", "train-llama8b-1m", "input.path=/elsewhere"], capsys)
    assert 'input.path  (str, value "/elsewhere")' in out
    assert "deprecated spellings (still accepted, with a notice): input.dir -> input.path" in out
    out = _help(["train"], capsys)                       # no --config: the default config, train-tiny
    assert "values shown are those of train-tiny\n" in out and 'stages.0.name  (str, value "4K")' in out
    out = _help(["serve"], capsys)                       # serve has no default file: the built-in defaults
    assert "values shown" not in out and "tensor_parallel_size  (int, default 1)" in out
