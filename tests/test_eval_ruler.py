"""RULER generators and scorers: lengths, needle depths, derivable answers, determinism, published metrics."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from ctxforge.serve import ruler_metrics as rm
from ctxforge.serve.ruler_tasks import TASKS, PromptSizer, RulerSources, generate_task

FIXTURES = Path(__file__).parent / "fixtures"
SYNTHETIC = [t for t in TASKS if TASKS[t]["family"] != "qa"]


@pytest.fixture(scope="module")
def sizer(tiny_tokenizer):
    return PromptSizer(tiny_tokenizer)


@pytest.fixture(scope="module")
def sources():
    return RulerSources(squad_path=str(FIXTURES / "ruler_squad_v2_mini.json"),
                        hotpotqa_path=str(FIXTURES / "ruler_hotpotqa_mini.json"))


@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", SYNTHETIC)
def test_sample_fits_its_length_within_tolerance(task, length, sizer, sources):
    samples = generate_task(task, length, 2, seed=7, sizer=sizer, sources=sources)
    for s in samples:
        total = sizer.count(s.input, s.answer_prefix) + s.tokens_to_generate
        assert total == s.prompt_tokens + s.tokens_to_generate
        assert 0.9 * length <= total <= length, (task, length, total)


def _needle_token_depth(sample, tokenizer, value: str) -> float:
    """Where the needle holding `value` starts, in % of the context's tokens (context = text between the
    instruction and the question)."""
    text = sample.input
    start = text.index("\n") + 1
    end = text.rindex("\nWhat ")
    enc = tokenizer(text[start:end], return_offsets_mapping=True, add_special_tokens=False)
    needle_char = text.index(value, start) - start
    needle_char = text.rfind("One of the special magic", start, start + needle_char) - start
    tok = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > needle_char)
    return 100.0 * tok / len(enc["input_ids"])


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needle_is_at_its_controlled_depth(task, sizer, sources, tiny_tokenizer):
    depths = [0.0, 25.0, 50.0, 75.0, 100.0]
    samples = generate_task(task, 2048, 5, seed=1, sizer=sizer, sources=sources, depths=depths)
    for s, want in zip(samples, depths):
        assert s.depths == [pytest.approx(want, abs=2.0)]
        measured = _needle_token_depth(s, tiny_tokenizer, s.outputs[0])
        assert abs(measured - want) <= 5.0, (task, want, measured)


def test_needle_depth_check_fails_when_the_needle_is_moved(sizer, sources, tiny_tokenizer):
    s = generate_task("niah_single_2", 2048, 1, seed=1, sizer=sizer, sources=sources, depths=[25.0])[0]
    needle = re.search(r"One of the special magic numbers for \S+ is: \d+\.", s.input).group(0)
    head, _, question = s.input.rpartition("\nWhat ")
    moved = head.replace(needle + " ", "").replace(" " + needle, "") + " " + needle + "\nWhat " + question
    s.input = moved
    assert abs(_needle_token_depth(s, tiny_tokenizer, s.outputs[0]) - 25.0) > 5.0


@pytest.mark.parametrize("task", [t for t in SYNTHETIC if t.startswith("niah")])
def test_niah_answers_are_stated_by_needles_for_the_queried_keys(task, sizer, sources):
    for s in generate_task(task, 1024, 3, seed=3, sizer=sizer, sources=sources):
        keys = re.search(r"for (.+) mentioned in the provided text\?$", s.input).group(1)
        keys = [k for k in re.split(r", and |, ", keys) if k]
        stated = {v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+)\.", s.input)}
        assert stated == set(s.outputs) and len(s.outputs) == TASKS[task]["nv"] * TASKS[task]["nq"]


def test_vt_answer_is_the_chain_from_the_queried_value(sizer, sources):
    for s in generate_task("vt", 2048, 3, seed=3, sizer=sizer, sources=sources):
        main = s.input.split("\n\nMemorize and track")[-1]  # after the one-shot example
        value = re.search(r"assigned the value (\d+) in the text above\.$", main).group(1)
        assigned = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)", main))
        found = {v for v in assigned if assigned[v] == value}
        grew = True
        while grew:
            new = {v for v, src in assigned.items() if src.startswith("VAR ") and src[4:] in found}
            grew = not new <= found
            found |= new
        assert found == set(s.outputs) and len(found) == 5


def test_cwe_answer_is_the_ten_most_common_words(sizer, sources):
    for length in (1024, 4096):
        s = generate_task("cwe", length, 1, seed=3, sizer=sizer, sources=sources)[0]
        listing = s.input.rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
        counts = Counter(re.findall(r"\d+\. (\S+)", listing))
        top = [w for w, _ in counts.most_common(10)]
        assert set(top) == set(s.outputs)
        assert counts.most_common(11)[-1][1] < counts[top[-1]]  # a strict gap: the answer is unambiguous


def test_fwe_answer_is_the_three_most_frequent_coded_words(sizer, sources):
    s = generate_task("fwe", 4096, 1, seed=3, sizer=sizer, sources=sources)[0]
    coded = s.input.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    counts = Counter(w for w in coded if w != "...")
    assert [w for w, _ in counts.most_common(3)] == s.outputs


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_context_holds_the_gold_documents(task, sizer, sources):
    samples = generate_task(task, 1024, 3, seed=3, sizer=sizer, sources=sources)
    qas, docs = sources.qa(TASKS[task]["dataset"])
    for s, item in zip(samples, qas):
        assert s.outputs == item["outputs"] and item["query"] in s.input
        for gold in item["context"]:
            assert docs[gold] in s.input
        assert s.prompt_tokens + s.tokens_to_generate <= 1024


def test_qa_tasks_are_skipped_without_their_files(sizer):
    plain = RulerSources()
    assert "squad_path" in plain.skipped("qa_1") and "hotpotqa_path" in plain.skipped("qa_2")
    assert plain.skipped("niah_single_1") is None
    with pytest.raises(ValueError, match="squad_path"):
        generate_task("qa_1", 1024, 1, seed=0, sizer=sizer, sources=plain)


@pytest.mark.parametrize("task", ["niah_multikey_1", "vt", "cwe", "fwe", "niah_single_1"])
def test_generation_is_deterministic_per_seed(task, sizer, sources):
    a = generate_task(task, 1024, 2, seed=11, sizer=sizer, sources=sources)
    b = generate_task(task, 1024, 2, seed=11, sizer=sizer, sources=sources)
    c = generate_task(task, 1024, 2, seed=12, sizer=sizer, sources=sources)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert [x.input for x in a] != [x.input for x in c]
    assert a[0].input != a[1].input


def test_templates_are_rulers_and_singular_when_one_answer(sizer, sources):
    single = generate_task("niah_single_1", 1024, 1, seed=0, sizer=sizer, sources=sources)[0]
    assert single.input.startswith("A special magic number is hidden within the following text.")
    assert single.answer_prefix.startswith(" The special magic number for ") and single.answer_prefix.endswith(" is")
    multi = generate_task("niah_multivalue", 1024, 1, seed=0, sizer=sizer, sources=sources)[0]
    assert multi.input.startswith("Some special magic numbers are hidden within the following text.")
    assert "What are all the special magic numbers for" in multi.input and multi.answer_prefix.endswith(" are")
    assert single.tokens_to_generate == 128


def test_string_match_all_hand_cases():
    assert rm.string_match_all(["The numbers are 123 and 456."], [["123", "456"]]) == 100.0
    assert rm.string_match_all(["only 123"], [["123", "456"]]) == 50.0
    assert rm.string_match_all(["ABC-def"], [["abc-DEF"]]) == 100.0  # case-insensitive
    assert rm.string_match_all(["wrong answer"], [["123"]]) == 0.0   # negative control
    assert rm.string_match_all(["123", "x"], [["123"], ["456"]]) == 50.0


def test_string_match_part_hand_cases():
    assert rm.string_match_part(["It was in 1517."], [["1517", "in the year 1517"]]) == 100.0  # any gold
    assert rm.string_match_part(["no idea"], [["1517", "in 1517"]]) == 0.0
    assert rm.string_match_part(["Paris", "Rome"], [["paris"], ["Milan"]]) == 50.0


def test_postprocess_strips_and_replaces_control_characters():
    assert rm.postprocess("  12\x0034\t5 ") == "12\n34\n5"
    assert rm.score_sample("niah_single_1", "12\x0034", ["1234"]) == 0.0  # control char breaks the match, as in RULER
    assert rm.score_sample("qa_1", " Paris ", ["paris", "city of paris"]) == 100.0
    assert rm.metric_name("qa_2") == "string_match_part" and rm.metric_name("cwe") == "string_match_all"


def test_aggregate_is_unweighted_mean_over_tasks_then_lengths():
    scores = {"niah_single_1": {4096: 100.0, 8192: 80.0}, "vt": {4096: 50.0, 8192: 40.0}}
    agg = rm.aggregate(scores)
    assert agg["per_length"] == {4096: 75.0, 8192: 60.0} and agg["average"] == 67.5
    assert agg["complete"] is False and agg["label"] == "RULER (2 of 13 tasks)"
