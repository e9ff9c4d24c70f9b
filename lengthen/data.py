"""Training sets of the Self-Lengthen loop in the sample contract (ctxforge.schema), written like synthesis output.

- Generator SFT: instruction -> extended response.
- Extender SFT: extend prompt over the initial response with some lines dropped (seeded per sample) ->
  extended response (the published mk_data.py drops each line with probability 0.2).
- Long-output set (after the last iteration): instruction + a word-count suffix derived from the response
  (about / between / at least / at most, seeded) -> extended response; this is what a curriculum stage
  mixes in (train: input.long_output + stages.N.long_output_ratio).

A set folder holds samples/<name>/part-*.parquet and a manifest.json whose `stages` lists the shards,
which is what `ctxforge train` reads. Loss on the answer only (pipeline.render); samples longer than the
training stage's max_seq_len are dropped and counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ctxforge.lengthen import length_control, prompts
from ctxforge.pipeline.render import render_conversation
from ctxforge.schema import SAMPLE_SCHEMA


@dataclass
class Extension:
    """An accepted extension: the pair both roles are trained on."""

    extension_id: str
    instruction_id: str
    instruction: str
    initial: str
    extended: str
    iteration: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def drop_lines(text: str, fraction: float, seed: str) -> str:
    """`text` with each non-blank line dropped with probability `fraction` (at least one line is kept), joined
    by blank lines. Seeded by `seed` alone, so a sample's prompt is the same in every run and process."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return ""
    rng = random.Random(f"line_drop:{seed}")
    kept = [line for line in lines if rng.random() >= fraction]
    return "\n\n".join(kept or [lines[rng.randrange(len(lines))]])


def _system(system_prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}] if system_prompt else []


def generator_messages(ext: Extension, system_prompt: str, query: str | None = None) -> list[dict]:
    return _system(system_prompt) + [{"role": "user", "content": query or ext.instruction},
                                     {"role": "assistant", "content": ext.extended}]


def extender_messages(ext: Extension, system_prompt: str, line_drop: float, seed: int) -> list[dict]:
    draft = drop_lines(ext.initial, line_drop, f"{seed}:{ext.extension_id}")
    return _system(system_prompt) + [{"role": "user", "content": prompts.extend_prompt(ext.instruction, draft)},
                                     {"role": "assistant", "content": ext.extended}]


def with_length_suffix(ext: Extension, probability: float, weights: dict[str, float], seed: int) -> tuple[str, dict]:
    """(query, constraint dict or {}) for the long-output set: the instruction plus, with `probability`, a
    constraint of a sampled type that the response meets."""
    from ctxforge.lengthen.checks import count_words

    rng = random.Random(f"length_control:{seed}:{ext.extension_id}")
    if rng.random() >= probability:
        return ext.instruction, {}
    c = length_control.constraint_for(count_words(ext.extended), length_control.pick_type(weights, rng))
    return f"{ext.instruction} {c.text}", c.to_dict()


def sample_row(stage: str, sample_key: str, messages: list[dict], lineage: tuple[str, str], tokenizer,
               tok_hash: str, max_seq_len: int) -> dict | None:
    """One row of SAMPLE_SCHEMA, or None when it is longer than max_seq_len."""
    ids, mask = render_conversation(messages, tokenizer)
    if len(ids) > max_seq_len:
        return None
    instruction_id, extension_id = lineage
    return {"sample_id": hashlib.sha256(f"{stage}:{sample_key}".encode()).hexdigest()[:16], "stage": stage,
            "target_tokens": max_seq_len, "num_tokens": len(ids), "num_loss_tokens": int(sum(mask)),
            "input_ids": ids, "loss_mask": mask, "messages": messages, "documents": [instruction_id], "chunks": [],
            "qa_ids": [extension_id], "num_questions": 1, "ungrounded_questions": 0, "tokenizer_hash": tok_hash}


def write_sample_sets(folder: Path, sets: dict[str, list[dict]], rows_per_shard: int, extra: dict) -> dict:
    """Write samples/<name>/part-*.parquet per set and manifest.json (atomically: a temp folder renamed into
    place). Returns the manifest, whose `content_hash` changes whenever any sample does."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    digest = hashlib.sha256()
    stages = {}
    for name, rows in sets.items():
        out = tmp / "samples" / name
        out.mkdir(parents=True)
        files = []
        for n, start in enumerate(range(0, len(rows), rows_per_shard)):
            files.append(f"part-{n:05d}.parquet")
            pq.write_table(pa.Table.from_pylist(rows[start:start + rows_per_shard], schema=SAMPLE_SCHEMA),
                           out / files[-1])
        for row in rows:
            digest.update(f"{name}:{row['sample_id']}:{row['input_ids']}:{row['loss_mask']}".encode())
        stages[name] = {"files": files, "samples_built": len(rows),
                        "tokens": sum(r["num_tokens"] for r in rows),
                        "loss_tokens": sum(r["num_loss_tokens"] for r in rows)}
    manifest = {**extra, "stages": stages, "content_hash": digest.hexdigest()[:16]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return manifest


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Atomic JSONL write (a step's human-readable output)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
