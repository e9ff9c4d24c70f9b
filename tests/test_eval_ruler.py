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


def test_vt_is_rulers_text(sizer, sources, tiny_tokenizer):
    """NVIDIA's variable_tracking.py: noise lines joined by one newline; the one-shot example (3-letter
    variables) sized to the most noise lines that fit 500 tokens, its answer after "they are: " + " "."""
    from ctxforge.serve.ruler_data import NOISE
    from ctxforge.serve.ruler_tasks import VT_PREFIX, VT_TEMPLATE

    s = generate_task("vt", 2048, 2, seed=3, sizer=sizer, sources=sources)[0]
    example, main = s.input.split("\n\nMemorize and track", 1)
    main_context = main.split("in the following text.\n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    assert "\n\n" not in main_context and main_context.startswith(("The grass", "VAR "))
    assert main_context.count(NOISE + "\n") >= 10
    ex_input, _, ex_answer = example.rpartition("they are: ")
    assert ex_answer.startswith(" ") and not ex_answer.startswith("  ")  # "they are: " + " " + names
    names = ex_answer.split()
    assert len(names) == 5 and all(len(n) == 3 and n.isupper() for n in names)
    assert all(len(n) == 5 for n in s.outputs)
    ex_input += "they are: "
    ex_context = ex_input.split("in the following text.\n\n", 1)[1].rsplit("\nQuestion:", 1)[0]
    assert "\n\n" not in ex_context and "12345" not in example  # the value is randomized per sample
    from ctxforge.serve.ruler_tasks import vt_icl_example

    count = lambda text: len(tiny_tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    base = vt_icl_example(TASKS["vt"], 3, count)  # before randomization: value 12345, as RULER sizes it
    base_input = base.rpartition("they are: ")[0] + "they are: "
    assert "12345" in base and count(base_input) <= 500 < count(base_input.replace(NOISE, NOISE + "\n" + NOISE, 1))
    assert base.count(NOISE) == example.count(NOISE) >= 10
    assert ex_input.startswith(VT_TEMPLATE.split("{context}")[0]) and VT_PREFIX.split("{num_v}")[0] in ex_input
    # every sample shares the example's shape (same noise lines) with its own names and value
    s2 = generate_task("vt", 2048, 2, seed=3, sizer=sizer, sources=sources)[1]
    example2 = s2.input.split("\n\nMemorize and track", 1)[0]
    assert example2.count(NOISE) == example.count(NOISE) and example2 != example


def test_a_failed_request_scores_zero_and_is_counted():
    """3 samples scored 100 and one failed: 75 (RULER's protocol), with the failure shown; a task whose every
    request failed at a length still counts in that length's mean, and the label counts tasks scored."""
    from ctxforge.serve.client import Record
    from ctxforge.serve.eval_ruler import summarize

    def rec(task, length, score, error=None):
        return Record("k", {"task": task, "length": length, "depths": []}, None if error else "x",
                      None if error else score, error=error)

    records = [rec("vt", 1024, 100.0) for _ in range(3)] + [rec("vt", 1024, None, "HTTP 500")]
    records += [rec("cwe", 1024, 50.0), rec("cwe", 2048, None, "timeout"), rec("vt", 2048, 100.0)]
    out: dict = {}
    summarize(records, out)
    assert out["tasks"]["vt"]["1024"] == {"n": 4, "errors": 1, "score": 75.0, "metric": "string_match_all"}
    assert out["tasks"]["cwe"]["2048"]["score"] == 0.0 and out["tasks"]["cwe"]["2048"]["errors"] == 1
    assert out["per_length"] == {"1024": 62.5, "2048": 50.0} and out["tasks_per_length"] == {"1024": 2, "2048": 2}
    assert out["label"] == "RULER (2 of 13 tasks)" and out["errors"] == 2


def test_a_length_with_fewer_tasks_scored_says_so():
    agg = rm.aggregate({"vt": {4096: 80.0, 8192: 60.0}, "cwe": {4096: 40.0}})
    assert agg["per_length"] == {4096: 60.0, 8192: 60.0} and agg["tasks_per_length"] == {4096: 2, 8192: 1}
    assert agg["label"] == "RULER (2 of 13 tasks; 8192: 1 tasks)" and agg["complete"] is False


def test_report_prints_scores_with_two_decimals_and_failures():
    from ctxforge.serve.report import ruler_markdown

    model = {"endpoint": "e", "model_id": "m", "max_model_len": 4096, "label": "zero-shot RoPE yarn x8 to 1048576",
             "ruler": {"label": "RULER (1 of 13 tasks)", "per_length": {"4096": 66.666666}, "tasks_per_length": {"4096": 1},
                       "average": 66.666666, "tasks": {"vt": {"4096": {"n": 3, "errors": 1, "score": 66.666666}}}}}
    md = "\n".join(ruler_markdown({"models": {"base": model}, "references": []}))
    assert "66.67" in md and "66.666" not in md and "66.67 (1 failed)" in md
    assert "base [zero-shot RoPE yarn x8 to 1048576] (RULER (1 of 13 tasks))" in md
