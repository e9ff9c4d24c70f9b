"""Input formats that used to lose records silently (BOM, compressed JSONL/text), formats that cannot be
read, boilerplate stripped at read time, and skip-all errors that name the key to change."""

from __future__ import annotations

import bz2
import gzip
import json
from collections import Counter

import pyarrow as pa
import pytest

from ctxforge.config import load_config
from ctxforge.pipeline.boilerplate import strip_boilerplate, strip_gutenberg
from ctxforge.pipeline.config import InputConfig, SynthConfig
from ctxforge.pipeline.documents import no_document_error

BOOKS = [{"id": f"b{i}", "title": f"Book {i}", "text": f"Chapter {i}. The ferryman crossed the river {i} times."}
         for i in range(3)]
JSONL = "".join(json.dumps(b) + "\n" for b in BOOKS).encode()

GUTENBERG = """The Project Gutenberg eBook of The Mill, by A. Writer

This eBook is for the use of anyone anywhere in the United States and most other parts of the world.

Release date: May 1, 2001 [eBook #1234]

*** START OF THE PROJECT GUTENBERG EBOOK THE MILL ***

THE MILL

Chapter 1. Agnes counted the sacks.

Chapter 2. The river rose.

End of the Project Gutenberg EBook of The Mill, by A. Writer

*** END OF THE PROJECT GUTENBERG EBOOK THE MILL ***

Updated editions will replace the previous one.
Project Gutenberg is a nonprofit 501(c)(3) educational corporation.
"""


def read(tmp_path, files: dict[str, bytes], **input_cfg) -> list[dict]:
    from ctxforge.pipeline.read import read_documents

    folder = tmp_path / "in"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    rows = read_documents(InputConfig(path=str(folder), **input_cfg), str(tmp_path / "cache")).take_all()
    return sorted(rows, key=lambda r: (r["source"], r["line"]))


@pytest.mark.slow
def test_formats_are_read_as_records(ray_local, tmp_path):
    sink = pa.BufferOutputStream()  # a .zst file as the zstd tool writes it
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(JSONL)
    rows = read(tmp_path, {
        "bom.jsonl": b"\xef\xbb\xbf" + JSONL,
        "books.jsonl.gz": gzip.compress(JSONL),
        "books2.jsonl.bz2": bz2.compress(JSONL.replace(b'"b', b'"c')),
        "books3.jsonl.zst": sink.getvalue().to_pybytes(),
        "notes.txt.gz": gzip.compress("A note about the mill.\n".encode()),
        "bom.txt": b"\xef\xbb\xbf" + "A text with a byte-order mark.".encode(),
        "broken.jsonl.gz": b"\x1f\x8b\x08\x00 not really gzip",
        "scan.pdf": b"%PDF-1.7 ...",
        "novel.epub": b"PK\x03\x04...",
        "gutenberg.txt": GUTENBERG.encode(),
    })
    by_source = {}
    for r in rows:
        by_source.setdefault(r["source"].rsplit("/", 1)[1], []).append(r)
    for name in ("bom.jsonl", "books.jsonl.gz", "books2.jsonl.bz2", "books3.jsonl.zst"):
        got = by_source[name]
        assert [r["skip_reason"] for r in got] == ["", "", ""], name
        assert [r["text"] for r in got] == [b["text"] for b in BOOKS], name  # records, not raw JSON
    assert [r["doc_id"] for r in by_source["bom.jsonl"]] == ["b0", "b1", "b2"]  # the first record is not lost
    assert by_source["notes.txt.gz"][0]["text"] == "A note about the mill.\n"
    assert by_source["notes.txt.gz"][0]["title"] == "notes"
    assert by_source["bom.txt"][0]["text"] == "A text with a byte-order mark."
    assert by_source["broken.jsonl.gz"][0]["skip_reason"] == "corrupt_compressed:gz"
    assert by_source["scan.pdf"][0]["skip_reason"] == "unsupported_format:pdf"
    assert by_source["novel.epub"][0]["skip_reason"] == "unsupported_format:epub"
    book = by_source["gutenberg.txt"][0]
    assert book["stripped"] == "gutenberg" and book["text"].startswith("THE MILL")
    assert "nonprofit" not in book["text"] and "End of the Project Gutenberg" not in book["text"]


def test_gutenberg_wrappers_are_stripped_and_user_patterns_apply():
    text, stripped = strip_gutenberg(GUTENBERG)
    assert stripped and text == "THE MILL\n\nChapter 1. Agnes counted the sacks.\n\nChapter 2. The river rose.\n"
    assert strip_gutenberg("Chapter 1. No wrapper here.") == ("Chapter 1. No wrapper here.", False)
    old = GUTENBERG.replace("*** START OF THE PROJECT GUTENBERG EBOOK", "*** START OF THIS PROJECT GUTENBERG ETEXT")
    assert strip_gutenberg(old)[0].startswith("THE MILL")
    text, kinds = strip_boilerplate("Scanned by Volunteers.\nChapter 1. Text.\n", True, [r"^Scanned by .*?\n"])
    assert text == "Chapter 1. Text.\n" and kinds == ["pattern:0"]
    # negative control: switched off, the license stays
    assert "nonprofit" in strip_boilerplate(GUTENBERG, False, [])[0]


