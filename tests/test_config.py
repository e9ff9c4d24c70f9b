"""Config loading: every shipped YAML validates, overrides apply, errors name the file and the key."""

from __future__ import annotations

import pytest

from ctxforge.cli import build_parser, main
from ctxforge.config import ConfigError, describe_fields, load_config, packaged_config_names
from ctxforge.pipeline.config import SynthConfig


# train-*, serve-*, eval-* and lengthen-* configs are checked against their own models in those stages' tests
SYNTH_CONFIGS = [n for n in packaged_config_names() if not n.startswith(("train-", "serve-", "eval-", "lengthen-"))]


@pytest.mark.parametrize("name", SYNTH_CONFIGS)
def test_every_packaged_config_validates(name):
    cfg = load_config(SynthConfig, name)
    assert cfg.concat.stages


def test_packaged_configs_exist():
    assert {"tiny", "qwen72b-vllm", "qwen72b-http"} <= set(SYNTH_CONFIGS)


def test_dotted_overrides_apply():
    cfg = load_config(SynthConfig, "tiny", ["input.path=/data/x", "generator.concurrency=[1, 4]",
                                            "concat.stages.1.samples=7", "qa.diverse_per_document=0"])
    assert cfg.input.path == "/data/x"
    assert cfg.generator.concurrency == (1, 4)
    assert cfg.concat.stages[1].samples == 7
    assert cfg.qa.diverse_per_document == 0


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("input:\n  path: x\n  txt_field: body\n")
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, str(path))
    assert "input.txt_field" in str(err.value) and "bad.yaml" in str(err.value)


def test_unknown_override_key_is_rejected():
    with pytest.raises(ConfigError, match="generator.modle"):
        load_config(SynthConfig, "tiny", ["generator.modle=x"])


def test_target_below_chunk_size_is_rejected():
    with pytest.raises(ConfigError, match="below chunking.small_tokens"):
        load_config(SynthConfig, "tiny", ["chunking.small_tokens=8192"])


