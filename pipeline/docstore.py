"""Documents and their QA on disk, addressed by Parquet row group, so no process holds the whole corpus.

`DocumentStore` indexes the documents table (work/documents/, written by Ray Data) by doc_id: which
file, row group and row hold the document's kept copy (the first in input order, as
`select_documents` keeps it). The driver loads the texts of the documents it is working on; render
workers load the ones their samples need. A small cache keeps the last row groups read, since
neighbouring documents usually share one.

`QAWriter` writes the QA table (qa/qa.parquet) in document order while documents finish in any order:
a finished document waits in a buffer (its QA records only, not its text) until every earlier one is
written. Row groups end at document boundaries, and the index (doc_id -> row group) lets a render
worker read only the row groups of its documents.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ctxforge.pipeline.documents import doc_state
from ctxforge.pipeline.hierarchy import DocState
from ctxforge.pipeline.records import DocumentQA, QARecord, SectionBound

QA_SCHEMA = pa.schema([
    ("qa_id", pa.string()), ("doc_id", pa.string()), ("kind", pa.string()), ("qtype", pa.string()),
    ("order", pa.int64()), ("question", pa.string()), ("answer", pa.string()),
    ("evidence_ids", pa.list_(pa.string())), ("evidence_quote", pa.string()), ("grounded", pa.bool_()),
    ("grounding_score", pa.float64()), ("parent_qa_id", pa.string()), ("request_id", pa.string()),
    ("quote_grounded", pa.bool_()), ("grounding_basis", pa.string()), ("answer_support", pa.float64()),
    ("judge", pa.string()), ("evidence_quotes", pa.list_(pa.string())), ("section_end", pa.int64()),
])
DOC_COLUMNS = ["doc_id", "title", "text", "n_tokens", "chunks", "sections"]


@dataclass(frozen=True)
class Location:
    file: str
    row_group: int
    row: int


class _RowGroups:
    """The last few row groups read, by (file, row group)."""

    def __init__(self, columns: list[str], keep: int = 4):
        self.columns = columns
        self.keep = keep
        self.cache: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()

    def get(self, file: str, row_group: int) -> pa.Table:
        key = (file, row_group)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        table = pq.ParquetFile(file).read_row_group(row_group, columns=self.columns)
        self.cache[key] = table
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return table


class DocumentStore:
    """doc_id -> Location in the documents table; loads DocStates (driver) or raw rows (workers)."""

    def __init__(self, locations: dict[str, Location]):
        self.locations = locations
        self._groups = _RowGroups(DOC_COLUMNS)

    @classmethod
    def index(cls, table: Path) -> "DocumentStore":
        """Scan the table's small columns once; the kept copy of a doc_id is its first in (source, line) order."""
        best: dict[str, tuple[tuple, Location]] = {}
        for file in sorted(str(f) for f in Path(table).glob("*.parquet")):
            pf = pq.ParquetFile(file)
            for rg in range(pf.num_row_groups):
                cols = pf.read_row_group(rg, columns=["doc_id", "source", "line", "skip_reason"]).to_pydict()
                for i, (doc_id, source, line, skip) in enumerate(zip(cols["doc_id"], cols["source"], cols["line"],
                                                                     cols["skip_reason"])):
                    if skip:
                        continue
                    order = (source, line)
                    if doc_id not in best or order < best[doc_id][0]:
                        best[doc_id] = (order, Location(file, rg, i))
        return cls({doc_id: loc for doc_id, (_, loc) in best.items()})

    def row(self, doc_id: str) -> dict:
        loc = self.locations[doc_id]
        return self._groups.get(loc.file, loc.row_group).slice(loc.row, 1).to_pylist()[0]

    def load(self, doc_ids: Iterable[str]) -> Iterator[DocState]:
        for doc_id in doc_ids:
            yield doc_state(self.row(doc_id))


@dataclass(frozen=True)
class QAIndex:
    """Where each document's QA are in the QA table (documents without QA are absent)."""

    path: str
    row_groups: dict[str, int]