def test_a_bad_pattern_is_a_config_error():
    from ctxforge.config import ConfigError

    with pytest.raises(ConfigError, match="boilerplate_patterns.*not a valid regular expression"):
        load_config(SynthConfig, "tiny", ["input.boilerplate_patterns=['(unclosed']"])


@pytest.mark.parametrize("skipped, key", [
    (Counter(too_long=7), "input.max_document_tokens (now 3000"),
    (Counter(too_short=2, empty_document=1), "chunking.min_document_tokens"),
    (Counter(missing_text_field=4), "input.text_field"),
    (Counter(over_limit=3), "input.limit"),
])
def test_skip_all_errors_name_the_key_to_change(skipped, key):
    cfg = load_config(SynthConfig, "tiny", [])
    message = no_document_error(cfg, skipped, sum(skipped.values()))
    assert key in message and all(f"{k}: {v}" in message for k, v in skipped.items())


# --- no data column is shadowed by a column the reader adds; JSON files are read as what they hold ----------

# three distinct records whose ids are in a column named `path` (the name Ray Data's include_paths uses) and
# whose titles are in `lang`, a Hive partition key of the folder they sit in; two share their text, so ids
# taken from a content hash would make one of them a duplicate
PATH_RECORDS = [{"path": f"shelf/{n}.txt", "lang": f"title {n}", "text": text}
                for n, text in (("a", "Same words in two books."), ("b", "Same words in two books."),
                                ("c", "A third book about the river."))]


def _parquet_bytes(records: list[dict], row_group_size: int | None = None) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records), sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def _path_record_files() -> dict[str, bytes]:
    jsonl = "".join(json.dumps(r) + "\n" for r in PATH_RECORDS).encode()
    files = {
        "lang=folder/books.parquet": _parquet_bytes(PATH_RECORDS),
        "lang=folder/groups.parquet": _parquet_bytes(PATH_RECORDS, row_group_size=1),  # three row groups
        "lang=folder/books.jsonl": jsonl,
        "lang=folder/books.jsonl.gz": gzip.compress(jsonl),
        "lang=folder/array.json": json.dumps(PATH_RECORDS, indent=2).encode(),
    }
    for n, record in enumerate(PATH_RECORDS):
        files[f"lang=folder/objects/{n}.json"] = json.dumps(record, indent=2).encode()
    return files


@pytest.mark.slow
def test_a_data_column_is_never_shadowed_by_the_reader(ray_local, tmp_path):
    rows = read(tmp_path, _path_record_files(), id_field="path", title_field="lang")
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(r["source"].split("/in/", 1)[1], []).append(r)
    objects = [r for f, rs in by_file.items() if f.startswith("lang=folder/objects/") for r in rs]
    by_file = {f: rs for f, rs in by_file.items() if not f.startswith("lang=folder/objects/")}
    by_file["objects"] = sorted(objects, key=lambda r: r["doc_id"])
    assert sorted(by_file) == ["lang=folder/array.json", "lang=folder/books.jsonl", "lang=folder/books.jsonl.gz",
                               "lang=folder/books.parquet", "lang=folder/groups.parquet", "objects"]
    for name, got in by_file.items():
        assert [r["skip_reason"] for r in got] == ["", "", ""], name
        assert [r["doc_id"] for r in got] == [r["path"] for r in PATH_RECORDS], name
        assert [r["title"] for r in got] == [r["lang"] for r in PATH_RECORDS], name
        assert [r["text"] for r in got] == [r["text"] for r in PATH_RECORDS], name
    # line = the record's row number in its file, also across Parquet row groups
    assert [r["line"] for r in by_file["lang=folder/groups.parquet"]] == [1, 2, 3]
    assert {r["read_as"] for r in by_file["lang=folder/groups.parquet"]} == {"parquet"}
    assert {r["read_as"] for r in by_file["objects"]} == {"json_object"}


def test_a_parquet_path_column_is_data_and_its_absence_is_a_content_hash(tmp_path):
    from ctxforge.pipeline.read import _parquet_row_groups, _parse_parquet_row_group

    def rows_of(records, **input_cfg):
        file = tmp_path / f"{len(list(tmp_path.iterdir()))}.parquet"
        file.write_bytes(_parquet_bytes(records, row_group_size=2))
        cfg = InputConfig(path=str(tmp_path), **input_cfg)
        return [r for piece in _parquet_row_groups({"path": str(file)}) for r in _parse_parquet_row_group(piece, cfg)]

    got = rows_of(PATH_RECORDS, id_field="path", title_field="lang")
    assert [(r["doc_id"], r["title"], r["line"]) for r in got] == [
        ("shelf/a.txt", "title a", 1), ("shelf/b.txt", "title b", 2), ("shelf/c.txt", "title c", 3)]
    # negative control: without the column the ids are content hashes, and the two equal texts share one
    plain = rows_of([{k: v for k, v in r.items() if k != "path"} for r in PATH_RECORDS], id_field="path")
    ids = [r["doc_id"] for r in plain]
    assert all(i.startswith("sha1-") for i in ids) and ids[0] == ids[1] != ids[2]
    # a file pyarrow cannot open is one skipped row, not a failed read
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not parquet")
    pieces = _parquet_row_groups({"path": str(bad)})
    assert [r["skip_reason"] for p in pieces for r in _parse_parquet_row_group(p, InputConfig())] == ["corrupt_parquet"]


