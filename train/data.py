"""Training data: read a stage's sample shards, refuse bad input, mix in short chat data.

Reads the synthesis contract (`ctxforge.schema.SAMPLE_SCHEMA`): `samples/<stage>/part-*.parquet` and
`manifest.json`. Every shard is checked before any worker starts: the contract's columns, the
tokenizer hash (it must be the training model's), and each sample's length against the stage's
`max_seq_len` (dropped and counted, or an error when `strict`). A short-data mix (ProLong) is read from
a user JSONL/Parquet chat dataset with a `messages` column and rendered with the same chat template
code the synthesis stage uses, so its loss mask means the same thing.

Batching (packs, sorted batches) lives in `batching.py`; this module only yields samples.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ctxforge.schema import missing_columns

READ_COLUMNS = ["sample_id", "stage", "num_tokens", "input_ids", "loss_mask", "tokenizer_hash"]


class DataError(ValueError):
    """Bad training input; the message names the file and what is wrong with it."""


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


@dataclass
class StageData:
    samples: list[Sample]
    files: list[str]
    stats: dict = field(default_factory=dict)


def stage_shards(input_dir: str | Path, stage: str) -> list[Path]:
    """The Parquet shards of one synthesis stage, named by the manifest when there is one."""
    root = Path(input_dir).expanduser()
    folder = root / "samples" / stage
    manifest = root / "manifest.json"
    if manifest.is_file():
        stages = json.loads(manifest.read_text(encoding="utf-8")).get("stages", {})
        if stage not in stages:
            raise DataError(f"{manifest}: no stage {stage!r} in the synthesis output (stages: {', '.join(stages) or 'none'})")
        files = stages[stage].get("files")
        if files:
            return [folder / name for name in files]
    shards = sorted(folder.glob("part-*.parquet"))
    if not shards:
        raise DataError(f"{folder}: no part-*.parquet shards for stage {stage!r}")
    return shards


def check_shard_schema(path: Path) -> None:
    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    missing = missing_columns(schema)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} of the sample contract (ctxforge.schema); "
                        f"was it written by `ctxforge synth`?")


def read_stage(input_dir: str | Path, stage: str, max_seq_len: int, tokenizer_hash: str,
               strict: bool = False) -> StageData:
    """All samples of a synthesis stage that fit `max_seq_len`, after the contract checks."""
    files = stage_shards(input_dir, stage)
    samples: list[Sample] = []
    stats = {"read": 0, "dropped_too_long": 0, "dropped_no_target": 0, "longest_dropped": 0}
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: listed for stage {stage!r} but missing")
        check_shard_schema(path)
        table = pq.read_table(path, columns=READ_COLUMNS)
        hashes = set(table.column("tokenizer_hash").to_pylist())
        wrong = sorted(h for h in hashes if h != tokenizer_hash)
        if wrong:
            raise DataError(f"{path}: samples were tokenized with tokenizer hash {', '.join(wrong)}, but the model's "
                            f"tokenizer hashes to {tokenizer_hash}; re-run synthesis with this model's tokenizer "
                            f"(target.tokenizer) or train the model the data was made for")
        for row in table.to_pylist():
            stats["read"] += 1
            n = int(row["num_tokens"])
            if n > max_seq_len:
                if strict:
                    raise DataError(f"{path}: sample {row['sample_id']} has {n} tokens, more than the stage's "
                                    f"max_seq_len {max_seq_len} (data.strict=true; set it false to drop such samples)")
                stats["dropped_too_long"] += 1
                stats["longest_dropped"] = max(stats["longest_dropped"], n)
                continue
            sample = Sample(row["sample_id"], np.asarray(row["input_ids"], dtype=np.int64),
                            np.asarray(row["loss_mask"], dtype=np.int8))
            if len(sample) != n or len(sample.loss_mask) != n:
                raise DataError(f"{path}: sample {row['sample_id']}: num_tokens {n} but {len(sample)} input_ids and "
                                f"{len(sample.loss_mask)} loss_mask entries")
            if sample.num_targets == 0:
                stats["dropped_no_target"] += 1
                continue
            samples.append(sample)
    stats["kept"] = len(samples)
    return StageData(samples=samples, files=[str(f) for f in files], stats=stats)


def _read_chat_rows(path: Path) -> list[list[dict]]:
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    else:
        raise DataError(f"{path}: short data must be .jsonl or .parquet with a 'messages' column")
    convs = []
    for n, row in enumerate(rows):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not any(m.get("role") == "assistant" for m in msgs):
            raise DataError(f"{path}: row {n} has no 'messages' list with an assistant turn")
        convs.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    return convs


def read_short_mix(path: str | Path, tokenizer, num_samples: int, max_seq_len: int, seed: int) -> list[Sample]:
    """`num_samples` short chat samples (drawn with replacement when the file has fewer), answer-only mask."""
    from ctxforge.pipeline.render import render_conversation

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: short-data file not found")
    convs = _read_chat_rows(path)
    rendered = []
    for n, conv in enumerate(convs):
        ids, mask = render_conversation(conv, tokenizer)
        if len(ids) <= max_seq_len and sum(mask[1:]):
            rendered.append(Sample(f"short-{n}", np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8),
                                   source="short"))
    if not rendered:
        raise DataError(f"{path}: no conversation fits max_seq_len {max_seq_len} with an assistant answer")
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
    contract, same checks as a stage's shards), each used once before any is repeated, in a seeded order."""
    data = read_stage(set_dir, "long_output", max_seq_len, tokenizer_hash)
    if not data.samples:
        raise DataError(f"{set_dir}: no long-output sample fits max_seq_len {max_seq_len} ({data.stats})")
    order = random.Random(f"long_output:{seed}").sample(range(len(data.samples)), len(data.samples))
    return [Sample(s.sample_id, s.input_ids, s.loss_mask, source="long_output")
            for s in (data.samples[order[i % len(order)]] for i in range(num_samples))]
