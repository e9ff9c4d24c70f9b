"""Selecting documents from the documents table: records that share an id are told apart by their text (a
harmless repeat vs a conflict the user must hear about), and every skip reason's hint is true for the formats
that produce it."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctxforge.config import load_config
from ctxforge.pipeline.config import InputConfig, SynthConfig
from ctxforge.pipeline.documents import SKIP_KEYS, KEPT_RULE, id_conflict_note, no_document_error, select_documents

ROOT = Path(__file__).resolve().parents[1]


def table_of(tmp_path: Path, rows: list[tuple]) -> Path:
    """A documents table from (source, line, read_as, doc_id, text, skip_reason) rows, written over two files
    in an order unlike the input's (as Ray may write blocks)."""
    keys = ("source", "line", "read_as", "doc_id", "text", "skip_reason")
    records = [{**dict(zip(keys, r)), "title": "", "n_tokens": 100} for r in rows]
    table = tmp_path / "documents"
    table.mkdir(parents=True)
    half = len(records) // 2
    for n, part in enumerate((records[half:][::-1], records[:half][::-1])):
        pq.write_table(pa.Table.from_pylist(part), table / f"{n}.parquet")
    return table


def test_same_id_different_text_is_a_named_conflict_and_the_first_record_is_kept(tmp_path):
    d = str(tmp_path / "in")
    table = table_of(tmp_path, [
        (f"{d}/a.jsonl", 1, "jsonl", "x", "Alpha text.", ""),
        (f"{d}/a.jsonl", 2, "jsonl", "x", "Alpha text.", ""),         # same id, same text: a harmless repeat
        (f"{d}/a.jsonl", 3, "jsonl", "", "", "invalid_json_line"),
        (f"{d}/b.json", 1, "json_array", "x", "Other text.", ""),     # same id, different text: a conflict
        (f"{d}/b.json", 2, "json_array", "y", "Yonder text.", ""),
        (f"{d}/c.parquet", 3, "parquet", "y", "Not yonder.", ""),     # a second conflict
        (f"{d}/c.parquet", 4, "parquet", "z", "Zed text.", ""),
    ])
    kept, skipped, n_records, conflicts = select_documents(table, 0)
    assert [(r["doc_id"], r["source"].rsplit("/", 1)[1], r["line"]) for r in kept] == [
        ("x", "a.jsonl", 1), ("y", "b.json", 2), ("z", "c.parquet", 4)]
    assert skipped == Counter(duplicate_document=1, conflicting_id=2, invalid_json_line=1) and n_records == 7
    assert conflicts == {
        "rule": KEPT_RULE, "conflicting_ids": 2, "records_dropped": 2, "distinct_ids": 3,
        "examples": [
            {"id": "x", "kept": {"file": f"{d}/a.jsonl", "line": 1, "read_as": "jsonl"},
             "dropped": [{"file": f"{d}/b.json", "line": 1, "read_as": "json_array"}], "dropped_records": 1},
            {"id": "y", "kept": {"file": f"{d}/b.json", "line": 2, "read_as": "json_array"},
             "dropped": [{"file": f"{d}/c.parquet", "line": 3, "read_as": "parquet"}], "dropped_records": 1},
        ]}
    note = id_conflict_note(conflicts, "id", d)
    assert note.startswith("input.id_field 'id': 2 records were dropped (conflicting_id)")
    assert "2 ids: 'x' (kept a.jsonl line 1; dropped b.json element 1); 'y' (kept b.json element 2; dropped " \
           "c.parquet row 3)." in note
    assert KEPT_RULE in note and "To keep them, give each record its own input.id_field ('id') value" in note
    assert "Every usable record has the same" not in note   # three distinct ids: that hint would be false


def test_same_id_same_text_is_counted_as_a_duplicate_and_nothing_is_said(tmp_path):
    table = table_of(tmp_path, [("a.jsonl", n, "jsonl", "x", "Alpha text.", "") for n in (1, 2, 3)])
    kept, skipped, _, conflicts = select_documents(table, 0)
    assert len(kept) == 1 and skipped == Counter(duplicate_document=2)
    assert conflicts == {} and id_conflict_note(conflicts, "id") == ""


