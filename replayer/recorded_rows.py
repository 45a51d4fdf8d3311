"""The recorded rows of the events the emulation emitted, as replay compares them.

Each event the replayed emulation emits is checked against its recorded row: kind,
VP, VTL, RIP and every field it passes. Rows are grouped by kind and converted to
Python column by column, only for the kinds and columns replay compares; for each
set of fields an emit site passes, a kind's rows are turned once into tuples in
that order, so checking an event is one tuple comparison. Only when that differs
does the sink go field by field (to name the field, or to accept values that are
equal once normalised, such as an Enum and its value).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from vsmtrace.recorder.arrays import column as arrow_column
from vsmtrace.recorder.arrays import scalar
from vsmtrace.recorder.schema import KIND_FIELDS
from vsmtrace.vmm.events import EventKind

#: Fields that measure host time: they describe the run, not an emulation decision.
TIMING_FIELDS = frozenset({"duration_ns"})
#: Columns every emitted event is compared on, whatever its kind.
COMMON_COLUMNS = ("vp", "vtl", "rip")
#: The kind values this vsmtrace knows (an entry naming another cannot match anything replay emits).
KNOWN_KINDS = frozenset(int(kind) for kind in EventKind)


def pylist(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A column as Python values; dictionary columns through their value type (per-value dictionary lookups are slow)."""
    if pa.types.is_dictionary(column.type):
        column = pc.cast(column, column.type.value_type)
    return column.to_pylist()


@contextmanager
def paused_gc() -> Iterator[None]:
    """No collector passes while building many small acyclic objects (each pass would rescan them all)."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def kind_columns(kind: int) -> list[str]:
    """The columns replay compares for events of this kind."""
    columns: list[str] = ["seq", "kind", *COMMON_COLUMNS]
    return columns + [c for c in KIND_FIELDS[EventKind(kind)].values() if c not in columns]


@dataclass(slots=True)
class FieldSet:
    """A kind's recorded rows as (vp, vtl, rip, field...) tuples, for one emit site's field names."""

    rows: list[tuple[Any, ...]]
    #: The same fields of an emitted event, in the same order (host timings left out).
    values: Callable[[dict[str, Any]], tuple[Any, ...]]


def _getter(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    if len(names) > 1:
        return itemgetter(*names)  # a tuple of the values
    if names:
        one = itemgetter(names[0])
        return lambda fields: (one(fields),)
    return lambda fields: ()


class KindRows:
    """The recorded rows the entries say they emitted as events of one kind, with the columns converted so far."""

    def __init__(self, kind: int, table: pa.Table) -> None:
        """``table``: those rows, only the ones recorded as this kind (another kind goes the slow way, and diverges)."""
        self.kind_value = kind
        self.kind = EventKind(kind).name
        self.table = table
        #: seq -> row. Int to int, so the garbage collector never scans it, however long the trace.
        self.index: dict[int, int] = dict(zip(pylist(table.column("seq")), range(table.num_rows), strict=True))
        self.columns: dict[str, list[Any]] = {}
        self.field_sets: dict[tuple[str, ...], FieldSet] = {}

    def column(self, name: str) -> list[Any]:
        values = self.columns.get(name)
        if values is None:
            if name in self.table.column_names:
                values = pylist(self.table.column(name))
            else:  # a column this trace does not have: compared as null
                values = [None] * self.table.num_rows
            self.columns[name] = values
        return values

    def field_set(self, names: tuple[str, ...]) -> FieldSet:
        """The rows laid out for events that pass exactly ``names`` (built on first use)."""
        found = self.field_sets.get(names)
        if found is None:
            column_of = KIND_FIELDS[EventKind(self.kind_value)]
            kept = [name for name in names if name not in TIMING_FIELDS]
            with paused_gc():
                columns = [self.column(c) for c in COMMON_COLUMNS] + [self.column(column_of.get(n, n)) for n in kept]
                found = self.field_sets[names] = FieldSet(list(zip(*columns, strict=True)), _getter(kept))
        return found

    def row(self, index: int) -> LazyRow:
        return LazyRow(self, index)


class EmittedRows:
    """The recorded rows of the events the entries emitted, one group per kind the entries name."""

    def __init__(self, table: pa.Table, kinds: list[int], seqs: list[int], seq_is_row: bool) -> None:
        """``table`` has the columns of those kinds; ``kinds[i]`` and ``seqs[i]`` name one emitted event."""
        kind_array = arrow_column(kinds, pa.int64())
        seq_array = arrow_column(seqs, pa.int64())
        self.by_kind: dict[int, KindRows] = {}
        for kind in KNOWN_KINDS.intersection(kinds):
            chosen = pc.unique(seq_array.filter(pc.equal(kind_array, scalar(kind, pa.int64()))))
            if seq_is_row:
                positions = chosen.filter(pc.less(chosen, scalar(table.num_rows, pa.int64())))
            else:
                positions = pc.index_in(chosen, value_set=pc.cast(table.column("seq"), pa.int64())).drop_null()
            rows = table.select([c for c in kind_columns(kind) if c in table.column_names]).take(positions)
            recorded_as = pc.equal(pc.cast(rows.column("kind"), pa.string()), scalar(EventKind(kind).name, pa.string()))
            self.by_kind[kind] = KindRows(kind, rows.filter(recorded_as))


class LazyRow:
    """One recorded event, read-only, as the sink needs it: ``row[column]`` and ``row.get(column)``."""

    __slots__ = ("rows", "index")

    def __init__(self, rows: KindRows, index: int) -> None:
        self.rows = rows
        self.index = index

    def __getitem__(self, name: str) -> Any:
        if name == "kind":
            return self.rows.kind
        return self.rows.column(name)[self.index]

    def get(self, name: str, default: Any = None) -> Any:
        value = self[name]
        return default if value is None else value
