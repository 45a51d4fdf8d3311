"""``load``: one LazyFrame over every event of a trace, whatever was handed in."""

from __future__ import annotations

import os
from functools import cache
from typing import Union

import polars as pl
import pyarrow as pa
from vsmtrace.recorder.nulls import NULLS
from vsmtrace.recorder.reader import Trace, open_trace
from vsmtrace.recorder.schema import arrow_schema

TraceLike = Union[str, "os.PathLike[str]", Trace, pl.LazyFrame, pl.DataFrame]


@cache
def _full_schema() -> pl.Schema:
    """Polars types of every schema column (as a sealed trace reads them).

    The empty columns come from the recorder's null columns: ``Schema.empty_table`` goes through
    ``pa.array``, which imports pandas (0.2-0.3 s of every analysis command).
    """
    schema = arrow_schema()
    empty = pa.Table.from_arrays([NULLS.array(f.type, 0) for f in schema], schema=schema)
    return pl.from_arrow(empty).schema  # type: ignore[union-attr]


def load(trace: TraceLike) -> pl.LazyFrame:
    """A LazyFrame over all events (sealed traces are scanned from disk, not read).

    Accepts a path, an opened ``Trace`` or a frame. Columns a trace lacks (written before
    an additive schema column existed) are added as typed nulls, so every derived table
    can name every column. Raises ``recorder.errors.TraceFormatError`` for non-traces.
    """
    if isinstance(trace, pl.LazyFrame):
        lf = trace
    elif isinstance(trace, pl.DataFrame):
        lf = trace.lazy()
    elif isinstance(trace, Trace):
        lf = trace.lazy()
    else:
        lf = open_trace(trace).lazy()
    have = lf.collect_schema()
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in _full_schema().items() if name not in have]
    return lf.with_columns(missing) if missing else lf