def test_every_record_sharing_one_id_is_said_so_and_a_limit_does_not_make_it_true(tmp_path):
    same = table_of(tmp_path / "1", [("t.jsonl", n, "jsonl", "en", f"Book {n}.", "") for n in range(1, 8)])
    _, skipped, _, conflicts = select_documents(same, 0)
    assert skipped == Counter(conflicting_id=6)
    note = id_conflict_note(conflicts, "lang")
    assert conflicts["examples"][0]["dropped_records"] == 6 and len(conflicts["examples"][0]["dropped"]) == 3
    assert "dropped t.jsonl line 2, t.jsonl line 3, t.jsonl line 4 and 3 more)" in note
    assert "6 records were dropped (conflicting_id)" in note and "1 id: 'en' (kept t.jsonl line 1;" in note
    assert "Every usable record has the same 'lang' value: to keep them, set input.id_field" in note
    # two ids, the second left out by input.limit: not every record shares one id
    mixed = table_of(tmp_path / "2", [("t.jsonl", 1, "jsonl", "a", "One.", ""), ("t.jsonl", 2, "jsonl", "b", "Two.", ""),
                                      ("t.jsonl", 3, "jsonl", "a", "Three.", "")])
    _, skipped, _, conflicts = select_documents(mixed, 1)
    assert skipped == Counter(over_limit=1, conflicting_id=1)
    note = id_conflict_note(conflicts, "id")
    assert note.startswith("input.id_field 'id': 1 record was dropped") and "Every usable record" not in note


def _json_rows(name: str, data: bytes) -> list[dict]:
    from ctxforge.pipeline.read import _parse_json_file

    return _parse_json_file({"path": name, "bytes": data}, InputConfig())


@pytest.mark.parametrize("name, data, kind", [
    ("words.json", json.dumps(["a string", "another"]).encode(), "JSON array element"),       # array of strings
    ("words.jsonl", b'"a string"\n["a", "list"]\n', "JSON Lines line"),                       # lines not objects
    ("nums.ndjson", b"1\n2\n", "JSON Lines line"),
])
def test_record_not_an_object_hint_names_what_a_record_must_be_for_each_json_kind(name, data, kind):
    rows = _json_rows(name, data)
    skipped = Counter(r["skip_reason"] for r in rows)
    assert set(skipped) == {"record_not_an_object"}
    cfg = load_config(SynthConfig, "tiny", ["input.text_field=body"])
    message = no_document_error(cfg, skipped, len(rows))
    assert kind in message and "a JSON object holding its text in input.text_field (now 'body')" in message
    assert "JSONL files or set input.format" not in message   # the old hint: format is decided by content


def test_stale_format_hints_are_gone():
    cfg = load_config(SynthConfig, "tiny", [])
    bad_line = no_document_error(cfg, Counter(invalid_json_line=2), 2)
    assert "files read as JSON Lines" in bad_line and "input.files_read_as" in bad_line
    assert "set input.format" not in bad_line
    array = no_document_error(cfg, Counter(invalid_json_array=1), 1)
    assert "JSON files that start with '['" in array and "the .json files" not in array


def _reasons_in_source() -> set[str]:
    """Every skip reason the reader and the selection can write, found where they are set in the source."""
    text = (ROOT / "pipeline" / "read.py").read_text() + (ROOT / "pipeline" / "documents.py").read_text()
    found = set(re.findall(r'skip_reason"\] = "([a-z0-9_]+)"', text))
    found |= set(re.findall(r'"skip_reason": "([a-z0-9_]+)"', text))
    found |= set(re.findall(r'_skip\(\w+, [^,]+, f?"([a-z0-9_]+)', text))   # _skip(source, line, reason, ...)
    found |= set(re.findall(r'skipped\["([a-z0-9_]+)"\]', text))
    found |= set(re.findall(r'"(duplicate_document)" if same else "(conflicting_id)"', text)[0])
    found |= set(re.findall(r'return None, f"([a-z0-9_]+):', text))
    return found


def test_every_skip_reason_has_a_hint():
    reasons = _reasons_in_source()
    # the search itself finds the reasons of every kind of input (a control against a regex that finds nothing)
    assert {"record_not_an_object", "invalid_json_line", "corrupt_parquet", "unsupported_format", "too_long",
            "conflicting_id", "duplicate_document", "corrupt_compressed", "empty_file", "binary_file"} <= reasons
    assert reasons - set(SKIP_KEYS) == set()
    values = {**InputConfig().model_dump(), **load_config(SynthConfig, "tiny", []).chunking.model_dump()}
    for hint in SKIP_KEYS.values():
        hint.format(**values)   # every placeholder names a config value
