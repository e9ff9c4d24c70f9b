"""The prompt set is a packaged, versioned YAML file the user may replace; its placeholders are checked
before a run and its hash is part of every request id."""

from __future__ import annotations

import pytest
import yaml

from ctxforge.config import PreflightError, load_config
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import RequestPlanner
from ctxforge.pipeline.prompts import DEFAULT_PROMPTS, TEMPLATES, PromptSetError, load_prompt_set, placeholders
from test_hierarchy import fill_summaries, make_doc


def write_set(tmp_path, **changes) -> str:
    data = yaml.safe_load(DEFAULT_PROMPTS.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "my-prompts.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_packaged_set_is_valid_and_has_no_placeholder_values():
    ps = load_prompt_set()
    assert ps.version and len(ps.hash) == 16 and set(ps.templates) == set(TEMPLATES)
    for name, text in ps.templates.items():
        allowed, required = TEMPLATES[name]
        assert required <= placeholders(text) <= allowed, name
        assert '"..."' not in text and "{{" not in text, name  # fields are described in words, not by example


def _request_ids(cfg: SynthConfig) -> list[str]:
    p = RequestPlanner(cfg, lambda text: len(text.split()))
    doc = make_doc(3)
    fill_summaries(p, doc)
    return [r.finalize("m", 0.7, 0.95, p.prompts.hash).request_id for r in p.small_summary_requests(doc)]


def test_a_user_prompt_file_replaces_the_set_and_changes_every_request_id(tmp_path):
    default = load_config(SynthConfig, "tiny", [])
    data = yaml.safe_load(DEFAULT_PROMPTS.read_text())
    path = write_set(tmp_path, summary_chunk=data["summary_chunk"].replace("in your own words", "briefly"))
    custom = load_config(SynthConfig, "tiny", [f"generator.prompts={path}"])
    mine = RequestPlanner(custom, len)
    assert mine.prompts.hash != load_prompt_set().hash and mine.prompts.path == path
    assert "briefly" in mine.small_summary_requests(make_doc(2))[0].messages[-1]["content"]
    assert not set(_request_ids(default)) & set(_request_ids(custom))
    # a comment-only edit changes nothing
    with open(path, "a") as fh:
        fh.write("# my note\n")
    assert load_prompt_set(path).hash == mine.prompts.hash


@pytest.mark.parametrize("change, message", [
    ({"qa_chunk": "Ask about {text} and {colour}. {rules} {self_contained}"}, "template 'qa_chunk' uses unknown placeholder(s) ['colour']"),
    ({"summary_chunk": "Summarize it."}, "template 'summary_chunk' lacks required placeholder(s) ['text']"),
    ({"judge": "Is {answer} supported by {text} for {question}? {"}, "template 'judge': "),
    ({"qa_section": "{0} {text} {rules} {self_contained}"}, "template 'qa_section': placeholder {0} is not a plain {name}"),
    ({"asked": None}, "template 'asked' is missing"),
    ({"summary_global2": "x"}, "unknown template(s) ['summary_global2']"),
    ({"diverse_instructions": {"local_specific": "Ask."}}, "'diverse_instructions' must give one text for each of"),
])
def test_bad_prompt_files_are_refused_before_any_work_naming_the_template(tmp_path, change, message):
    path = write_set(tmp_path, **change)
    with pytest.raises(PromptSetError) as err:
        load_prompt_set(path)
    assert str(err.value).startswith(f"generator.prompts {path}: ") and message in str(err.value)


def test_preflight_checks_the_prompt_file(tmp_path):
    from ctxforge.pipeline.run import preflight

    path = write_set(tmp_path, qa_chunk="{text} {rules} {self_contained} {oops}")
    with pytest.raises(PreflightError, match="generator.prompts .*qa_chunk.*oops"):
        preflight(load_config(SynthConfig, "tiny", [f"generator.prompts={path}"]))
    with pytest.raises(PreflightError, match="does not exist"):
        preflight(load_config(SynthConfig, "tiny", [f"generator.prompts={tmp_path / 'missing.yaml'}"]))
