"""Read + chunk on Ray Data into `work/documents/` (Parquet), then select the documents to process.

The table has one row per input record: kept documents with their chunk bounds, and skipped
records with their reason. It is rebuilt only when the input listing, the chunking settings or the
tokenizer change (a fingerprint file), and is written to a temporary folder that replaces the old
one in one rename, so a crash never leaves a half-written table behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from ctxforge.models import load_tokenizer
from ctxforge.pipeline.chunking import chunk_document
from ctxforge.pipeline.config import SynthConfig
from ctxforge.pipeline.hierarchy import DocState
from ctxforge.pipeline.read import BUILTIN_KJV, list_input_files, materialize_kjv, read_documents
from ctxforge.pipeline.records import Chunk, Section

READ_KEYS = ("doc_id", "title", "text", "source", "line", "skip_reason", "stripped", "read_as")
COLUMNS = READ_KEYS + ("n_tokens", "chunks", "sections")
# the table's layout and the reader's rules: a table built by an older reader is rebuilt, never reused
TABLE_VERSION = 2


def _chunk_batch(batch: dict, tokenizer_path: str, chunking: dict, max_document_tokens: int) -> dict:
    tokenizer = load_tokenizer(tokenizer_path)
    out = {k: [] for k in COLUMNS}
    for i in range(len(batch["doc_id"])):
        row = {k: batch[k][i] for k in READ_KEYS}
        row.update(n_tokens=0, chunks="[]", sections="[]")
        if not row["skip_reason"]:
            chunks, sections, n_tokens = chunk_document(
                row["doc_id"], row["text"], tokenizer, chunking["small_tokens"], chunking["smalls_per_medium"],
                chunking["boundary_window"])
            row["n_tokens"] = n_tokens
            if n_tokens < chunking["min_document_tokens"]:
                row["skip_reason"] = "too_short"
            elif n_tokens < chunking["small_tokens"] and not chunking["allow_short_documents"]:
                row["skip_reason"] = "shorter_than_chunk"
            elif max_document_tokens and n_tokens > max_document_tokens:
                row["skip_reason"] = "too_long"
            else:
                # offsets only: chunk text is text[char_start:char_end], stored once
                row["chunks"] = json.dumps([{k: v for k, v in asdict(c).items() if k != "text"} for c in chunks])
                row["sections"] = json.dumps([asdict(s) for s in sections])
        if row["skip_reason"]:
            row["text"] = ""
        for k in COLUMNS:
            out[k].append(row[k])
    return {k: np.array(v, dtype=np.int64 if k in ("line", "n_tokens") else object) for k, v in out.items()}


def _fingerprint(cfg: SynthConfig, tokenizer_hash: str, cache_dir: str) -> str:
    path = str(materialize_kjv(cache_dir)) if cfg.input.path == BUILTIN_KJV else cfg.input.path
    listing = []
    for kind, files in list_input_files(path, cfg.input.format).items():
        for f in files:
            try:
                st = os.stat(f)
                listing.append((kind, f, st.st_size, int(st.st_mtime)))
            except OSError:  # object-store URIs: the listing itself is the fingerprint
                listing.append((kind, f))
    payload = {"version": TABLE_VERSION, "input": cfg.input.model_dump(exclude={"limit"}),
               "chunking": cfg.chunking.model_dump(),
               "tokenizer": tokenizer_hash, "files": listing}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def build_documents_table(cfg: SynthConfig, tokenizer_path: str, tokenizer_hash: str, work: Path,
                          cache_dir: str) -> tuple[Path, bool]:
    """Returns (table dir, reused)."""
    table = work / "documents"
    fp = _fingerprint(cfg, tokenizer_hash, cache_dir)
    marker = table / "_fingerprint"
    if marker.is_file() and marker.read_text() == fp:
        return table, True
    tmp = work / "documents.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    ds = read_documents(cfg.input, cache_dir)
    ds = ds.map_batches(_chunk_batch, batch_size=16, batch_format="numpy", num_cpus=0.5,
                        fn_kwargs={"tokenizer_path": tokenizer_path, "chunking": cfg.chunking.model_dump(),
                                   "max_document_tokens": cfg.input.max_document_tokens})
    ds.write_parquet(str(tmp))
    (tmp / "_fingerprint").write_text(fp)
    shutil.rmtree(table, ignore_errors=True)
    os.replace(tmp, table)
    return table, False


def select_documents(table: Path, limit: int) -> tuple[list[dict], Counter, int]:
    """(kept document metadata in input order, skipped counts by reason, records read)."""
    meta = pads.dataset(str(table), format="parquet").to_table(
        columns=["doc_id", "title", "source", "line", "skip_reason", "n_tokens"]).to_pylist()
    meta.sort(key=lambda r: (r["source"], r["line"]))  # input order, whatever order Ray wrote the blocks in
    skipped: Counter = Counter()
    kept, seen = [], set()
    for row in meta:
        if row["skip_reason"]:
            skipped[row["skip_reason"]] += 1
        elif row["doc_id"] in seen:
            skipped["duplicate_document"] += 1
        elif limit and len(kept) >= limit:
            skipped["over_limit"] += 1
        else:
            seen.add(row["doc_id"])
            kept.append(row)
    return kept, skipped, len(meta)


def load_doc_states(table: Path, doc_ids: list[str]) -> list[DocState]:
    """Full documents (text + chunk tree) for one wave, in the order of doc_ids."""
    import pyarrow.compute as pc

    dataset = pads.dataset(str(table), format="parquet")
    rows = dataset.to_table(filter=pc.field("doc_id").isin(doc_ids) & (pc.field("skip_reason") == "")).to_pylist()
    by_id = {}
    for row in sorted(rows, key=lambda r: (r["source"], r["line"])):
        by_id.setdefault(row["doc_id"], row)  # the first in input order, as select_documents kept it
    return [doc_state(by_id[doc_id]) for doc_id in doc_ids]


def doc_state(row: dict) -> DocState:
    """A documents-table row (doc_id, title, text, n_tokens, chunks, sections) as the planner's DocState."""
    text = row["text"]
    chunks = [Chunk(**c, text=text[c["char_start"]:c["char_end"]]) for c in json.loads(row["chunks"])]
    sections = [Section(**s) for s in json.loads(row["sections"])]
    return DocState(row["doc_id"], row["title"] or row["doc_id"], text, int(row["n_tokens"]), chunks, sections)


