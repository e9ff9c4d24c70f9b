"""Training data: index a stage's sample shards from their metadata, read samples by row group, mix in short chat data.

Reads the synthesis contract (`ctxforge.schema.SAMPLE_SCHEMA`): `samples/<stage>/part-*.parquet` and
`manifest.json`, on a local path or an object store (`s3://`, `gs://`, `file://`, any URI pyarrow's
filesystems know), always through `pyarrow.fs`.

Two steps, so that nothing holds a stage whole:
- `index_stage` (driver at preflight, and every worker) reads only the small columns `num_tokens`,
  `num_loss_tokens`, `tokenizer_hash` and the Parquet footers: the contract's columns, the tokenizer hash
  (it must be the training model's), each sample's length against the stage's `max_seq_len` (dropped
  and counted, or an error when `strict`). It keeps (file, row group, row, length) per usable sample:
  a few bytes per sample, whatever the token count.
- `StageIndex.read` returns the samples of a micro-batch, reading only the row groups that hold them
  (columns `input_ids`, `loss_mask`), one at a time. Each DP group reads what it trains on, at the step
  it trains on it; peak memory is one row group plus one step's samples (bench/bench_train_data.py).

A short-data mix (ProLong) is read from a user JSONL/Parquet chat dataset with a `messages` column and
rendered with the same chat template code the synthesis stage uses, so its loss mask means the same.
Batching (packs, sorted batches) lives in `batching.py`; this module only yields samples.
"""

from __future__ import annotations

import json
import posixpath
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ctxforge.schema import missing_columns

INDEX_COLUMNS = ["num_tokens", "num_loss_tokens", "tokenizer_hash"]
READ_COLUMNS = ["sample_id", "num_tokens", "input_ids", "loss_mask"]


class DataError(ValueError):
    """Bad training input; the message names the file and what is wrong with it."""


def is_uri(path: str) -> bool:
    return "://" in str(path)


def open_filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path (`~` expanded, made absolute) or a URI such as
    s3://bucket/dir, gs://bucket/dir, file:///abs/dir. Raises DataError naming the location."""
    text = str(location)
    if is_uri(text):
        try:
            return pafs.FileSystem.from_uri(text)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            raise DataError(f"{text}: cannot open this location with pyarrow's filesystems: {exc}") from exc
    return pafs.LocalFileSystem(), str(Path(text).expanduser().absolute())


