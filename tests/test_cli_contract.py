"""The CLI's contract with its user, stage by stage: one spelling of the shared keys (old spellings still load,
with a notice naming old and new key), `--help` showing the chosen config's values, and every error on stderr
as one line naming the key, file or URL. Fast: configs are loaded and validated, no stage runs.
"""

from __future__ import annotations

import os
import re
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
           ("train", "train-tiny", "input.dir", "input.path", "/tmp/renamed-synth"),
           ("synth", "tiny", "run.progress", "runtime.progress", False),
           ("synth", "tiny", "run.documents_per_wave", "runtime.documents_in_flight", 7),
           ("lengthen", "lengthen-tiny", "run.num_cpus", "runtime.num_cpus", 1)]


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


def test_synth_and_lengthen_run_section_is_now_runtime(tmp_path, capsys):
    from ctxforge.lengthen.config import LengthenConfig
    from ctxforge.pipeline.config import SynthConfig

    for model, name in ((SynthConfig, "tiny"), (LengthenConfig, "lengthen-tiny")):
        data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        data["run"] = data.pop("runtime")
        (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
        assert load_config(model, str(tmp_path / "old.yaml")).model_dump() == load_config(model, name).model_dump()
        assert "old.yaml: 'run' is deprecated, use 'runtime'" in capsys.readouterr().err
    # a section renamed twice over (run.documents_per_wave) merges with what the file already says under runtime
    (tmp_path / "mixed.yaml").write_text("run: {documents_per_wave: 7, progress: false}\nruntime: {num_cpus: 2}\n")
    rt = load_config(SynthConfig, str(tmp_path / "mixed.yaml")).runtime
    assert (rt.documents_in_flight, rt.progress, rt.num_cpus) == (7, False, 2)
    (tmp_path / "clash.yaml").write_text("run: {num_cpus: 1}\nruntime: {num_cpus: 2}\n")
    with pytest.raises(ConfigError, match=r"both 'run.num_cpus' \(deprecated\) and 'runtime.num_cpus' are set"):
        load_config(SynthConfig, str(tmp_path / "clash.yaml"))


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


# ---------------------------------------------------------------------------------------------------------
# every error: stderr, one line, naming the key, file or URL
# ---------------------------------------------------------------------------------------------------------

_LOG = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(argv, capsys) -> str:
    """Run the CLI; it must exit 2 with nothing on stdout and exactly one error line on stderr."""
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not _LOG.match(line)]
    assert code == 2 and "Traceback" not in err, (code, out, err)
    assert len(lines) == 1, err
    # stdout carries nothing of the error (the demo announces its first stage there before the error)
    # the demo checks every stage's config before it prints; an input found missing at synthesis preflight
    # comes after its heading
    assert out == "" or (argv[0] == "demo" and "== 1/3 synthesize" in out and lines[0] not in out), out
    return lines[0]


ERRORS = [
    (["train", "--config", "train-tiny", "runtime.num_cpu=2"], ["ctxforge train: ", "runtime.num_cpu", "num_cpus"]),
    (["train", "--config", "no-such-config"], ["ctxforge train: ", "'no-such-config'"]),
    (["plan", "--config", "train-tiny", "model=nobody/no-such-model"], ["ctxforge plan: model: ", "'nobody/no-such-model'"]),
    (["plan", "--config", "train-tiny", "stages.0.workerz=2"], ["ctxforge plan: ", "stages.0.workerz"]),
    (["serve", "--model", "nobody/no-such-model"], ["ctxforge serve: model: ", "'nobody/no-such-model'"]),
    (["serve", "--config", "serve-tiny", "max_model_lenn=4"], ["ctxforge serve: ", "max_model_lenn"]),
    (["eval", "--config", "eval-tiny", "ruler.lenghts=[1024]"], ["ctxforge eval: ", "ruler.lenghts", "lengths"]),
    (["eval", "--config", "eval-tiny", "models.0.model=/no/such/model"], ["ctxforge eval: models.0.model", "/no/such/model"]),
    (["lengthen", "--config", "lengthen-tiny", "seeds.path=/no/such/seeds.jsonl"], ["ctxforge lengthen: seeds.path", "/no/such/seeds.jsonl"]),
    (["lengthen", "--config", "lengthen-tiny", "iterationz=1"], ["ctxforge lengthen: ", "iterationz"]),
    (["demo", "input.path=/no/such/books"], ["ctxforge demo: ", "/no/such/books"]),
    (["demo", "generator.modle=x"], ["ctxforge demo: ", "generator.modle"]),
]