def files_read_as(table: Path) -> dict[str, list[str]]:
    """The input files by the format each was read as ({"json_array": [file, ...], "jsonl": [...], ...}); files
    that could not be read at all (unsupported, corrupt) are absent: their skip reasons say why."""
    columns = pads.dataset(str(table), format="parquet").to_table(columns=["source", "read_as"]).to_pydict()
    files: dict[str, set[str]] = {}
    for source, read_as in zip(columns["source"], columns["read_as"]):
        if read_as:
            files.setdefault(read_as, set()).add(source)
    return {fmt: sorted(paths) for fmt, paths in sorted(files.items())}


def boilerplate_counts(table: Path) -> dict[str, int]:
    """Documents from which each kind of wrapper was stripped at read time (gutenberg, pattern:<n>)."""
    rows = pads.dataset(str(table), format="parquet").to_table(columns=["stripped"]).column("stripped").to_pylist()
    counts: Counter = Counter()
    for value in rows:
        counts.update(k for k in (value or "").split(",") if k)
    return dict(sorted(counts.items()))


# skip reason -> the key that decides it (and what to do), for errors that name what to change
SKIP_KEYS = {
    "too_long": "raise input.max_document_tokens (now {max_document_tokens}; 0 = no limit)",
    "too_short": "lower chunking.min_document_tokens (now {min_document_tokens})",
    "shorter_than_chunk": "set chunking.allow_short_documents=true or lower chunking.small_tokens (now {small_tokens})",
    "over_limit": "raise input.limit (now {limit}; 0 = no limit)",
    "missing_text_field": "set input.text_field to the field holding the text (now {text_field!r})",
    "text_not_string": "set input.text_field to a field holding text (now {text_field!r})",
    "duplicate_document": "check input.id_field (now {id_field!r}): every document has the same id",
    "invalid_json_line": "check the JSONL files or set input.format",
    "invalid_json_array": "check the .json files: a file that starts with '[' must be one JSON array",
    "corrupt_parquet": "check the Parquet files (pyarrow cannot read them)",
    "record_not_an_object": "check the JSONL files or set input.format",
    "empty_after_boilerplate": "set input.strip_boilerplate=false or check input.boilerplate_patterns",
}


def no_document_error(cfg: SynthConfig, skipped: Counter, n_records: int) -> str:
    """The one-line error when every record was skipped: the counts, and for each reason the key to change."""
    values = {**cfg.input.model_dump(), **cfg.chunking.model_dump()}
    hints = []
    for reason, _ in skipped.most_common():
        hint = SKIP_KEYS.get(reason.split(":")[0])
        if hint and hint.format(**values) not in hints:
            hints.append(hint.format(**values))
    counts = ", ".join(f"{k}: {v}" for k, v in skipped.most_common())
    message = f"input.path {cfg.input.path!r}: no usable document among {n_records} records (skipped: {counts})"
    if hints:
        message += ". To fix: " + "; or ".join(hints)
    return message
