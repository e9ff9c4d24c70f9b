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


# how a record's `line` reads for the format its file was read as (text and single-object files are one record)
_LINE_WORD = {"jsonl": "line", "json_array": "element", "parquet": "row"}
ID_CONFLICT_EXAMPLES = 5     # conflicting ids named in the manifest and the summary
KEPT_RULE = "the first record in input order (files sorted by path, then by line / element / row) is kept"


def record_where(source: str, line: int, read_as: str) -> str:
    """Where a record sits, as a user finds it: "books.jsonl line 3", "shelf.json element 2", "p.parquet row 5"."""
    word = _LINE_WORD.get(read_as)
    return f"{source} {word} {line}" if word and line else source


def select_documents(table: Path, limit: int) -> tuple[list[dict], Counter, int, dict]:
    """(kept document metadata in input order, skipped counts by reason, records read, id conflicts).

    Records that share a document id with a kept one are dropped, and the first in input order is kept
    (files sorted by path, then by row): a record whose text equals the kept one's is a harmless repeat
    (`duplicate_document`); one whose text differs is `conflicting_id`, and the conflicts are returned
    ({"rule", "conflicting_ids", "records_dropped", "distinct_ids", "examples": [{"id", "kept", "dropped": [...],
    "dropped_records"}]}, {} when there are none; each place is {"file", "line", "read_as"}) so the user is told
    which records were lost."""
    meta = pads.dataset(str(table), format="parquet").to_table(
        columns=["doc_id", "title", "source", "line", "skip_reason", "n_tokens", "read_as"]).to_pylist()
    meta.sort(key=lambda r: (r["source"], r["line"]))  # input order, whatever order Ray wrote the blocks in
    skipped: Counter = Counter()
    kept, first, repeats, usable_ids = [], {}, [], set()
    for row in meta:
        if not row["skip_reason"]:
            usable_ids.add(row["doc_id"])
        if row["skip_reason"]:
            skipped[row["skip_reason"]] += 1
        elif row["doc_id"] in first:
            repeats.append(row)
        elif limit and len(kept) >= limit:
            skipped["over_limit"] += 1
        else:
            first[row["doc_id"]] = row
            kept.append(row)
    conflicts: dict[str, list[dict]] = {}
    if repeats:
        digests = _text_digests(table, {r["doc_id"] for r in repeats})
        for row in repeats:
            same = digests[(row["source"], row["line"])] == digests[(first[row["doc_id"]]["source"],
                                                                      first[row["doc_id"]]["line"])]
            skipped["duplicate_document" if same else "conflicting_id"] += 1
            if not same:
                conflicts.setdefault(row["doc_id"], []).append(row)
    return kept, skipped, len(meta), _conflict_report(conflicts, first, len(usable_ids))


def _text_digests(table: Path, doc_ids: set[str]) -> dict[tuple[str, int], bytes]:
    """{(source, line): sha1 of the text} of the usable records with these ids, read in batches (only the
    records that share an id are read, and no text is held beyond its batch)."""
    import pyarrow.compute as pc

    dataset = pads.dataset(str(table), format="parquet")
    wanted = pc.field("doc_id").isin(sorted(doc_ids)) & (pc.field("skip_reason") == "")
    digests = {}
    for batch in dataset.to_batches(columns=["source", "line", "text"], filter=wanted):
        cols = batch.to_pydict()
        for source, line, text in zip(cols["source"], cols["line"], cols["text"]):
            digests[(source, line)] = hashlib.sha1(text.encode("utf-8")).digest()
    return digests


def _conflict_report(conflicts: dict[str, list[dict]], first: dict[str, dict], distinct_ids: int) -> dict:
    if not conflicts:
        return {}

    def place(row: dict) -> dict:
        return {"file": row["source"], "line": int(row["line"]), "read_as": row["read_as"]}

    ids = list(conflicts)
    return {
        "rule": KEPT_RULE,
        "conflicting_ids": len(ids),
        "records_dropped": sum(len(rows) for rows in conflicts.values()),   # counted as conflicting_id
        "distinct_ids": distinct_ids,        # among all records with text (1: they all share one id)
        "examples": [{"id": i, "kept": place(first[i]), "dropped": [place(r) for r in conflicts[i][:3]],
                      "dropped_records": len(conflicts[i])} for i in ids[:ID_CONFLICT_EXAMPLES]],
    }