@pytest.mark.parametrize("argv,names", ERRORS, ids=[" ".join(e[0][:1] + e[0][-1:]) for e in ERRORS])
def test_each_error_is_one_line_on_stderr_naming_what_to_fix(argv, names, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)              # the demo writes under ./runs: nothing must be written at all here
    line = _error_line(argv, capsys)
    assert line.startswith(names[0]) and all(n in line for n in names[1:]), line
    assert not (tmp_path / "runs").exists()


def test_unreachable_eval_endpoint_names_the_model_and_url(capsys, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    line = _error_line(["eval", "--config", "eval-tiny", f"output.dir={tmp_path}", f"models.0.base_url={url}"], capsys)
    assert line.startswith("ctxforge eval: models.0 (tiny): ") and url in line


def test_model_never_writes_over_a_file_or_a_foreign_directory(tmp_path, capsys):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me\n")
    line = _error_line(["model", "tiny", str(precious)], capsys)
    assert line.startswith(f"ctxforge model tiny: {precious}: exists and is not a directory")
    assert precious.read_text() == "keep me\n"
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("keep me too\n")
    line = _error_line(["model", "smollm2", str(folder), "--overwrite"], capsys)
    assert line.startswith(f"ctxforge model smollm2: {folder}: a directory ctxforge did not write (it holds thesis.tex)")
    assert (folder / "thesis.tex").read_text() == "keep me too\n" and sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("argv", [["train", "--config", "train-tiny", "input.paht=x"],
                                  ["plan", "--config", "train-tiny", "--gpus", "0"]])
def test_train_and_plan_errors_reach_stderr_of_the_process(argv):
    """The real process (logging set up by the CLI itself): stdout stays empty, stderr is the one line."""
    proc = subprocess.run([sys.executable, "-m", "ctxforge", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not _LOG.match(line)]
    assert proc.returncode == 2 and proc.stdout == "" and len(lines) == 1, (proc.stdout, proc.stderr)
    assert lines[0].startswith(f"ctxforge {argv[0]}: ")


@pytest.mark.parametrize("config", ["nosuch", "train-tiny"])
def test_help_with_a_config_that_does_not_load_says_so(config, capsys):
    from ctxforge.cli import build_parser

    argv = ["synth", "--config", config, "--help"]
    with pytest.raises(SystemExit) as exc:
        build_parser(argv).parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 0 and "built-in defaults" in err and config in err, err
    argv = ["synth", "--config", "tiny", "--help"]                 # negative control: a good config, no notice
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    assert "built-in defaults" not in capsys.readouterr().err


def test_ctrl_c_is_one_line_saying_the_run_resumes(monkeypatch, capsys):
    import argparse

    from ctxforge import cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_run_synth", interrupted)
    args = argparse.Namespace(command="synth", verbose=False, config=None, overrides=[])
    assert cli._dispatch(args) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err and "run the same command again to resume" in err


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_an_error_in_a_packaged_config_names_a_file_that_exists(cwd, tmp_path, monkeypatch):
    """The label of a packaged config is the file itself (configs/tiny.yaml in a checkout), not the package
    name, which is no folder a user can open."""
    from ctxforge.config import resolve_config_path

    monkeypatch.chdir(REPO if cwd == "repo" else tmp_path)
    label, text = resolve_config_path("tiny")
    assert Path(label).is_file() and Path(label).read_text(encoding="utf-8") == text
    if cwd == "repo":
        assert label == "configs/tiny.yaml"
    with pytest.raises(ConfigError, match=re.escape(label)):
        load_config(_models()["synth"], "tiny", ["generator.modle=x"])
