"""All-null columns that cost no memory: every one is a view of one shared zero buffer.

Most of a trace's ~70 columns are null in any given batch. ``pa.nulls`` allocates and
zeroes a fresh buffer per call, and on this kind of host every fresh page is a
page fault of several microseconds: building, merging and sealing batches spent
more time faulting in zeros than doing anything else. A null array only needs a
validity bitmap of zeros and zeroed (or empty) value buffers, so one zero buffer,
grown when a longer column is asked for, backs them all.
"""

from __future__ import annotations

import threading

import pyarrow as pa
from vsmtrace.recorder.arrays import column

#: Widest per-row buffer a null column needs (uint64 values, or int64 list offsets).
ROW_BYTES = 8
#: Rows the shared buffer holds at first (grown by doubling).
INITIAL_ROWS = 1 << 16
#: Null arrays kept for reuse, by (type, length), before the cache starts over.
CACHED_ARRAYS = 1024


class NullColumns:
    """Null arrays of any schema type and length, all backed by one zero buffer."""

    def __init__(self, rows: int = INITIAL_ROWS) -> None:
        self._lock = threading.Lock()
        self._rows = 0
        self._zero = pa.py_buffer(b"")
        self._empty: dict[pa.DataType, pa.Array] = {}
        #: Arrays are immutable, and a batch asks for the same (type, length) for many columns
        #: and kinds: building each again cost a third of turning Python rows into a batch.
        self._made: dict[tuple[pa.DataType, int], pa.Array] = {}
        self._grow(rows)

    def _grow(self, rows: int) -> None:
        # +1 row: offsets of variable-width types need length + 1 entries.
        self._zero = pa.py_buffer(bytes((rows + 1) * ROW_BYTES))
        self._rows = rows
        self._made = {}  # let the old buffer go

    def _buffer(self, n: int) -> pa.Buffer:
        """The zero buffer, grown to ``n`` rows if needed (the caller holds the lock)."""
        if n > self._rows:
            self._grow(max(n, 2 * self._rows))
        return self._zero

    def array(self, typ: pa.DataType, n: int, dictionary: pa.Array | None = None) -> pa.Array:
        """``n`` nulls of type ``typ`` (a dictionary type needs its ``dictionary``)."""
        with self._lock:
            if pa.types.is_dictionary(typ):
                zero = self._buffer(n)
                indices = pa.Array.from_buffers(typ.index_type, n, [zero, zero], null_count=n)
                values = dictionary if dictionary is not None else self._empty_of(typ.value_type)
                return pa.DictionaryArray.from_arrays(indices, values)
            made = self._made.get((typ, n))
            if made is None:
                zero = self._buffer(n)  # may start the cache over: look it up first, store after
                if len(self._made) >= CACHED_ARRAYS:
                    self._made = {}
                made = self._made[typ, n] = self._nulls(typ, n, zero)
            return made

    def _nulls(self, typ: pa.DataType, n: int, zero: pa.Buffer) -> pa.Array:
        if pa.types.is_binary(typ) or pa.types.is_string(typ):
            return pa.Array.from_buffers(typ, n, [zero, zero, zero.slice(0, 0)], null_count=n)
        if pa.types.is_list(typ):
            return pa.Array.from_buffers(typ, n, [zero, zero], null_count=n, children=[self._empty_of(typ.value_type)])
        return pa.Array.from_buffers(typ, n, [zero, zero], null_count=n)

    def empty(self, typ: pa.DataType) -> pa.Array:
        """An array of ``typ`` with no values (a list's child, an unused column's dictionary)."""
        with self._lock:
            return self._empty_of(typ)

    def _empty_of(self, typ: pa.DataType) -> pa.Array:
        """``empty`` for a caller that holds the lock: built once per type."""
        made = self._empty.get(typ)
        if made is None:
            made = self._empty[typ] = column([], typ)
        return made


#: The process-wide instance (the buffer is shared by every writer and seal).
NULLS = NullColumns()