def _json_rows(name: str, data: bytes, **input_cfg) -> list[dict]:
    from ctxforge.pipeline.read import _parse_json_file

    return _parse_json_file({"path": name, "bytes": data}, InputConfig(**input_cfg))


ARRAY_BOOKS = [{"id": f"a{i}", "title": f"Array book {i}", "text": f"Array chapter {i}. The miller sang."}
               for i in range(13)]


@pytest.mark.parametrize("data", [json.dumps(ARRAY_BOOKS).encode(),                 # one line
                                  json.dumps(ARRAY_BOOKS, indent=2).encode(),       # pretty-printed
                                  b"\xef\xbb\xbf\n  " + json.dumps(ARRAY_BOOKS, indent=1).encode()])  # BOM, blank start
def test_a_json_array_file_is_one_record_per_element(data):
    rows = _json_rows("books.json", data)
    assert [r["doc_id"] for r in rows] == [b["id"] for b in ARRAY_BOOKS]
    assert [r["title"] for r in rows] == [b["title"] for b in ARRAY_BOOKS]
    assert {r["read_as"] for r in rows} == {"json_array"} and not any(r["skip_reason"] for r in rows)
    assert [r["line"] for r in rows] == list(range(1, 14))  # the element's position


def test_json_lines_and_single_objects_are_read_as_what_they_are():
    lines = b'{"id": "l1", "text": "First line book."}\nnot json\n{"id": "l3", "text": "Third line book."}\n'
    rows = _json_rows("mixed.jsonl", lines)
    assert [(r["doc_id"], r["skip_reason"], r["line"]) for r in rows] == [
        ("l1", "", 1), ("", "invalid_json_line", 2), ("l3", "", 3)]   # the bad line counted, the others kept
    assert {r["read_as"] for r in rows} == {"jsonl"}
    # negative controls: a .json file holding JSON Lines is JSON Lines, not an array or one object
    assert [r["read_as"] for r in _json_rows("lines.json", lines)] == ["jsonl"] * 3
    one = _json_rows("one.json", json.dumps({"id": "o", "title": "One", "text": "One book."}, indent=2).encode())
    assert [(r["doc_id"], r["read_as"]) for r in one] == [("o", "json_object")]
    # JSON Lines whose lines are arrays: each line is one record that is not an object, not one array
    assert [r["skip_reason"] for r in _json_rows("arrays.jsonl", b"[1, 2]\n[3]\n")] == ["record_not_an_object"] * 2
    # a broken array is one row that says so, not a count per line
    broken = json.dumps(ARRAY_BOOKS, indent=2).encode()[:-40]
    assert [(r["skip_reason"], r["read_as"]) for r in _json_rows("broken.json", broken)] == [
        ("invalid_json_array", "json_array")]
    assert [r["skip_reason"] for r in _json_rows("empty.json", b" [ ] ")] == ["empty_file"]
    assert [r["skip_reason"] for r in _json_rows("nums.json", b"[1, {\"text\": \"ok text\"}]")] == [
        "record_not_an_object", ""]


@pytest.mark.slow
def test_a_json_array_beside_json_lines_loses_nothing(ray_local, tmp_path):
    lines = b'{"id": "l1", "text": "First line book."}\n{oops\n{"id": "l3", "text": "Third line book."}\n'
    rows = read(tmp_path, {"array.json": json.dumps(ARRAY_BOOKS, indent=2).encode(), "lines.jsonl": lines})
    kept = [r["doc_id"] for r in rows if not r["skip_reason"]]
    assert kept == [b["id"] for b in ARRAY_BOOKS] + ["l1", "l3"]
    assert Counter(r["skip_reason"] for r in rows if r["skip_reason"]) == Counter(invalid_json_line=1)
    assert Counter(r["read_as"] for r in rows) == Counter(json_array=13, jsonl=3)


def test_the_manifest_lists_the_format_each_file_was_read_as(tmp_path):
    import pyarrow.parquet as pq

    from ctxforge.pipeline.documents import files_read_as

    table = tmp_path / "documents"
    table.mkdir()
    pq.write_table(pa.table({"source": ["a.json", "a.json", "b.jsonl", "c.pdf", "d.parquet"],
                             "read_as": ["json_array", "json_array", "jsonl", "", "parquet"]}), table / "0.parquet")
    assert files_read_as(table) == {"json_array": ["a.json"], "jsonl": ["b.jsonl"], "parquet": ["d.parquet"]}