def _display(fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as fh:
        return fh.read().decode("utf-8")


@dataclass
class Sample:
    sample_id: str
    input_ids: np.ndarray  # int64 [n]
    loss_mask: np.ndarray  # int8 [n], 1 on answer tokens
    source: str = "long"   # "long" (synthesis) or "short" (instruction mix)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        """Answer tokens that can be predicted (a first token never is: nothing precedes it)."""
        return int(self.loss_mask[1:].sum())


def stage_shards(input_dir: str | Path, stage: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and Parquet shard paths of one synthesis stage, named by the manifest when there is one.

    Raises DataError naming the path when input.path is not a directory, the manifest has no such stage, or the
    stage has no part-*.parquet shards.
    """
    fs, root = open_filesystem(input_dir)
    folder = posixpath.join(root, "samples", stage)
    manifest = posixpath.join(root, "manifest.json")
    if _is_file(fs, manifest):
        stages = json.loads(read_text(fs, manifest)).get("stages", {})
        if stage not in stages:
            raise DataError(f"{_display(fs, manifest)}: no stage {stage!r} in the synthesis output "
                            f"(stages: {', '.join(stages) or 'none'})")
        files = stages[stage].get("files")
        if files:
            return fs, [posixpath.join(folder, name) for name in files]
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise DataError(f"input.path {input_dir}: no such directory")
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    shards = sorted(i.path for i in infos if i.type == pafs.FileType.File
                    and posixpath.basename(i.path).startswith("part-") and i.path.endswith(".parquet"))
    if not shards:
        raise DataError(f"{_display(fs, folder)}: no part-*.parquet shards for stage {stage!r}")
    return fs, shards


def _open_parquet(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    if not _is_file(fs, path):
        raise DataError(f"{_display(fs, path)}: listed for this stage but missing")
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"{_display(fs, path)}: not a readable Parquet file: {exc}") from exc


def check_shard_schema(pf: pq.ParquetFile, shown: str) -> None:
    """Raises DataError naming the shard and the missing columns when it lacks a column of the sample contract."""
    missing = missing_columns(pf.schema_arrow)
    if missing:
        raise DataError(f"{shown}: missing column(s) {', '.join(missing)} of the sample contract (ctxforge.schema); "
                        f"was it written by `ctxforge synth`?")


@dataclass
class StageIndex:
    """Where each usable sample of a stage lives, from metadata only. Arrays are aligned: sample k is row
    `rows[k]` of row group `groups[k]` of `files[files_of[k]]` and has `lengths[k]` tokens."""

    location: str                 # input.path as given (local path or URI); workers reopen the filesystem from it
    files: list[str]              # paths inside that filesystem
    files_of: np.ndarray          # int32 [n]
    groups: np.ndarray            # int32 [n]
    rows: np.ndarray              # int32 [n]
    lengths: np.ndarray           # int64 [n]
    stats: dict = field(default_factory=dict)
    _fs: pafs.FileSystem | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def filesystem(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = open_filesystem(self.location)[0]
        return self._fs

    def read(self, indices: list[int]) -> list[Sample]:
        """The samples `indices` (positions in this index), in that order. Reads each needed row group once
        (columns input_ids and loss_mask only) and drops it before the next.

        Raises DataError naming the shard and sample when a sample's num_tokens disagrees with its input_ids.
        """
        by_group: dict[tuple[int, int], list[int]] = {}
        for k in indices:
            by_group.setdefault((int(self.files_of[k]), int(self.groups[k])), []).append(k)
        found: dict[int, Sample] = {}
        for (f, g), ks in by_group.items():
            shown = _display(self.filesystem, self.files[f])
            table = _open_parquet(self.filesystem, self.files[f]).read_row_group(g, columns=READ_COLUMNS)
            for k in ks:
                row = table.slice(int(self.rows[k]), 1)  # Arrow -> numpy, no Python ints per token
                sample = Sample(row.column("sample_id")[0].as_py(),
                                row.column("input_ids").combine_chunks().flatten().to_numpy().astype(np.int64),
                                row.column("loss_mask").combine_chunks().flatten().to_numpy().astype(np.int8))
                n = int(row.column("num_tokens")[0].as_py())
                if len(sample) != n or len(sample.loss_mask) != n or n != int(self.lengths[k]):
                    raise DataError(f"{shown}: sample {sample.sample_id}: num_tokens {n} but {len(sample)} input_ids "
                                    f"and {len(sample.loss_mask)} loss_mask entries")
                found[k] = sample
            del table
        return [found[k] for k in indices]


def index_stage(input_dir: str | Path, stage: str, max_seq_len: int, tokenizer_hash: str,
                strict: bool = False) -> StageIndex:
    """Index the usable samples of a synthesis stage after the contract checks, reading metadata columns only.

    Raises DataError naming the shard when its samples were tokenized with another tokenizer, or (strict) a sample
    is longer than max_seq_len.
    """
    fs, files = stage_shards(input_dir, stage)
    stats = {"read": 0, "dropped_too_long": 0, "dropped_no_target": 0, "longest_dropped": 0}
    cols: dict[str, list] = {"files_of": [], "groups": [], "rows": [], "lengths": []}
    for f, path in enumerate(files):
        shown = _display(fs, path)
        pf = _open_parquet(fs, path)
        check_shard_schema(pf, shown)
        for g in range(pf.metadata.num_row_groups):
            table = pf.read_row_group(g, columns=INDEX_COLUMNS)
            hashes = set(table.column("tokenizer_hash").to_pylist())
            wrong = sorted(h for h in hashes if h != tokenizer_hash)
            if wrong:
                raise DataError(f"{shown}: samples were tokenized with tokenizer hash {', '.join(wrong)}, but the "
                                f"model's tokenizer hashes to {tokenizer_hash}; re-run synthesis with this model's "
                                f"tokenizer (target.tokenizer) or train the model the data was made for")
            lengths = table.column("num_tokens").to_numpy()
            answers = table.column("num_loss_tokens").to_numpy()
            stats["read"] += len(lengths)
            too_long = lengths > max_seq_len
            if too_long.any():
                if strict:
                    row = int(np.argmax(too_long))
                    raise DataError(f"{shown}: row {row} of row group {g} has {int(lengths[row])} tokens, more than the "
                                    f"stage's max_seq_len {max_seq_len} (input.strict=true; set it false to drop such "
                                    f"samples)")
                stats["dropped_too_long"] += int(too_long.sum())
                stats["longest_dropped"] = max(stats["longest_dropped"], int(lengths[too_long].max()))
            no_target = ~too_long & (answers == 0)
            stats["dropped_no_target"] += int(no_target.sum())
            keep = np.nonzero(~too_long & ~no_target)[0]
            cols["files_of"].append(np.full(len(keep), f, dtype=np.int32))
            cols["groups"].append(np.full(len(keep), g, dtype=np.int32))
            cols["rows"].append(keep.astype(np.int32))
            cols["lengths"].append(lengths[keep].astype(np.int64))
    arrays = {k: (np.concatenate(v) if v else np.zeros(0, dtype=np.int64)) for k, v in cols.items()}
    stats["kept"] = int(arrays["lengths"].shape[0])
    return StageIndex(location=str(input_dir), files=files, stats=stats, _fs=fs, **arrays)


def read_stage(input_dir: str | Path, stage: str, max_seq_len: int, tokenizer_hash: str,
               strict: bool = False) -> tuple[list[Sample], dict]:
    """Every usable sample of a stage in memory (small stages, tests and benchmarks; training streams)."""
    index = index_stage(input_dir, stage, max_seq_len, tokenizer_hash, strict)
    return index.read(list(range(len(index)))), index.stats


def _read_chat_rows(location: str) -> list[list[dict]]:
    fs, path = open_filesystem(location)
    shown = _display(fs, path)
    if not _is_file(fs, path):
        raise DataError(f"{shown}: short-data file not found")
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in read_text(fs, path).splitlines() if line.strip()]
    elif path.endswith(".parquet"):
        rows = pq.read_table(fs.open_input_file(path), columns=["messages"]).to_pylist()
    else:
        raise DataError(f"{shown}: short data must be .jsonl or .parquet with a 'messages' column")
    convs = []
    for n, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not any(m.get("role") == "assistant" for m in msgs):
            raise DataError(f"{shown}: row {n} has no 'messages' list with an assistant turn")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return convs


def read_short_mix(location: str | Path, tokenizer, num_samples: int, max_seq_len: int, seed: int) -> list[Sample]:
    """`num_samples` short chat samples (drawn with replacement when the file has fewer), answer-only mask.

    Raises DataError naming the file when no conversation fits max_seq_len with an assistant answer.
    """
    from ctxforge.pipeline.render import render_conversation

    convs = _read_chat_rows(str(location))
    rendered = []
    for n, conv in enumerate(convs):
        ids, mask = render_conversation(conv, tokenizer)
        if len(ids) <= max_seq_len and sum(mask[1:]):
            rendered.append(Sample(f"short-{n}", np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8),
                                   source="short"))
    if not rendered:
        raise DataError(f"{location}: no conversation fits max_seq_len {max_seq_len} with an assistant answer")
    rng = random.Random(seed)
    return [rendered[rng.randrange(len(rendered))] for _ in range(num_samples)]


def short_count(num_long: int, short_ratio: float, other_ratio: float = 0.0) -> int:
    """Mixed-in samples so that they make `short_ratio` of the stage's samples (0.4 -> 40% short) when another
    mix takes `other_ratio` (the short and the long-output mix: each counts with the other's ratio here)."""
    if short_ratio <= 0:
        return 0
    return round(num_long * short_ratio / (1.0 - short_ratio - other_ratio))


def read_long_output_mix(set_dir: str | Path, num_samples: int, max_seq_len: int, tokenizer_hash: str,
                         seed: int) -> list[Sample]:
    """`num_samples` samples of a long-output set (`ctxforge lengthen`'s final/: stage `long_output` in the sample
    contract, same checks as a stage's shards), each used once before any is repeated, in a seeded order.

    Raises DataError naming the set when no sample fits max_seq_len.
    """
    samples, stats = read_stage(set_dir, "long_output", max_seq_len, tokenizer_hash)
    if not samples:
        raise DataError(f"{set_dir}: no long-output sample fits max_seq_len {max_seq_len} ({stats})")
    order = random.Random(f"long_output:{seed}").sample(range(len(samples)), len(samples))
    return [Sample(s.sample_id, s.input_ids, s.loss_mask, source="long_output")
            for s in (samples[order[i % len(order)]] for i in range(num_samples))]


@dataclass
class StageSource:
    """A stage's samples as the loop sees them: long samples (streamed from `index`), then the short mix and
    the long-output mix (in memory, they are short). Sample k < len(index) is long sample k."""

    index: StageIndex
    short: list[Sample]
    long_output: list[Sample] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        return [int(n) for n in self.index.lengths] + [len(s) for s in self.short + self.long_output]

    @property
    def stats(self) -> dict:
        return {**self.index.stats, "short": len(self.short), "long_output": len(self.long_output)}

    def __len__(self) -> int:
        return len(self.index) + len(self.short) + len(self.long_output)

    def read(self, indices: list[int]) -> list[Sample]:
        n = len(self.index)
        mixed = self.short + self.long_output
        long = iter(self.index.read([k for k in indices if k < n]))
        return [next(long) if k < n else mixed[k - n] for k in indices]
