"""`vsmtrace export --format parquet`: a trace as one Parquet file, same columns, types and metadata.

For engines that read Parquet but not Arrow IPC files (DuckDB's ``read_parquet``,
Spark, most data warehouses). The Arrow schema travels in the Parquet file, so
unsigned 64-bit columns (``rip``, ``value``, ``gpa``...) stay unsigned, dictionary
columns stay dictionaries, and the ``vsmtrace`` metadata key is there as in the
trace. Batches are written one at a time: memory stays at one batch, not the trace.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from vsmtrace.recorder.reader import Trace

#: Rows per Parquet row group: big enough for good compression, small enough to stream.
ROW_GROUP_ROWS = 1 << 20


def export_parquet(trace: Trace, path: str | os.PathLike[str], on_batch: Callable[[int], object] | None = None) -> int:
    """Write every complete event of ``trace`` to ``path`` atomically (temp file + rename); returns the event count."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    # A sealed trace has one dictionary per column; a stream's batches grow theirs, and
    # Parquet wants one type per column, which dictionary<int32, string> is in every batch.
    try:
        with pq.ParquetWriter(tmp, trace.schema, compression="zstd", store_schema=True) as w:
            pending: list[pa.RecordBatch] = []
            rows = 0
            for batch in trace.batches():
                if batch.num_rows == 0:
                    continue
                pending.append(batch)
                rows += batch.num_rows
                if rows >= ROW_GROUP_ROWS:
                    w.write_table(pa.Table.from_batches(pending, schema=trace.schema), row_group_size=ROW_GROUP_ROWS)
                    n += rows
                    if on_batch is not None:
                        on_batch(rows)
                    pending, rows = [], 0
            if pending:
                w.write_table(pa.Table.from_batches(pending, schema=trace.schema), row_group_size=ROW_GROUP_ROWS)
                n += rows
                if on_batch is not None:
                    on_batch(rows)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n