class QAWriter:
    """Writes QA records in document-rank order as documents finish in any order (see module doc)."""

    def __init__(self, path: Path, rows_per_group: int = 4096):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.writer = pq.ParquetWriter(str(self.tmp), QA_SCHEMA)
        self.rows_per_group = rows_per_group
        self.pending: dict[int, tuple[str, list[QARecord]]] = {}
        self.next_rank = 0
        self.rows: list[dict] = []
        self.docs_in_group: list[str] = []
        self.groups_written = 0
        self.row_groups: dict[str, int] = {}
        self.records = 0

    def add(self, rank: int, doc_id: str, records: list[QARecord]) -> None:
        self.pending[rank] = (doc_id, records)
        while self.next_rank in self.pending:
            doc_id, recs = self.pending.pop(self.next_rank)
            self.next_rank += 1
            if recs:
                self.rows.extend(asdict(r) for r in recs)
                self.docs_in_group.append(doc_id)
            if len(self.rows) >= self.rows_per_group:
                self._flush()

    def buffered(self) -> int:
        """Finished documents waiting for an earlier one."""
        return len(self.pending)

    def _flush(self) -> None:
        if not self.rows:
            return
        self.writer.write_table(pa.Table.from_pylist(self.rows, schema=QA_SCHEMA), row_group_size=len(self.rows))
        for doc_id in self.docs_in_group:
            self.row_groups[doc_id] = self.groups_written
        self.records += len(self.rows)
        self.groups_written += 1
        self.rows, self.docs_in_group = [], []

    def close(self) -> QAIndex:
        if self.pending:
            raise RuntimeError(f"QA of documents {sorted(self.pending)[:5]}... written before document {self.next_rank}")
        self._flush()
        self.writer.close()
        os.replace(self.tmp, self.path)
        return QAIndex(str(self.path), dict(self.row_groups))


class SampleSource:
    """What a render worker reads: documents with their QA, from the two tables, by doc_id.

    Workers learn the locations of the documents they need with each piece of work (`add`), so no
    process but the driver holds the whole index.
    """

    def __init__(self, documents: dict[str, Location], qa: QAIndex, keep: int = 64):
        self.docs = DocumentStore(dict(documents))
        self.qa = QAIndex(qa.path, dict(qa.row_groups))
        self.qa_groups: OrderedDict[int, dict[str, list[dict]]] = OrderedDict()
        self.cache: OrderedDict[str, DocumentQA] = OrderedDict()
        self.keep = keep

    def _qa_rows(self, group: int) -> dict[str, list[dict]]:
        if group not in self.qa_groups:
            by_doc: dict[str, list[dict]] = {}
            for rec in pq.ParquetFile(self.qa.path).read_row_group(group).to_pylist():
                by_doc.setdefault(rec["doc_id"], []).append(rec)
            self.qa_groups[group] = by_doc
            while len(self.qa_groups) > 2:
                self.qa_groups.popitem(last=False)
        self.qa_groups.move_to_end(group)
        return self.qa_groups[group]

    def add(self, documents: dict[str, Location], qa_row_groups: dict[str, int]) -> None:
        self.docs.locations.update(documents)
        self.qa.row_groups.update(qa_row_groups)

    def get(self, doc_id: str) -> DocumentQA:
        if doc_id in self.cache:
            self.cache.move_to_end(doc_id)
            return self.cache[doc_id]
        row = self.docs.row(doc_id)
        lists: dict[str, list[QARecord]] = {"hierarchical": [], "diverse": [], "summary": []}
        group = self.qa.row_groups.get(doc_id)
        if group is not None:
            for rec in self._qa_rows(group).get(doc_id, []):   # in the order they were assembled
                lists[rec["kind"]].append(QARecord(**rec))
        bounds = [SectionBound(s["index"], s["char_end"], s["token_end"]) for s in json.loads(row["sections"] or "[]")]
        doc = DocumentQA(doc_id, row["title"] or doc_id, row["text"], int(row["n_tokens"]), lists["hierarchical"],
                         lists["diverse"], lists["summary"], bounds)
        self.cache[doc_id] = doc
        while len(self.cache) > self.keep:
            self.cache.popitem(last=False)
        return doc