def id_conflict_note(conflicts: dict, id_field: str, relative_to: str = "") -> str:
    """The summary's line on records dropped because another record with different text has their id:
    how many, the first few ids with where the kept and the dropped records are, the rule, and what to do."""
    if not conflicts:
        return ""

    def where(p: dict) -> str:
        source = p["file"]
        if relative_to and source.startswith(relative_to.rstrip("/") + "/"):
            source = source[len(relative_to.rstrip("/")) + 1:]
        return record_where(source, p["line"], p["read_as"])

    shown = []
    for ex in conflicts["examples"]:
        left = ex["dropped_records"] - len(ex["dropped"])
        extra = f" and {left} more" if left else ""
        shown.append(f"{ex['id']!r} (kept {where(ex['kept'])}; dropped {', '.join(where(d) for d in ex['dropped'])}"
                     f"{extra})")
    n_ids, n_dropped = conflicts["conflicting_ids"], conflicts["records_dropped"]
    more = f" and {n_ids - len(shown)} more" if n_ids > len(shown) else ""
    if conflicts["distinct_ids"] == 1:
        fix = (f"Every usable record has the same {id_field!r} value: to keep them, set input.id_field to a field "
               f"that is unique per record, or to a name the records lack (ids are then content hashes)")
    else:
        fix = (f"To keep them, give each record its own input.id_field ({id_field!r}) value, or set input.id_field "
               f"to a field that is unique per record")
    records = "1 record was" if n_dropped == 1 else f"{n_dropped} records were"
    return (f"input.id_field {id_field!r}: {records} dropped (conflicting_id) because an earlier record with "
            f"DIFFERENT text has the same id; {n_ids} {'id' if n_ids == 1 else 'ids'}: {'; '.join(shown)}{more}. "
            f"Rule: {KEPT_RULE}. {fix} (manifest: input.id_conflicts).")


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


# skip reason -> what to change (the key that decides it, or what the input must be), for errors that name what to
# do. Reasons that carry a detail (`unsupported_format:pdf`) are looked up by the part before the colon. JSON-family
# files (.json/.jsonl/.ndjson, or every file when input.format=jsonl) are read by content: one JSON array, one
# JSON object, else JSON Lines, so the hints name the record, not one file kind.
SKIP_KEYS = {
    "too_long": "raise input.max_document_tokens (now {max_document_tokens}; 0 = no limit)",
    "too_short": "lower chunking.min_document_tokens (now {min_document_tokens})",
    "shorter_than_chunk": "set chunking.allow_short_documents=true or lower chunking.small_tokens (now {small_tokens})",
    "over_limit": "raise input.limit (now {limit}; 0 = no limit)",
    "missing_text_field": "set input.text_field to the field of the JSON/Parquet records that holds the text "
                          "(now {text_field!r})",
    "text_not_string": "set input.text_field to a field holding text (now {text_field!r})",
    "empty_document": "fill or remove the empty records (blank input.text_field {text_field!r} values or blank text "
                      "files)",
    "duplicate_document": "nothing is lost: these records repeat a kept record (same input.id_field {id_field!r} "
                          "value, same text); remove the repeats to silence the count",
    "conflicting_id": "give each record its own input.id_field value (now {id_field!r}): after the first, records "
                      "whose id is taken by a record with different text are dropped",
    "invalid_json_line": "fix the lines that are not JSON in the files read as JSON Lines (manifest "
                         "input.files_read_as: a .json/.jsonl/.ndjson file that is neither one JSON array nor one "
                         "JSON object is read line by line)",
    "invalid_json_array": "fix the JSON files that start with '[': such a file must be one valid JSON array (often it "
                          "was cut short), or JSON Lines whose every line is JSON",
    "record_not_an_object": "make each record a JSON object holding its text in input.text_field (now "
                            "{text_field!r}): a JSON array element or a JSON Lines line that is a string, number or "
                            "list is not a document",
    "corrupt_parquet": "check the Parquet files (pyarrow cannot read them)",
    "empty_file": "check the input files: they are empty (or an empty JSON array, or a Parquet file with no row)",
    "invalid_utf8": "convert the files to UTF-8 (text files, and each JSON Lines line, are read as UTF-8)",
    "binary_file": "remove the binary files from input.path (a NUL byte in the first 8 KiB: not text)",
    "unsupported_format": "convert those files to text, JSON, JSON Lines or Parquet (the suffix in the reason names "
                          "their format, which is not read)",
    "corrupt_compressed": "replace the compressed files that cannot be decompressed (cut short, or not the "
                          "format their suffix names)",
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
