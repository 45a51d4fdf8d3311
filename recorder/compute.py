"""The Arrow compute functions a recording calls, from pyarrow's compute core.

``import pyarrow.compute`` generates a Python wrapper, with a parsed docstring, for each
of Arrow's ~300 compute functions: 25-40 ms of a recording's start-up on the
development host, for the five functions the writer calls. They are called here by
name through ``call_function``, the core those wrappers call (and so do ``Array.take``
and ``Array.cast``, which import ``pyarrow.compute`` on first use). Same functions, same
default options, same results; a pyarrow without the private core module falls back to
the public one.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

try:
    from pyarrow._compute import CastOptions, call_function
except ImportError:  # pragma: no cover - a pyarrow that moved its core
    from pyarrow.compute import CastOptions, call_function


def take(data: Any, indices: pa.Array) -> Any:
    """``data`` (array, chunked array or record batch) at ``indices``, like ``data.take(indices)``."""
    return call_function("take", [data, indices])


def sort_indices(values: Any) -> pa.Array:
    """Indices that sort ``values`` ascending; stable, like ``pc.sort_indices``."""
    return call_function("sort_indices", [values])


def value_counts(values: pa.Array) -> pa.StructArray:
    """Each distinct value and its count, in order of first appearance (``pc.value_counts``)."""
    return call_function("value_counts", [values])


def cumulative_sum_checked(values: pa.Array) -> pa.Array:
    """Running sums; ``pa.ArrowInvalid`` on overflow (``pc.cumulative_sum_checked``)."""
    return call_function("cumulative_sum_checked", [values])


def cast(values: pa.Array, to: pa.DataType) -> pa.Array:
    """A safe cast, like ``values.cast(to)``."""
    return call_function("cast", [values], CastOptions.safe(to))
