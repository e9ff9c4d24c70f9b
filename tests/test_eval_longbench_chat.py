"""LongBench-Chat without a server: the judge's reply parsing on hand-made replies, the judge prompt
(1-10 scale, the question's rated examples, the reference), and the published data format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxforge.serve.longbench_chat import judge_prompt, load_cases, parse_rating, rating_schema

DATA = Path(__file__).parent / "fixtures" / "longbench_chat"


@pytest.mark.parametrize("reply, want", [
    ("The answer matches the reference closely. Rating: [[9]]", 9.0),
    ("[[3]] at first, but after a second look: [[7]]", 7.0),          # the last [[...]] counts
    ("Rating: [[8.5]]", 8.5),
    ("[[Rating: 6/10]]", 6.0),                                          # the first number inside
    ("[[10]]", 10.0),
    ("I would give it 7 out of 10.", None),                            # no brackets: no rating
    ("[[0]]", None),                                                    # outside 1..10
    ("[[11]]", None),
    ("[[excellent]]", None),
    ("", None),
])
def test_text_replies(reply, want):
    assert parse_rating(reply) == want


@pytest.mark.parametrize("reply, want", [
    ('{"analysis": "right place, right cargo", "rating": 9}', 9.0),
    ('{"analysis": "x", "rating": 12}', None),
    ('{"analysis": "x"}', None),
    ('{"analysis": "x", "rating": 5', None),                           # cut off by max_tokens
    ('[[7]]', None),                                                    # text format when JSON was asked for
])
def test_structured_replies(reply, want):
    assert parse_rating(reply, structured=True) == want


def test_prompt_has_scale_reference_and_the_questions_rated_examples():
    case = load_cases(str(DATA / "test_cases.json"), str(DATA / "few_shots.json"))[1]
    prompt = judge_prompt(case["query"], case["answer"], case["few_shots"], "Twelve trees.")
    assert "from 1 (worst) to 10 (best)" in prompt and "[[6]]" in prompt
    assert case["query"] in prompt and "Seventeen, along the north wall." in prompt
    for shot in case["few_shots"]:
        assert f"{shot['answer']}\n[End of answer]\nGrade: [[{shot['score']}]]" in prompt
    assert prompt.rstrip().endswith("Twelve trees.\n[End of answer]")
    assert "JSON object" in judge_prompt("q", "r", [], "a", structured=True)
    assert rating_schema(40)["properties"]["rating"]["enum"] == list(range(1, 11))


def test_published_format_loads_and_bad_files_name_the_key(tmp_path):
    cases = load_cases(str(DATA / "test_cases.json"), str(DATA / "few_shots.json"))
    assert [c["idx"] for c in cases] == [1, 2, 3] and all(len(c["few_shots"]) == 3 for c in cases)
    jsonl = tmp_path / "cases.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in json.loads((DATA / "test_cases.json").read_text())))
    assert len(load_cases(str(jsonl), str(DATA / "few_shots.json"), limit=2)) == 2
    jsonl.write_text('{"idx": 1, "query": "q"}\n')
    with pytest.raises(ValueError, match=r"longbench_chat.path .*question 1 lacks prompt, answer"):
        load_cases(str(jsonl), str(DATA / "few_shots.json"))
    short = tmp_path / "few.json"
    short.write_text(json.dumps([[{"answer": "a", "score": 5}]]))
    with pytest.raises(ValueError, match=r"longbench_chat.few_shots_path .*idx 2"):
        load_cases(str(DATA / "test_cases.json"), str(short))
