"""Every stage on SmolLM2-135M-Instruct, a real instruct model (Llama architecture, 9 query / 3 KV heads, a
ChatML template without generation markers), on CPU: synthesis with it as generator and target, its loss
mask, its curriculum on Ray Train (SP 3 = SP 1; the loss decreases), and its serving + RULER evaluation.

The corpus is synthesized once per session (conftest.smollm2_corpus); the two training runs are shared by
the tests of this module. Tests that run a stage are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ports import free_port

# Real-model stages on a shared 2-core machine: the corpus fixture alone can take longer than the suite's default
pytestmark = pytest.mark.timeout(2400)



def _sample_rows(out: Path, stage: str) -> list[dict]:
    rows = []
    for f in sorted((out / "samples" / stage).glob("*.parquet")):
        rows.extend(pq.read_table(f).to_pylist())
    return rows


def _masked_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    runs, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


# ---------------------------------------------------------------------------------------------------
# synthesis


@pytest.mark.slow
def test_smollm2_synthesis_writes_valid_partly_grounded_qa(smollm2_corpus):
    import sqlite3

    import jsonschema

    from ctxforge.pipeline.config import LimitsConfig
    from ctxforge.generation.validation import validate_output
    from ctxforge.pipeline.prompts import qa_schema, summary_schema

    manifest = json.loads((smollm2_corpus / "manifest.json").read_text())
    assert manifest["tokenizer"]["spec"] == "ctxforge:smollm2" and manifest["generator"]["backend"] == "hf"
    limits = LimitsConfig(**manifest["config"]["limits"])
    db = sqlite3.connect(smollm2_corpus / "work" / "requests.sqlite")
    rows = db.execute("SELECT pass, output_text, error FROM attempts").fetchall()
    db.close()
    # the content checks fail some of a 135M model's answers (truncated, unsupported, hidden references...),
    # each with its reason; most of the stage's requests still give usable answers
    total = manifest["requests"]["total"]
    assert all(manifest["failures_by_reason"]) and sum(manifest["failures_by_reason"].values()) == total["failed"]
    assert 3 * total["ok"] >= total["ok"] + total["failed"], manifest["failures_by_reason"]
    # the cache holds raw outputs; those that match their request's schema are the candidates the checks judged
    ok = []
    for pass_name, text, error in rows:
        schema = summary_schema(limits) if pass_name.startswith("summary") else qa_schema(limits)
        obj = None if error else validate_output(text, schema)[0]
        if obj is not None:
            jsonschema.validate(obj, schema)
            ok.append((pass_name, obj))
    assert {p for p, _ in ok} >= {"summary_small", "qa"}

    qa = [r for r in pq.read_table(smollm2_corpus / "qa" / "qa.parquet").to_pylist() if r["kind"] != "summary"]
    grounding = manifest["grounding"]["overall"]
    print(f"\nSmolLM2 on Obadiah: {grounding['grounded']} of {grounding['total']} QA grounded ({grounding['rate']:.0%}); "
          f"{total['ok']} of {total['ok'] + total['failed']} requests ok")
    duplicates = manifest["qa"]["dropped"].get("duplicate_question", 0)  # policy flag: only duplicates are dropped
    assert len(qa) == grounding["total"] - duplicates >= 3
    assert sum(r["grounded"] for r in qa) <= grounding["grounded"]  # SmolLM2 rarely quotes verbatim: often 0
    # a grounded quote is text the generator was shown: the book, or (for global and section questions) the
    # summaries it wrote (normalized, fuzzy >= 90, as the stage checks it); an invented quote is neither
    from ctxforge.pipeline.grounding import ground_quote

    shown = [_document_text()] + [obj["summary"] for p, obj in ok if p.startswith("summary")]
    for r in qa:
        if r["grounded"]:
            assert ground_quote(r["evidence_quote"], shown, 90.0, 12)[0], r["evidence_quote"]
    assert not ground_quote("Jonah sailed to Tarshish in a great ship of gold and silver.", shown, 90.0, 12)[0]


def _document_text() -> str:
    from ctxforge.models import default_cache_dir
    from ctxforge.pipeline.read import materialize_kjv

    books = materialize_kjv(default_cache_dir()).read_text().splitlines()
    book = next(json.loads(line) for line in books if "obadiah" in json.loads(line)["id"])
    return book["text"]


# ---------------------------------------------------------------------------------------------------
# loss mask with SmolLM2's template (no {% generation %} markers, like Llama-3.1's)

CONVERSATION = [
    {"role": "system", "content": "You answer questions about the document."},
    {"role": "user", "content": "The vision of Obadiah. Thus saith the Lord GOD concerning Edom.\n\nWho had the vision?"},
    {"role": "assistant", "content": "Obadiah had the vision, about Edom."},
    {"role": "user", "content": "Which nation is it about?"},
    {"role": "assistant", "content": "Edom\n(the land of Esau)."},
]


def test_smollm2_loss_mask_is_exactly_the_answers_and_their_im_end(smollm2_tokenizer):
    from ctxforge.pipeline.render import assistant_mask_from_template, render_conversation

    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, mask = render_conversation(CONVERSATION, tok)
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [tok(a, add_special_tokens=False)["input_ids"] + [im_end] for a in answers]
    assert _masked_runs(ids, mask) == expected
    # every <|im_end|> closing a system or user turn, and the "\n" after each answer's, stay out of the loss
    ends = [i for i, t in enumerate(ids) if t == im_end]
    assert len(ends) == len(CONVERSATION) and [mask[i] for i in ends] == [0, 0, 1, 0, 1]
    assert all(mask[i + 1] == 0 for i in ends if i + 1 < len(ids))
    # negative control: transformers' own assistant mask needs generation markers, which SmolLM2 lacks
    with pytest.raises(ValueError, match="generation"):
        assistant_mask_from_template(CONVERSATION, tok)


@pytest.mark.slow
def test_smollm2_synthesized_sample_masks_its_answers(smollm2_corpus, smollm2_tokenizer):
    tok = smollm2_tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    rows = _sample_rows(smollm2_corpus, "2K")
    assert rows
    for row in rows:
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert len(answers) >= 2
        expected = [tok(a, add_special_tokens=False)["input_ids"] + [im_end] for a in answers]
        assert _masked_runs(row["input_ids"], row["loss_mask"]) == expected
        assert row["num_tokens"] == len(row["input_ids"]) <= 2048


# ---------------------------------------------------------------------------------------------------
# training: the curriculum code on a Llama-architecture model with 9 query / 3 KV heads

STAGE = ("[{{name: 2K, data_stage: 2K, max_seq_len: 2048, rope: {{theta: 200000}}, lr: 1.0e-4, schedule: constant, "
         "max_steps: 3, workers: {workers}, sp_degree: {sp}, batching: pack, loss_weighting: sample}}]")


def _train_config(corpus: Path, out: Path, workers: int, sp: int):
    from ctxforge.config import load_config
    from ctxforge.train.config import TrainConfig

    cpus = 0.6 if workers > 1 else 2  # three workers share the 2 CPUs; a single one gets both (2 torch threads)
    return load_config(TrainConfig, "train-smollm2", [
        f"input.path={corpus}", f"output.dir={out}", "runtime.progress=false", "runtime.max_failures=0",
        f"runtime.cpus_per_worker={cpus}", f"stages={STAGE.format(workers=workers, sp=sp)}"])


@pytest.fixture(scope="module")
def smollm2_runs(smollm2_corpus, ray_local, tmp_path_factory):
    """The same 3-step stage on the corpus's one sample (the same pack every step): SP 1 on one worker, then
    Ulysses SP 3 on three gloo workers of 0.6 CPU each (3 query heads and 1 KV head per rank)."""
    from ctxforge.train.curriculum import run_curriculum

    runs = {}
    for name, workers, sp in (("sp1", 1, 1), ("sp3", 3, 3)):
        out = tmp_path_factory.mktemp(f"smollm2-{name}")
        report = run_curriculum(_train_config(smollm2_corpus, out, workers, sp), label=name, log=lambda *_: None)
        rows = [json.loads(line) for line in (out / "metrics" / "2K.jsonl").read_text().splitlines()]
        runs[name] = {"report": report, "losses": [r["loss"] for r in rows], "rows": rows,
                      "checkpoint": Path(report.stages["2K"]["checkpoint"])}
    return runs


@pytest.mark.slow
def test_smollm2_sp3_equals_sp1_on_the_same_batch(smollm2_runs, smollm2_path):
    from safetensors import safe_open

    sp1, sp3 = smollm2_runs["sp1"], smollm2_runs["sp3"]
    assert [r["step"] for r in sp3["rows"]] == [1, 2, 3] and sp3["rows"][0]["samples"] == 1
    print(f"\nlosses SP 1: {sp1['losses']}\nlosses SP 3: {sp3['losses']}")
    assert sp3["losses"][0] == pytest.approx(sp1["losses"][0], rel=1e-5)  # the same forward on the same pack
    assert sp3["losses"] == pytest.approx(sp1["losses"], rel=1e-3)        # and the same updates after it
    # the trained weights: SP 3's update equals SP 1's (Adam's first steps are ~lr x sign(g), so a few weights
    # whose gradient is rounding noise may differ; the norms of the updates must agree)
    diff = update = 0.0
    with safe_open(str(Path(smollm2_path) / "model.safetensors"), "pt") as base, \
            safe_open(str(sp1["checkpoint"] / "model.safetensors"), "pt") as a, \
            safe_open(str(sp3["checkpoint"] / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            w0, w1, w3 = base.get_tensor(key), a.get_tensor(key), b.get_tensor(key)
            update += float((w1 - w0).double().norm() ** 2)
            diff += float((w3 - w1).double().norm() ** 2)
    assert update > 0 and (diff / update) ** 0.5 < 0.02
    config = json.loads((sp3["checkpoint"] / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 200000.0 and config["num_key_value_heads"] == 3


@pytest.mark.slow
def test_smollm2_loss_decreases_over_a_few_steps(smollm2_runs):
    losses = smollm2_runs["sp1"]["losses"]
    assert len(losses) == 3 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_shipped_smollm2_configs_fit_smollm2(smollm2_path):
    from transformers import AutoConfig

    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig
    from ctxforge.train.config import TrainConfig

    train = load_config(TrainConfig, "train-smollm2")
    train.validate_for(AutoConfig.from_pretrained(smollm2_path), available_workers=3)
    assert [s.sp_degree for s in train.stages] == [1, 3] and train.model == "ctxforge:smollm2"
    synth = load_config(SynthConfig, "smollm2")
    assert synth.generator.model == synth.target.tokenizer == train.model
    assert {s.name for s in synth.concat.stages} == {s.data_stage for s in train.stages}


def test_smollm2_refuses_sp2_with_the_arithmetic(smollm2_path, tmp_path):
    from transformers import AutoConfig

    from ctxforge.train.sequence_parallel import SequenceParallelError

    cfg = _train_config(tmp_path, tmp_path / "out", 2, 2)
    with pytest.raises(SequenceParallelError, match=r"sp_degree 2 does not divide the 9 query heads \(9 % 2 = 1\); "
                                                    r"valid SP degrees for this model: 1, 3, 9"):
        cfg.validate_for(AutoConfig.from_pretrained(smollm2_path))
    _train_config(tmp_path, tmp_path / "out", 3, 3).validate_for(AutoConfig.from_pretrained(smollm2_path))


# ---------------------------------------------------------------------------------------------------
# serving + evaluation


@pytest.fixture(scope="module")
def smollm2_endpoint(smollm2_path, tmp_path_factory):
    """`ctxforge serve --model ctxforge:smollm2` in its own process (its own local Ray), stopped by SIGTERM."""
    import httpx

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("CTXFORGE_API_KEY", None)
    cmd = [sys.executable, "-m", "ctxforge", "serve", "--model", "ctxforge:smollm2", "--port", str(port),
           "max_model_len=4096", "num_cpus=1"]
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"  # a file, not a pipe nobody drains
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 900
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ctxforge serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("ctxforge serve did not answer /v1/models within 900 s")
            time.sleep(2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()


@pytest.mark.slow
def test_smollm2_served_scores_on_ruler_niah(smollm2_endpoint, tmp_path):
    from ctxforge.config import load_config
    from ctxforge.serve.eval_config import EvalConfig
    from ctxforge.serve.evaluate import evaluate

    models = json.dumps([{"name": "base", "model": "ctxforge:smollm2", "base_url": smollm2_endpoint}])
    cfg = load_config(EvalConfig, "eval-smollm2", [f"output.dir={tmp_path}", f"models={models}",
                                                   "ruler.tasks=[niah_single_1]", "ruler.num_samples=3"])
    results = evaluate(cfg, config_label="eval-smollm2")
    base = results["models"]["base"]
    assert base["model_id"] == "smollm2" and base["max_model_len"] == 4096
    assert base["requests"]["errors"] == 0 and base["requests"]["total"] == 6
    scores = {n: v["score"] for n, v in base["ruler"]["tasks"]["niah_single_1"].items()}
    print(f"\nSmolLM2 base, RULER niah_single_1 (3 samples per length): {scores}")
    assert max(scores.values()) > 0, scores
    predictions = [json.loads(line) for line in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 6 and any(p["prediction"].strip() for p in predictions)