def test_http_without_base_url_is_rejected():
    with pytest.raises(ConfigError, match="base_url"):
        load_config(SynthConfig, "tiny", ["generator.backend=http"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="generator.backend"):
        load_config(SynthConfig, "tiny", ["generator.backend=tgi"])
    with pytest.raises(ConfigError, match="diverse_type_weights"):
        load_config(SynthConfig, "tiny", ["qa.diverse_type_weights={riddle: 1.0}"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(SynthConfig, "tiny", ["generator.model"])


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["synth", "--help"])
    text = capsys.readouterr().out
    keys = [row[0] for row in describe_fields(SynthConfig)]
    assert len(keys) > 50
    for key in keys:
        assert key in text, key
    for required in ("input.path", "input.text_field", "output.dir", "generator.backend", "generator.model",
                     "generator.base_url", "generator.concurrency", "chunking.small_tokens",
                     "qa.hierarchical_per_document", "qa.diverse_per_document", "concat.stages"):
        assert required in keys


def test_cli_reports_config_errors_without_traceback(capsys, tmp_path):
    code = main(["synth", "--config", "tiny", f"output.dir={tmp_path}/o", "nonsense.key=1"])
    assert code == 2
    assert "unknown key 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # stopped before any work


def test_missing_model_path_stops_before_any_work(capsys, tmp_path):
    code = main(["synth", f"output.dir={tmp_path}/o", f"generator.model={tmp_path}/no-such-model"])
    assert code == 2
    assert "generator.model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_input_stops_before_any_work(capsys, tmp_path):
    code = main(["synth", f"output.dir={tmp_path}/o", f"input.path={tmp_path}/nothing-here"])
    assert code == 2
    assert "input.path" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_key_suggests_close_matches():
    with pytest.raises(ConfigError, match=r"unknown key 'generator.modle' \(did you mean 'model'\?\)"):
        load_config(SynthConfig, "tiny", ["generator.modle=x"])
    with pytest.raises(ConfigError, match=r"concat.stages.0.sampels' \(did you mean 'samples'\?\)"):
        load_config(SynthConfig, "tiny", ["concat.stages.0.sampels=3"])
    with pytest.raises(ConfigError) as err:  # negative control: nothing close, no suggestion
        load_config(SynthConfig, "tiny", ["generator.zzzzzz=x"])
    assert "did you mean" not in str(err.value)


def test_config_of_another_stage_names_that_stage():
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, "train-tiny")
    message = str(err.value)
    assert "`ctxforge train`" in message and message.count("\n") == 0


def test_help_lists_list_items_and_the_chosen_configs_values(capsys):
    keys = [row[0] for row in describe_fields(SynthConfig)]
    assert "concat.stages.N.target_tokens" in keys
    with pytest.raises(SystemExit):
        build_parser(["synth", "--config", "tiny", "--help"]).parse_args(["synth", "--config", "tiny", "--help"])
    text = capsys.readouterr().out
    # tiny.yaml sets input.limit 4 and a second stage of 8192 tokens; the built-in defaults differ
    assert 'concat.stages.1.target_tokens  (int, value 8192)' in text
    assert 'input.limit  (' in text and 'value 4)' in text


def test_paths_expand_home_and_environment(monkeypatch):
    from ctxforge.config import expand_path

    monkeypatch.setenv("CTXFORGE_TEST_ROOT", "/data/root")
    assert expand_path("~/books") == str(__import__("pathlib").Path.home() / "books")
    assert expand_path("$CTXFORGE_TEST_ROOT/synth") == "/data/root/synth"
    assert expand_path("${CTXFORGE_TEST_ROOT}/x") == "/data/root/x"
    assert expand_path("s3://bucket/books/") == "s3://bucket/books/"
    assert expand_path("builtin:kjv") == "builtin:kjv"
    monkeypatch.delenv("CTXFORGE_TEST_UNSET", raising=False)
    with pytest.raises(ValueError, match="CTXFORGE_TEST_UNSET"):
        expand_path("$CTXFORGE_TEST_UNSET/x")


def test_deprecated_spellings_move_to_the_new_key(tmp_path, capsys):
    from typing import ClassVar

    from ctxforge.config import StrictModel

    class Output(StrictModel):
        dir: str = "out"

    class Stage(StrictModel):
        deprecated_keys: ClassVar[dict[str, str]] = {"output_dir": "output.dir"}
        output: Output = Output()

    path = tmp_path / "old.yaml"
    path.write_text("output_dir: from-yaml\n")
    assert load_config(Stage, str(path)).output.dir == "from-yaml"
    assert "'output_dir' is deprecated, use 'output.dir'" in capsys.readouterr().err
    assert load_config(Stage, str(path), ["output_dir=from-cli"]).output.dir == "from-cli"


def test_every_path_field_of_every_stage_expands_home_and_variables():
    """The whole kind: any field named path/dir/*_path/*_dir in any stage's config is a PathStr, so `~` and
    `$VAR` mean what a shell would make of them (a plain `str` field would take them literally)."""
    import importlib
    import typing

    from pydantic import BaseModel

    from ctxforge.config import STAGE_MODELS

    def models_in(annotation):
        for arg in (typing.get_args(annotation) or (annotation,)):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                yield arg
            elif typing.get_args(arg):
                yield from models_in(arg)

    plain, seen, checked = [], set(), 0
    stack = []
    for spec in STAGE_MODELS.values():
        module, name = spec.split(":")
        stack.append((name, getattr(importlib.import_module(module), name)))
    while stack:
        prefix, model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        for field_name, info in model.model_fields.items():
            stack.extend((f"{prefix}.{field_name}", m) for m in models_in(info.annotation))
            if field_name in ("path", "dir") or field_name.endswith(("_path", "_dir")):
                checked += 1
                if "expand_path" not in repr(info.annotation) + repr(info.metadata):
                    plain.append(f"{prefix}.{field_name}")
    assert checked >= 8 and not plain, plain


def test_a_validator_error_reads_as_its_message_without_pydantics_prefix():
    from ctxforge.train.config import TrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, "train-tiny", ["stages.0.sp_degree=3"])
    text = str(err.value)
    assert "stages.0: stage 4K: workers 2 is not a multiple of sp_degree 3" in text, text
    assert "Value error" not in text
    # a type error keeps pydantic's own wording, which is already the message
    with pytest.raises(ConfigError, match="stages.0.workers: Input should be a valid integer"):
        load_config(TrainConfig, "train-tiny", ["stages.0.workers=two"])
