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
    folder.mkdir()
    for name, data in files.items():
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
