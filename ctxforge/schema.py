"""The sample contract between synthesis and training: one Parquet row per training sample.

Written by ctxforge.pipeline (samples/<stage>/part-*.parquet), read by ctxforge.train. Loads with
`datasets.load_dataset("parquet", data_files=...)` and `ray.data.read_parquet`.
"""

from __future__ import annotations

import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

SAMPLE_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),           # stable: hash of stage, seed and index
        ("stage", pa.string()),               # curriculum stage name, e.g. "180K"
        ("target_tokens", pa.int64()),        # the stage's maximum length; num_tokens <= target_tokens
        ("num_tokens", pa.int64()),
        ("num_loss_tokens", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),  # target tokenizer, chat template applied
        ("loss_mask", pa.list_(pa.int8())),   # 1 on assistant answer tokens (incl. end-of-turn), else 0
        ("messages", pa.list_(MESSAGE_TYPE)), # the conversation as text
        ("documents", pa.list_(pa.string())), # lineage: document ids in context order
        ("chunks", pa.list_(pa.string())),    # lineage: evidence chunk/summary ids of the asked QA
        ("qa_ids", pa.list_(pa.string())),    # lineage: QA ids in turn order
        ("num_questions", pa.int64()),
        ("ungrounded_questions", pa.int64()), # QA kept with grounding.on_ungrounded = flag
        ("tokenizer_hash", pa.string()),
    ]
)

SAMPLE_COLUMNS = tuple(SAMPLE_SCHEMA.names)


def missing_columns(schema: pa.Schema) -> list[str]:
    """Columns of the contract that a table's schema lacks (the training stage refuses such shards)."""
    return [name for name in SAMPLE_COLUMNS if name not in schema.names]
