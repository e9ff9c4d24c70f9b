"""Self-Lengthen units: the acceptance rule on hand-made texts, seeded line-dropping, the LonGen length score,
drop_short, the extension round's state machine, configs, and the long-output mix of a curriculum stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ctxforge.config import ConfigError, load_config, packaged_config_names
from ctxforge.lengthen import length_control as lc
from ctxforge.lengthen.checks import check_text, count_words, drop_short, length_stats, split_paragraphs
from ctxforge.lengthen.config import LengthenConfig
from ctxforge.lengthen.data import Extension, drop_lines, extender_messages
from ctxforge.lengthen.tasks import ExtensionTask, extension_verdict, round_verdict

CLEAN = ("The river starts in the mountains, where snow melts each spring. It runs through forests and farms. "
         "Towns grew up along its banks because the water carried boats and turned mills.")
LONGER = CLEAN + (" In the nineteenth century engineers built locks so that larger ships could pass. Trade grew, and "
                  "the river became the busiest road of the region.")
REPEATING = LONGER + " " + LONGER  # every 13-gram of LONGER occurs twice
TRUNCATED = LONGER + " After the railway arrived, the boats"


@pytest.mark.parametrize("candidate, verdict", [
    (LONGER, ""),                       # longer and clean: kept
    (CLEAN[:60] + ".", "not_longer"),   # shorter
    (REPEATING, "repetitive"),          # longer but repeats itself
    (TRUNCATED, "truncated"),           # longer but cut mid-sentence
    ("   ", "empty"),
])
def test_extension_round_acceptance_on_hand_made_texts(candidate, verdict):
    assert round_verdict(candidate, count_words(CLEAN), repeat_ngram=13, end_punctuation=True) == verdict


def test_acceptance_checks_can_be_switched_off():
    # negative controls: the same texts pass once their check is off
    assert round_verdict(REPEATING, count_words(CLEAN), repeat_ngram=0, end_punctuation=True) == ""
    assert round_verdict(TRUNCATED, count_words(CLEAN), repeat_ngram=13, end_punctuation=False) == ""


def test_extension_must_be_more_than_min_ratio_longer():
    assert extension_verdict(100, 120, 1.2) == "under_ratio"   # exactly 1.2x is not more than 1.2x
    assert extension_verdict(100, 121, 1.2) == ""
    assert extension_verdict(100, 90, 1.2) == "under_ratio"


def test_word_bounds_and_counts():
    assert check_text(LONGER, min_words=10, max_words=100) == ""
    assert check_text(LONGER, min_words=1000) == "too_short"
    assert check_text(LONGER, max_words=10) == "too_long"
    assert count_words("Hello world, 你好世界") == 2 + 4          # each CJK character is a word
    assert count_words("") == 0


def test_paragraph_split_falls_back_to_lines_then_sentences():
    assert split_paragraphs("a.\n\nb.\n\nc.") == ["a.", "b.", "c."]
    assert split_paragraphs("one\ntwo\nthree") == ["one", "two", "three"]
    assert split_paragraphs("First one. Second one! Third?") == ["First one.", "Second one!", "Third?"]


def test_line_dropping_is_seeded_and_reproducible():
    text = "\n".join(f"Line number {i}." for i in range(200))
    a, b = drop_lines(text, 0.2, "7:x"), drop_lines(text, 0.2, "7:x")
    assert a == b
    assert drop_lines(text, 0.2, "8:x") != a                      # another seed, another draw
    kept = a.split("\n\n")
    assert all(line in text.split("\n") for line in kept)        # a subset, order kept
    assert kept == sorted(kept, key=lambda s: int(s.split()[2].rstrip(".")))
    assert 200 * 0.1 < 200 - len(kept) < 200 * 0.3               # about 20% dropped
    assert drop_lines(text, 0.0, "7:x") == "\n\n".join(text.split("\n"))
    assert drop_lines("only line", 0.99, "1") == "only line"     # never an empty draft
    # another process with another hash seed draws the same lines
    code = ("from ctxforge.lengthen.data import drop_lines\n"
            f"print(drop_lines({text!r}, 0.2, '7:x'), end='')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout
    assert out == a


def test_extender_sample_prompt_holds_the_dropped_draft():
    ext = Extension("r:s0:a0", "i1", "Write about rivers.", "Para one.\nPara two.\nPara three.", LONGER, 1)
    m1, m2 = extender_messages(ext, "", 0.5, 3), extender_messages(ext, "", 0.5, 3)
    assert m1 == m2 and m1[-1] == {"role": "assistant", "content": LONGER}
    assert m1[0]["content"].startswith("Below are a writing instruction and a draft answer.")
    assert "Instruction: Write about rivers." in m1[0]["content"]


@pytest.mark.parametrize("words, lower, upper, score", [
    (800, 800, 1200, 100.0), (1200, 800, 1200, 100.0), (1000, 800, 1200, 100.0),
    (600, 800, 1200, 50.0),   # 2 * 600/800 - 1
    (400, 800, 1200, 0.0),    # half the lower bound
    (100, 800, 1200, 0.0),
    (1500, 800, 1200, 50.0),  # 3 - 2 * 1500/1200
    (1800, 800, 1200, 0.0),   # 1.5x the upper bound
    (5000, 4000, 6000, 100.0), (3000, 4000, 6000, 50.0), (7500, 4000, 6000, 50.0),
])
def test_length_score_known_cases(words, lower, upper, score):
    assert lc.length_score(words, lower, upper) == pytest.approx(score)


def test_constraint_intervals_follow_longen():
    assert lc.scored_bounds("about", 1000) == (800, 1200)
    assert lc.scored_bounds("range", 2000, 3000) == (2000, 3000)
    assert lc.scored_bounds("above", 2000) == (2000, 3000)
    assert lc.scored_bounds("below", 2000) == (1000, 2000)
    with pytest.raises(ValueError, match="range"):
        lc.scored_bounds("range", 3000, 2000)
    assert lc.constraint("about", 4000).text == "Write about 4000 words."
    assert lc.constraint("range", 3000, 5000).text == "Write between 3000 and 5000 words."


@pytest.mark.parametrize("kind", lc.TYPES)
def test_length_suffix_is_always_met_by_its_response(kind):
    for words in list(range(1, 300)) + [999, 1000, 1001, 2345, 4000, 7999, 8000]:
        c = lc.constraint_for(words, kind)
        assert c.type == kind and lc.length_score(words, c.lower, c.upper) == 100.0, (words, c)
    assert lc.constraint_for(2345, "about").n == 2000 and lc.constraint_for(2345, "range").text.endswith(
        "between 2000 and 3000 words.")


def test_drop_short_drops_the_shortest_and_is_seeded():
    lengths = list(range(1, 101))
    kept = drop_short(lengths, 0)
    assert kept == drop_short(lengths, 0) and kept != drop_short(lengths, 1)
    assert all(lengths[i] > 21 for i in kept)      # rank > 2^(-1/3): always dropped
    assert lengths.index(100) in kept
    assert drop_short([], 0) == []


def test_length_stats():
    s = length_stats(list(range(1, 11)))
    assert (s["n"], s["median"], s["p10"], s["p90"], s["max"]) == (10, 5.5, 1, 9, 10)


def _cfg(*overrides):
    return load_config(LengthenConfig, "lengthen-tiny", list(overrides))


def test_extension_round_extends_the_first_half_keeps_two_thirds_and_completes():
    cfg = _cfg("extend.rounds=1", "extend.max_tries=1", "checks.end_punctuation=true", "checks.repeat_ngram=13")
    initial = "\n\n".join(["Alpha is first.", "Beta is second.", "Gamma is third.", "Delta is fourth."])
    task = ExtensionTask(cfg, "Write about letters.", "r0", initial, attempt=0)
    former = task.next_request()
    assert "Alpha is first.\n\nBeta is second." in former.messages[-1]["content"]
    assert "Gamma" not in former.messages[-1]["content"]             # only the first half is extended
    task.feed({"text": "Alpha, the first letter, opens every list.\n\nBeta follows it closely.\n\n"
                       "A third paragraph the round throws away."})
    latter = task.next_request()
    assert latter.key.endswith(":latter") and "Delta is fourth." in latter.messages[-1]["content"]
    assert "throws away" not in latter.messages[-1]["content"]       # 2/3 of 3 paragraphs kept
    task.feed({"text": "Gamma, the third letter, names a ray of light.\n\nDelta closes the set with a river "
                       "mouth that spreads into many channels."})
    assert task.done and task.rounds_accepted == 1
    assert task.extended.startswith("Alpha, the first letter") and "throws away" not in task.extended
    assert count_words(task.extended) > 1.2 * count_words(initial)


def test_a_failed_try_starts_over_from_the_initial_response():
    cfg = _cfg("extend.rounds=1", "extend.max_tries=2", "checks.end_punctuation=true")
    task = ExtensionTask(cfg, "Write.", "r0", "One sentence here.\n\nAnother one here.", attempt=0)
    task.feed({"text": "Extended start."})
    task.feed({"text": "and it stops mid"})                  # truncated: round rejected, try fails
    assert not task.done and task.tries == 1 and task.current == task.initial
    assert task.round_reasons["truncated"] == 1 and task.try_reasons["under_ratio"] == 1
    assert task.next_request().key == "extend:a0:t1:r0:former"       # a new request, not the cached one


@pytest.mark.parametrize("name", [n for n in packaged_config_names() if n.startswith("lengthen-")])
def test_packaged_lengthen_configs_validate(name):
    cfg = load_config(LengthenConfig, name)
    assert cfg.iterations >= 1 and cfg.train.stage.sp_degree == 1


def test_lengthen_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="extend.min_ration"):
        _cfg("extend.min_ration=2")
    with pytest.raises(ConfigError, match="iterations = 2 with training needs the trained checkpoints"):
        _cfg("generator.backend=http", "generator.base_url=http://x/v1", "iterations=2")
    with pytest.raises(ConfigError, match="extend.max_tokens"):
        _cfg("generator.max_model_len=256", "extend.max_tokens=300")
    with pytest.raises(ConfigError, match="unknown constraint type"):
        _cfg("length_control.type_weights={roughly: 1}")


def test_bad_seed_file_stops_before_any_work(tmp_path):
    """The CLI in a child process, as a user runs it: `lengthen` sets up the quiet console for its whole
    process (logging bound to the streams of that moment), which in pytest's process are capture streams."""
    import subprocess
    import sys

    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Write a long essay."}\n{"prompt": "no field"}\n')
    out = subprocess.run([sys.executable, "-m", "ctxforge.cli", "lengthen", f"output.dir={tmp_path}/out",
                          f"seeds.path={bad}"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "seeds.path" in out.stderr and "line 2" in out.stderr
    assert not (tmp_path / "out").exists()


def test_long_output_mix_adds_the_configured_share(tmp_path, tiny_tokenizer):
    from ctxforge.lengthen.data import generator_messages, sample_row, write_sample_sets
    from ctxforge.models import tokenizer_hash
    from ctxforge.train.config import TrainConfig
    from ctxforge.train.loop import open_source

    tok_hash = tokenizer_hash(tiny_tokenizer)

    def rows(stage, n):
        return [sample_row(stage, f"{stage}{i}", generator_messages(
            Extension(f"e{i}", "i", f"Question {i}?", "", f"Answer {i}. " * (i + 1), 1), ""), ("i", f"e{i}"),
            tiny_tokenizer, tok_hash, 4096) for i in range(n)]

    write_sample_sets(tmp_path / "synth", {"4K": rows("4K", 6)}, 64, {})
    write_sample_sets(tmp_path / "final", {"long_output": rows("long_output", 2)}, 64, {})
    cfg = TrainConfig.model_validate({
        "model": "ctxforge:tiny", "input": {"path": str(tmp_path / "synth"), "long_output": str(tmp_path / "final")},
        "stages": [{"name": "4K", "max_seq_len": 4096, "long_output_ratio": 0.25}]})
    source = open_source(cfg, 0, tok_hash)
    samples, stats = source.read(list(range(len(source)))), source.stats
    assert stats["long_output"] == 2 and len(samples) == 8 == len(source.lengths)   # 2 of 8 = 25%
    assert [s.source for s in samples].count("long_output") == 2
    assert {s.sample_id for s in samples if s.source == "long_output"} == {r["sample_id"] for r in rows("long_output", 2)}
    # negative control: ratio 0 mixes nothing; a missing set is refused before any work
    cfg0 = cfg.model_copy(update={"stages": [cfg.stages[0].model_copy(update={"long_output_ratio": 0.0})]})
    source0 = open_source(cfg0, 0, tok_hash)
    assert all(s.source == "long" for s in source0.read(list(range(len(source0)))))
    with pytest.raises(ValueError, match="input.long_output is not set"):
        TrainConfig.model_validate({"model": "m", "input": {"path": "x"},
                                    "stages": [{"name": "a", "max_seq_len": 64, "long_output_ratio": 0.2}]})
    with pytest.raises(ValueError, match="leaves no room"):
        TrainConfig.model_validate({"model": "m", "input": {"path": "x", "short_data": "s", "long_output": "l"},
                                    "stages": [{"name": "a", "max_seq_len": 64, "short_ratio": 0.5,
                                                "long_output_ratio": 0.5}]})
    manifest = json.loads((tmp_path / "final" / "manifest.json").read_text())
    assert manifest["stages"]["long_output"]["samples_built"] == 2


def test_help_documents_every_option(capsys):
    from ctxforge.cli import build_parser
    from ctxforge.config import describe_fields

    with pytest.raises(SystemExit):
        build_parser().parse_args(["lengthen", "--help"])
    text = capsys.readouterr().out
    for key, *_ in describe_fields(LengthenConfig):
        assert key in text, key


def test_free_text_requests_go_unconstrained_through_every_backend():
    from ctxforge.generation.backends.http import HTTPEngine
    from ctxforge.generation.backends.vllm import sampling_params
    from ctxforge.generation.validation import validate_output
    from ctxforge.generation.requests import Request, request_row

    req = Request("initial_response", "d", "k", [{"role": "user", "content": "Write."}], "text", None, 64)
    row = request_row(req.finalize("m", 0.7, 0.9, "v"), 1, 0.7, 0.9)
    assert row["schema"] == ""
    assert validate_output("  Some prose.\n\nMore.  ", None) == ({"text": "Some prose.\n\nMore."}, "")
    assert validate_output("   ", None) == (None, "empty_output")
    assert validate_output("Some prose.", {"type": "object"})[1] == "invalid_json"   # structured stays strict
    udf = HTTPEngine("http://127.0.0.1:1/v1", "m", "", 1, 1.0, 0, 0.1)
    assert "response_format" not in udf._payload(row)
    assert "response_format" in udf._payload({**row, "schema": '{"type": "object"}'})
    assert "structured_outputs" not in sampling_params(row)


def test_cached_answers_are_accepted_by_the_current_checks(tmp_path):
    """The request cache keeps what the extender wrote; the acceptance checks run on every run. A run with the
    end-punctuation check off, then on over the same cache, accepts exactly what a fresh run with it on does."""
    import hashlib

    from inprocess_pool import InProcessPool

    from ctxforge.generation.cache import RequestCache
    from ctxforge.generation.scheduler import RequestScheduler
    from ctxforge.lengthen.tasks import ResponseTask, Role, drive

    def write(row: dict) -> dict:
        """Prose that depends only on the request: about half the requests end mid-sentence."""
        n = int(hashlib.sha256(row["request_id"].encode()).hexdigest()[:4], 16)
        text = " ".join(f"The ferry crossed the river at dawn on day {n + k} of the season." for k in range(6))
        return {"output_text": text if n % 2 else text.rstrip(".") + " and then the",
                "prompt_tokens": 10, "completion_tokens": 50, "error": ""}

    class WriterGeneration:
        """The Generation interface drive() uses, over an in-process engine and a real request cache."""

        def __init__(self, cache, gen):
            self.cache, self.gen = cache, gen

        def scheduler(self, prompt_hash: str = "", pass_names=(), content_check=None):
            return RequestScheduler(InProcessPool(write), self.cache, self.gen, "writer", prompt_hash, pass_names,
                                    content_check)

    def run(cache_name: str, end_punctuation: bool):
        cfg = _cfg("extend.rounds=1", "extend.max_tries=3", "responses.max_tries=3", "extend.min_ratio=0.5",
                   f"checks.end_punctuation={str(end_punctuation).lower()}", "checks.repeat_ngram=0")
        role = Role("generator", WriterGeneration(RequestCache(tmp_path / cache_name), cfg.generator), "writer")
        responses = [ResponseTask(cfg, f"i{n}", f"Write about crossing {n}.", 0) for n in range(6)]
        stats = drive(responses, role, cfg, "initial")
        kept = [r for r in responses if r.text]
        extensions = [ExtensionTask(cfg, r.instruction, r.response_id, r.text, 0) for r in kept]
        stats.merge(drive(extensions, role, cfg, "extend"))
        outcome = ([(r.response_id, r.text, r.tries, dict(r.reasons)) for r in responses],
                   [(e.extension_id, e.extended, e.tries, dict(e.round_reasons), dict(e.try_reasons)) for e in extensions])
        return outcome, stats

    fresh_off, _ = run("off.sqlite", False)
    fresh_on, _ = run("on.sqlite", True)
    assert fresh_off != fresh_on                                      # negative control: the check matters here
    assert any(reasons.get("truncated") for *_, reasons in fresh_on[0])
    off_then_on, stats = run("off.sqlite", True)
    assert off_then_on == fresh_on and stats.cache_hits > 0
    on_then_off, stats = run("off.sqlite", False)                     # everything is cached now
    assert on_then_off == fresh_off and stats.sent == 0
