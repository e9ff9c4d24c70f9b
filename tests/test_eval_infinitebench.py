"""InfiniteBench: loading our fixture files (InfiniteBench's JSONL format), prompts, truncation, scorers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxforge.serve import infinitebench as ib

DATA = Path(__file__).parent / "fixtures" / "infinitebench"


@pytest.mark.parametrize("task", ib.TASK_ORDER)
def test_every_task_loads_builds_its_prompt_and_scores_its_gold_as_correct(task):
    examples = ib.load_task(DATA / f"{task}.jsonl", task)
    assert examples and all(isinstance(ex["answer"], list) for ex in examples)
    for ex in examples:
        prompt = ib.build_prompt(task, ex)
        assert ex["context"][:50] in prompt
        gold = ib.gold(task, ex)
        perfect = {"longbook_choice_eng": lambda: gold[1], "code_debug": lambda: f"{gold[1]}. {gold[0]}"}.get(
            task, lambda: str(gold[0]))()
        assert ib.score(task, perfect, ex) == pytest.approx(100.0), (task, perfect)
        assert ib.score(task, "I do not know.", ex) == 0.0, task  # negative control


def test_limit_and_validation_errors_name_the_file_and_line(tmp_path):
    assert len(ib.load_task(DATA / "passkey.jsonl", "passkey", limit=1)) == 1
    bad = tmp_path / "longbook_choice_eng.jsonl"
    bad.write_text(json.dumps({"context": "c", "input": "q", "answer": ["x"], "options": ["x", "y"]}) + "\n")
    with pytest.raises(ValueError, match=r"longbook_choice_eng.jsonl:1: .*options"):
        ib.load_task(bad, "longbook_choice_eng")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r":1: not JSON"):
        ib.load_task(bad, "longbook_choice_eng")


def test_prompts_are_infinitebench_chat_templates():
    ex = ib.load_task(DATA / "longbook_choice_eng.jsonl", "longbook_choice_eng")[0]
    p = ib.build_prompt("longbook_choice_eng", ex)
    assert p.startswith("Read the book and answer the question.\n\n") and p.endswith("D. The map")
    run = ib.load_task(DATA / "code_run.jsonl", "code_run")[0]
    assert "return value of func_3(-4). Be concise." in ib.build_prompt("code_run", run)
    find = ib.load_task(DATA / "math_find.jsonl", "math_find")[1]
    assert ib.build_prompt("math_find", find).startswith("What is the smallest number in the following list?\n\n")


def test_middle_truncation_keeps_head_and_tail(tiny_tokenizer):
    prompt = "START " + "filler " * 2000 + "QUESTION END"
    out = ib.truncate_middle(prompt, tiny_tokenizer, 200)
    assert out.startswith("START") and out.endswith("QUESTION END")
    assert len(tiny_tokenizer.encode(out, add_special_tokens=False)) <= 202
    assert ib.truncate_middle("short", tiny_tokenizer, 200) == "short"
    budget = ib.prompt_budget(tiny_tokenizer, 4096, 40)
    assert 4096 - 40 - 40 < budget < 4096 - 40
    assert ib.generation_tokens("math_calc", 4096) == 2048 and ib.generation_tokens("passkey", 4096) == 6


@pytest.mark.parametrize("task, pred, ex, want", [
    ("passkey", "The pass key is 71432.", {"answer": ["71432"]}, 100),
    ("passkey", "71 432", {"answer": ["71432"]}, 0),                      # first run of digits only
    ("kv_retrieval", 'The value is "abc-v1".', {"answer": ["abc-v1"]}, 100),
    ("kv_retrieval", "abc-v10", {"answer": ["abc-v1"]}, 0),               # whole token, not substring
    ("longbook_choice_eng", "The answer is: B", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 100),
    ("longbook_choice_eng", "y", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 100),
    ("longbook_choice_eng", "C", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 0),
    ("code_debug", "The correct option is: B", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 100),
    ("code_debug", "answer: f", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 100),
    ("code_debug", "A.", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 0),
    ("longdialogue_qa_eng", "It is Ilse.", {"answer": ["ILSE"]}, 100),
    ("longbook_qa_eng", "The bell", {"answer": ["the ship's bell"]}, pytest.approx(100 * 2 * (1 * 0.5) / 1.5)),
    ("longbook_qa_chn", "船钟。", {"answer": ["船钟"]}, 100),
    ("math_find", "The largest is 997", {"answer": [997]}, 100),
    ("math_find", "88.5", {"answer": [88]}, 0),                           # a wrong number is wrong (not int(88.5))
    ("math_find", "3.7", {"answer": [3]}, 0),
    ("math_find", "It is 88.", {"answer": [88]}, 100),
    ("math_find", "88.0", {"answer": [88]}, 100),                         # the same number
    # the last stand-alone letter answers (upstream's fixed rule); "AB" is not a letter
    ("longbook_choice_eng", "I think AB or B", {"answer": ["Walking Georgie"], "options": ["x", "Walking Georgie", "z", "w"]}, 100),
    ("longbook_choice_eng", "Not A. It is B", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 100),
    ("longbook_choice_eng", "It is A", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 0),
    ("longbook_choice_eng", "B\nThe others (A, C) are wrong", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 100),
    ("longbook_choice_eng", "The answer is: y", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 100),
    ("longbook_choice_eng", "", {"answer": ["y"], "options": ["x", "y", "z", "w"]}, 0),
    ("code_debug", "I would pick B", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 100),
    ("code_debug", "f has the bug", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 100),
    ("code_debug", "I would pick C", {"answer": ["f"], "options": ["e", "f", "g", "h"]}, 0),
    # dialogue: multi-word names, alternative golds, any case (0 under the earlier word-split rule)
    ("longdialogue_qa_eng", "Stamp Paid", {"answer": ["STAMP PAID"]}, 100),
    ("longdialogue_qa_eng", "Bill Ecker", {"answer": ["COMMANDER BILL ECKER", "ECKER"]}, 100),
    ("longdialogue_qa_eng", "Commander Bill Ecker.", {"answer": ["Commander Bill Ecker"]}, 100),
    ("longdialogue_qa_eng", "Ilse", {"answer": ["Ilse"]}, 100),
    ("longdialogue_qa_eng", "ADRIAN", {"answer": ["ADRIAN"]}, 100),
    ("longdialogue_qa_eng", "Stamp", {"answer": ["STAMP PAID"]}, 0),         # part of a name is not the name
    ("longdialogue_qa_eng", "Oren", {"answer": ["COMMANDER BILL ECKER", "ECKER"]}, 0),
    ("longdialogue_qa_eng", "Oren", {"answer": ["", "ILSE"]}, 0),           # an empty gold matches nothing
    ("longbook_choice_eng", "I think B", {"answer": ["Walking Georgie"], "options": ["x", "Walking Georgie", "z", "w"]}, 100),
    ("math_find", "3.5", {"answer": [3.5]}, 100),
    ("math_calc", "[5, 9, 2, 7]", {"answer": [[5, 9, 3, 7]]}, 50),       # leading run of correct values
    ("code_run", "The return value is -1", {"answer": [-1]}, 100),
    ("code_run", "-1 is the value", {"answer": [-1]}, 0),                 # the last word counts
    ("code_run", "so it returns 15", {"answer": [15]}, 100),
])
def test_scorers_on_hand_made_cases(task, pred, ex, want):
    assert ib.score(task, pred, dict(ex, id=0, context="", input="")) == want


def test_rouge_lsum_partial_overlap_is_between_zero_and_hundred():
    ex = {"answer": ["the captain counted the barrels twice"], "id": 0}
    s = ib.score("longbook_sum_eng", "the captain counted barrels", ex)
    assert 0 < s < 100


def test_results_and_report_name_the_scoring_rule_of_each_task():
    from ctxforge.serve import report
    from ctxforge.serve.client import Record
    from ctxforge.serve.eval_infinitebench import summarize

    recs = [Record("a", {"task": "longdialogue_qa_eng"}, "Stamp Paid", 100.0),
            Record("b", {"task": "passkey"}, "1", 0.0)]
    out: dict = {}
    summarize(recs, out)
    assert out["tasks"]["longdialogue_qa_eng"]["rule"] == ib.SCORING_RULE["longdialogue_qa_eng"]
    assert set(ib.SCORING_RULE) == set(ib.TASK_ORDER)
    md = "\n".join(report.infinitebench_markdown({"models": {"m": {"infinitebench": out}}}))
    assert f"- longdialogue_qa_eng: {ib.SCORING_RULE['longdialogue_qa_eng']}" in md
    assert "- longbook_choice_eng:" not in md  # a task not run lists no rule
