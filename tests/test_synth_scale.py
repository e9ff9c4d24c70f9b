"""Synthesis at corpus scale: engines that load once, documents that stream, lost engines, parallel
Algorithm 2 byte-identical to the sequential one, accounting, and preflight before anything is written."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctxforge.config import PreflightError, load_config
from ctxforge.pipeline.config import ConcatConfig, StageConfig, SynthConfig
from ctxforge.generation.config import GeneratorConfig
from ctxforge.pipeline.run import synthesize

SMALL = [
    "qa.hierarchical_per_document=3", "qa.diverse_per_document=2",
    "concat.n1_hierarchical=1", "concat.n1_diverse=1", "concat.n2_earlier_diverse=1", "concat.n3_followups=1",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 2},"
    " {name: 4K, target_tokens: 4096, documents_per_sample: 2, samples: 2}]",
    "runtime.progress=false",
]


def config(out: Path, *extra: str) -> SynthConfig:
    return load_config(SynthConfig, "tiny", [f"output.dir={out}", *SMALL, *extra])


def cache_rows(out: Path) -> list[tuple]:
    db = sqlite3.connect(out / "work" / "requests.sqlite")
    rows = db.execute("SELECT request_id, pass, doc_id, attempt, output_text, finished_at FROM attempts").fetchall()
    db.close()
    return rows


def outputs(out: Path) -> dict:
    files = sorted((out / "samples").glob("*/*.parquet"))
    return {"qa": (out / "qa" / "qa.parquet").read_bytes(),
            **{str(f.relative_to(out)): f.read_bytes() for f in files}}


# ---------------------------------------------------------------------------------------------------------
# the whole stage (slow: real Ray)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_documents_stream_and_their_outputs_do_not_depend_on_the_order(ray_local, tmp_path):
    # the judge pass and repeated questions (rounds of ready requests) stream like the other passes
    fake = ["generator.backend=fake", "generator.model=fake", "generator.concurrency=1",
            "generator.engine_kwargs={latency_s: 0.02, slots: 2}", "input.limit=4", "grounding.judge=true"]
    stream, serial = tmp_path / "streaming", tmp_path / "serial"
    # a typo in the input path is caught before anything is written; the corrected command then runs
    with pytest.raises(PreflightError, match="input.path"):
        synthesize(config(stream, *fake, "input.path=/no/such/books"))
    assert not stream.exists()
    synthesize(config(stream, *fake))
    synthesize(config(serial, *fake, "runtime.documents_in_flight=1"))   # one document at a time

    def order_of_events(out: Path) -> tuple[float, float]:
        rows = cache_rows(out)
        first_qa = {}
        last_summary = {}
        for _, pass_name, doc, _, _, at in rows:
            if pass_name == "qa":
                first_qa[doc] = min(first_qa.get(doc, at), at)
            elif pass_name.startswith("summary"):
                last_summary[doc] = max(last_summary.get(doc, at), at)
        return min(first_qa.values()), max(last_summary.values())

    # streaming: some document's questions were answered before another document's summaries were done
    first_qa, last_summary = order_of_events(stream)
    assert first_qa < last_summary
    # the same requests, answers, QA table and samples whatever the order the answers came in
    assert sorted(r[:5] for r in cache_rows(stream)) == sorted(r[:5] for r in cache_rows(serial))
    assert pq.read_table(stream / "qa" / "qa.parquet").equals(pq.read_table(serial / "qa" / "qa.parquet"))
    assert outputs(stream) == outputs(serial)
    a, b = (json.loads((o / "manifest.json").read_text()) for o in (stream, serial))
    assert a["stages"] == b["stages"] and a["grounding"] == b["grounding"]
    by_pass = a["requests"]["by_pass"]
    assert by_pass["judge"]["requests"] == by_pass["judge"]["ok"] == by_pass["qa"]["ok"] + by_pass["followup"]["ok"] > 0
    assert {k: v["requests"] for k, v in by_pass.items()} == {k: v["requests"] for k, v in b["requests"]["by_pass"].items()}
    assert a["accounting"]["engines"]["loads"] == b["accounting"]["engines"]["loads"] == 1


def test_http_without_its_api_key_fails_at_preflight_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("CTXFORGE_TEST_NO_SUCH_KEY", raising=False)
    out = tmp_path / "http"
    cfg = config(out, "generator.backend=http", "generator.base_url=http://127.0.0.1:9/v1",
                 "generator.api_key_env=CTXFORGE_TEST_NO_SUCH_KEY")
    with pytest.raises(PreflightError, match=r"generator.api_key_env: \$CTXFORGE_TEST_NO_SUCH_KEY is not set"):
        synthesize(cfg)
    assert not out.exists()
    # control: an endpoint that takes no key passes this check (and then fails elsewhere: no input typo here)
    monkeypatch.setenv("CTXFORGE_TEST_NO_SUCH_KEY", "k")
    with pytest.raises(PreflightError, match="input.path"):
        synthesize(config(out, "generator.backend=http", "generator.base_url=http://127.0.0.1:9/v1",
                          "generator.api_key_env=CTXFORGE_TEST_NO_SUCH_KEY", "input.path=/no/such/books"))
    assert not out.exists()


def test_documents_per_wave_is_the_old_name_of_documents_in_flight(capsys):
    cfg = load_config(SynthConfig, "tiny", ["run.documents_per_wave=7"])
    assert cfg.runtime.documents_in_flight == 7
    assert "'run.documents_per_wave' is deprecated, use 'runtime.documents_in_flight'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "override"])
@pytest.mark.parametrize("key, value, replaced_by", [
    ("runtime.scheduler", "passes", "every request runs through the engine pool's request scheduler"),
    ("generator.batch_size", "8", "generator.requests_per_engine"),
])
def test_a_removed_key_is_one_line_naming_it_and_its_replacement(tmp_path, where, key, value, replaced_by):
    from ctxforge.config import ConfigError

    section, leaf = key.split(".")
    if where == "file":
        (tmp_path / "old.yaml").write_text(f"{section}:\n  {leaf}: {value}\n")
        spec, overrides = str(tmp_path / "old.yaml"), []
    else:
        spec, overrides = "tiny", [f"{key}={value}"]
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, spec, overrides)
    message = str(err.value)
    assert "\n" not in message and f"'{key}' was removed" in message and replaced_by in message
    # negative control: the same config without the key loads
    assert load_config(SynthConfig, "tiny", []).runtime.documents_in_flight == 64


def test_the_cli_says_a_removed_key_in_one_line():
    # a child process: the CLI configures the process's logging (quiet console), which must not outlive the
    # test inside pytest's process, bound to a captured stream that pytest closes afterwards
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "ctxforge", "synth", "--config", "tiny", "runtime.scheduler=passes"],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None) and len(err.splitlines()) == 1 and "'runtime.scheduler' was removed" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# the engine pool: a lost engine, growth and release
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_lost_engine_loses_nothing_and_the_pool_grows_and_shrinks(ray_local, tmp_path):
    import ray

    from ctxforge.generation.cache import RequestCache
    from ctxforge.generation.pool import EnginePool
    from ctxforge.generation.backends.fake import FakeBackend, fake_answer
    from ctxforge.pipeline.prompts import load_prompt_set, summary_schema
    from ctxforge.pipeline.config import LimitsConfig
    from ctxforge.generation.requests import Request
    from ctxforge.generation.scheduler import RequestScheduler

    gen = GeneratorConfig(backend="fake", model="fake", concurrency=(1, 2), num_cpus=0.25, scale_down_idle_s=0.0,
                          engine_kwargs={"latency_s": 0.2, "slots": 2})
    pool = EnginePool(FakeBackend(gen, "fake"), gen.scale_down_idle_s)
    cache = RequestCache(tmp_path / "c.sqlite")
    sched = RequestScheduler(pool, cache, gen, "fake", "p", ("summary_small",))
    schema = summary_schema(LimitsConfig())
    prompt_set = load_prompt_set()
    reqs = [Request("summary_small", f"d{i % 3}", f"k{i}", prompt_set.messages(f"Passage {i}: the miller counted sacks."),
                    "summary", schema, 64) for i in range(24)]
    answers: dict[str, dict] = {}
    sched.ask(reqs, 0, lambda req, obj: answers.__setitem__(req.key, obj))
    pool.start()
    killed = grown = False
    while sched.busy():
        sched.step(0.05)
        grown = grown or len(pool.engines) == 2
        ready = [e for e in pool.engines.values() if e.ready and e.in_flight]
        if not killed and len(answers) >= 4 and ready:
            ray.kill(ready[0].actor)   # a spot node reclaimed: the actor dies with requests in flight
            killed = True
    assert killed and grown
    assert pool.lost_engines == 1 and sched.lost_resent >= 1
    # every request answered once, with what an uninterrupted engine answers
    assert set(answers) == {r.key for r in reqs}
    for r in reqs:
        assert answers[r.key] == fake_answer(schema, r.messages[-1]["content"])
    assert cache.count() == {"requests": 24, "attempts": 24, "transport_failures": 0}  # a lost attempt replaced
    stats = sched.finish()["summary_small"]
    assert stats.ok == 24 and stats.failed == 0 and stats.sent == 24 + stats.lost_resent
    # idle engines above the minimum are released (scale_down_idle_s=0)
    pool.autoscale(0)
    assert len(pool.engines) == 1
    # free text (schema None, the long-output requests) through the same engines: unconstrained, validated
    # as {"text": ...}; a structured request of the same prompt still gets JSON
    prose = [Request("free_text", "d9", f"t{i}", prompt_set.messages(f"Write about mill {i}."), "text", None, 64)
             for i in range(2)]
    texts: dict[str, dict] = {}
    sched.ask(prose, 0, lambda req, obj: texts.__setitem__(req.key, obj))
    while sched.busy():
        sched.step(0.05)
    assert set(texts) == {"t0", "t1"}
    for r in prose:
        assert texts[r.key] == {"text": fake_answer({"type": "string"}, r.messages[-1]["content"], "text")}
    assert sched.finish()["free_text"].ok == 2
    pool.shutdown()
    records = pool.engine_records()
    assert sum(r["lost"] for r in records) == 1 and 2 <= len(records) <= pool.started  # loaded engines only
    cache.close()


# ---------------------------------------------------------------------------------------------------------
# Algorithm 2: parallel rendering == sequential, byte for byte
# ---------------------------------------------------------------------------------------------------------

def _documents_table(folder: Path, docs) -> dict:
    """The documents table layout (work/documents) holding these documents, two row groups per file."""
    from ctxforge.pipeline.docstore import DocumentStore

    folder.mkdir(parents=True)
    rows = [{"doc_id": d.doc_id, "title": d.title, "text": d.text, "source": "s", "line": i, "skip_reason": "",
             "n_tokens": d.n_tokens, "chunks": "[]", "sections": "[]"} for i, d in enumerate(docs)]
    half = len(rows) // 2
    for n, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / f"part-{n}.parquet", row_group_size=3)
    return DocumentStore.index(folder).locations


@pytest.mark.slow
def test_parallel_algorithm_2_is_byte_identical_to_sequential(ray_local, tmp_path, tiny_tokenizer, tiny_model_path):
    from test_concat import make_doc

    from ctxforge.models import tokenizer_hash
    from ctxforge.pipeline.concat import PoolDocument, plan_stage_samples
    from ctxforge.pipeline.docstore import QAWriter
    from ctxforge.pipeline.write import RenderPool, write_stage_samples

    tok, tok_hash = tiny_tokenizer, tokenizer_hash(tiny_tokenizer)
    # ordinary documents, some without QA, and some whose size is under-reported so that no QA turn fits
    docs = [make_doc(i, tok=tok, n_hier=8, n_div=8) for i in range(10)]
    docs += [make_doc(10 + i, tok=tok, n_hier=0, n_div=0) for i in range(2)]
    docs += [make_doc(12 + i, tok=tok, n_words=2500, n_tokens=50, n_hier=4, n_div=4) for i in range(3)]
    random.Random(0).shuffle(docs)
    locations = _documents_table(tmp_path / "documents", docs)
    writer = QAWriter(tmp_path / "qa.parquet", rows_per_group=20)
    for rank in reversed(range(len(docs))):   # documents finish in any order
        writer.add(rank, docs[rank].doc_id, [*docs[rank].hierarchical, *docs[rank].diverse])
    qa_index = writer.close()
    cfg = load_config(SynthConfig, "tiny", ["output.rows_per_shard=3"])
    stages = [StageConfig(name="one", target_tokens=1500, documents_per_sample=1, samples=11),
              StageConfig(name="four", target_tokens=6000, documents_per_sample=4, samples=7)]
    pool = [PoolDocument.of(d) for d in docs]
    parallel = RenderPool(2, tiny_model_path, locations, qa_index)
    seq = {}
    try:
        for stage in stages:
            seq[stage.name] = write_stage_samples(tmp_path / "seq" / stage.name, stage, docs, cfg, tok, tok_hash)
            par = parallel.write_stage(tmp_path / "par" / stage.name, stage, plan_stage_samples(stage, pool, cfg.concat), cfg,
                                       tok_hash)
            assert par == seq[stage.name]
            assert len(par["files"]) >= 2
            for name in par["files"]:
                assert (tmp_path / "par" / stage.name / name).read_bytes() == \
                    (tmp_path / "seq" / stage.name / name).read_bytes()
    finally:
        parallel.close()
    assert seq["one"]["skip_reasons"].get("no_qa_turn_fits", 0) > 0   # skipped samples were in the mix
    assert seq["four"]["samples_built"] == 7
    # negative control: another seed gives other shards, so equal bytes above were not a given
    other = cfg.model_copy(update={"concat": ConcatConfig(**{**cfg.concat.model_dump(), "seed": 5})})
    changed = write_stage_samples(tmp_path / "seed5" / "four", stages[1], docs, other, tok, tok_hash)
    assert [(tmp_path / "seed5" / "four" / f).read_bytes() for f in changed["files"]] != \
        [(tmp_path / "seq" / "four" / f).read_bytes() for f in seq["four"]["files"]]


# ---------------------------------------------------------------------------------------------------------
# accounting and projection (no Ray)
# ---------------------------------------------------------------------------------------------------------

def test_accounting_splits_generating_time_by_pass_and_prices_it():
    from ctxforge.generation.accounting import accounting
    from ctxforge.generation.stats import PassStats

    cfg = load_config(SynthConfig, "tiny", ["cost.gpu_hour_usd=2.0", "cost.prompt_usd_per_mtok=1.0"])
    passes = {"summary_small": PassStats(requests=10, sent=10, prompt_tokens=1_000_000, completion_tokens=10,
                                         request_s=30.0),
              "qa": PassStats(requests=5, sent=6, prompt_tokens=0, completion_tokens=5, request_s=10.0)}
    records = [{"alive_s": 3600.0, "load_s": 600.0, "busy_s": 2400.0, "requests": 10, "request_s": 30.0},
               {"alive_s": 1800.0, "load_s": 600.0, "busy_s": 600.0, "requests": 6, "request_s": 10.0, "lost": True}]
    acc = accounting(passes, records, 4.0, cfg.cost)
    t = acc["total"]
    assert (t["engine_alive_s"], t["engine_load_s"], t["engine_generating_s"], t["engine_idle_s"]) == (5400, 1200, 3000, 1200)
    assert t["gpu_hours"] == 6.0
    assert t["gpu_hours_loading"] + t["gpu_hours_generating"] + t["gpu_hours_idle"] == pytest.approx(6.0, abs=1e-3)
    assert t["cost_usd"] == 6.0 * 2.0 + 1.0        # GPU-hours at $2 + 1M prompt tokens at $1/M
    by = acc["by_pass"]
    assert by["summary_small"]["engine_generating_s"] == 2250 and by["qa"]["engine_generating_s"] == 750
    assert by["summary_small"]["cost_usd"] == 12.0 * 0.75 + 1.0 and by["qa"]["cost_usd"] == 12.0 * 0.25
    assert acc["engines"]["loads"] == 2 and acc["engines"]["lost"] == 1
    assert acc["engines"]["busy_fraction"] == round(3000 / 5400, 4)


def test_projection_counts_requests_from_document_sizes():
    from ctxforge.pipeline.projection import projection, projection_line

    cfg = load_config(SynthConfig, "tiny", ["cost.engine_tokens_per_s=1000", "cost.gpu_hour_usd=3",
                                            "cost.engine_load_s=360"])
    # 256-token chunks, 3 per section: 100 tokens -> 1 chunk; 1000 -> 4 chunks, 2 sections
    p = projection(cfg, [100, 1000], gpus_per_engine=4, max_engines=2)
    by = p["by_pass"]
    assert by["summary_small"]["requests"] == 5 and by["summary_section"]["requests"] == 2
    assert by["summary_global"]["requests"] == 1
    n_follow = int(5 * 0.3)
    assert by["qa"]["requests"] == 2 * (5 - n_follow + 4) and by["followup"]["requests"] == 2 * n_follow
    tokens = p["prompt_tokens"] + p["completion_tokens"]
    assert p["gpu_hours"] == round((tokens / 1000 + 2 * 360) * 4 / 3600, 2)
    assert "GPU-hours" in projection_line(p)
    assert "engine_tokens_per_s" in projection_line(projection(load_config(SynthConfig, "tiny", []), [100], 1, 1))
    assert "engine_tokens_per_s" not in projection_line(projection(load_config(SynthConfig, "tiny", []), [100], 0, 1))


@pytest.mark.slow
def test_an_engine_that_cannot_load_stops_the_run_with_its_reason(ray_local):
    from ctxforge.generation.pool import EngineFailureError, EnginePool
    from ctxforge.generation.backends.base import EngineFactory
    from ctxforge.generation.backends.fake import FakeBackend

    class Broken(FakeBackend):
        def engine_factory(self):   # time.sleep(-1) raises in the engine's constructor, like a model that won't load
            return EngineFactory("ctxforge.generation.backends.fake:FakeEngine", {"load_s": -1.0})

    gen = GeneratorConfig(backend="fake", num_cpus=0.25)
    pool = EnginePool(Broken(gen, "fake"), max_failures_in_a_row=gen.max_engine_failures_in_a_row)
    pool.start()
    with pytest.raises(EngineFailureError, match=r"4 engines in a row failed to load or died with no request completed; "
                                                 r"last error: ValueError: .*non-negative; engine arguments: .*load_s"):
        for _ in range(200):
            pool.autoscale(1)
            pool.poll(0.5)
    assert not pool.engines and pool.started == pool.load_failures == gen.max_engine_failures_in_a_row
