"""TraceWriter: the recorder's EventSink. Cheap to call from VP threads, safe to kill.

Hot paths: port-I/O and MMIO events, the bulk of most traces, go through
``record_io``: one C call into the trace's event store (``recorder.store``) that
appends the raw values to preallocated columns, which later become Arrow arrays
without a copy. Every other kind goes through ``emit``, which validates field names
against the schema (a typo must not drop data silently) and appends one tuple to a
pending list. Both take ``seq`` and ``time_ns`` from the store under its mutex, so
events of all VPs keep one total order with time non-decreasing in it. No Arrow
object is built per event.

When ``batch_rows`` events are pending or the oldest is ``max_age_s / 2`` old, the
emitting thread (or, when VPs are quiet, a background flusher) takes every pending
event: Python rows are transposed into columns, the store's chunks wrapped as they
are. A writer thread merges the two by ``seq``, compresses the batch and hands it
to the kernel with one ``write`` call, without the GIL. A process killed at any
moment therefore leaves an Arrow IPC stream whose complete batches are all
readable (see ``recorder.reader``).

``close()`` flushes, ends the stream, then *seals* it: the stream is rewritten as an
Arrow IPC file (coalesced batches, final dictionaries, footer) into ``PATH.sealing``
and atomically renamed over ``PATH``. A crash during sealing leaves the complete
stream at ``PATH``.
"""

from __future__ import annotations

import json
import operator
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
from vsmtrace.recorder import compute
from vsmtrace.recorder.arrays import column
from vsmtrace.recorder.errors import TraceError
from vsmtrace.recorder.metadata import build_metadata
from vsmtrace.recorder.nulls import NULLS
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.schema import (
    COLUMN_BY_NAME,
    COLUMNS,
    COMMON_COLUMNS,
    FIELD_COLUMNS,
    KIND_DICTIONARY,
    KIND_FIELDS,
    METADATA_KEY,
    Column,
    arrow_schema,
)
from vsmtrace.recorder.store import EventStore
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.host_sched import helper_thread_policy

_KIND_BY_VALUE = {k.value: k for k in EventKind}
#: Per kind, the emit field names it accepts (what ``emit`` checks on every call).
_ALLOWED: dict[EventKind, frozenset[str]] = {k: frozenset(f) for k, f in KIND_FIELDS.items()}
monotonic_ns = time.monotonic_ns
_SEQ = operator.itemgetter(0)

#: Busy VPs flush inline once the oldest pending event is this fraction of ``max_age_s`` old...
INLINE_AGE_FRACTION = 0.5
#: ... the background flusher, when VPs are quiet, at this fraction.
FLUSHER_AGE_FRACTION = 0.6
#: ... and at this one when C fast paths recorded operations (native records), whose VP threads
#: stay in the guest: the flusher expands and writes them on its own core before they are old
#: enough (INLINE_AGE_FRACTION) to make C hand the next one to Python, which would flush inline.
NATIVE_AGE_FRACTION = 0.25
#: Pending events beyond this many batches make emitters wait for the writer (backpressure).
LATE_BATCHES = 4
#: How often a thread waiting for the writer thread checks that it is still alive.
WRITER_POLL_S = 0.5
#: Codec of the batches written while recording. lz4 costs a third of zstd's CPU per batch
#: (~130 small buffers each, most of them nulls); sealing recompresses with zstd, so a
#: sealed trace is as small either way and only a killed recording's stream is bigger.
STREAM_COMPRESSION = "lz4"
#: A trace of at most this many events keeps its written batches in memory, so sealing it
#: need not read the stream back (null columns are shared, so they cost little).
KEEP_ROWS = 1 << 16

#: A pending Python-built event: (seq, time_ns, kind, vp, vtl, rip, fields).
Row = tuple[int, int, Any, Any, Any, Any, dict[str, Any]]
#: An event a native record stands for, as a decoder gives it: (kind, vp, vtl, rip, fields).
NativeEvent = tuple[EventKind, int, int, int | None, dict[str, Any]]
#: Expands one native record (``recorder.store.NativeRecord``) into its events, in seq order.
NativeDecoder = Callable[[tuple[int, ...]], list[NativeEvent]]


@dataclass
class WriterStats:
    """Counters for the bench, ``vsmtrace record`` summaries and tests."""

    events: int = 0  # events taken from the store so far (= next seq once flushed)
    dropped: int = 0  # emitted after recording stopped on an error
    batches: int = 0  # record batches written (excluding the initial empty one)
    flushed_events: int = 0  # events whose batch has been handed to the kernel
    bytes_written: int = 0
    value_errors: int = 0  # field values that did not fit their column (stored as null)
    first_value_error: str | None = None
    max_flush_lag_s: float = 0.0  # worst age of an event when its batch reached the kernel
    seal_seconds: float = 0.0


@dataclass
class _Taken:
    """Events taken in one flush, for the writer thread: the seq range [cutoff - count, cutoff)."""

    python: pa.RecordBatch | None  # Python-built rows, in seq order
    hot: list[pa.RecordBatch]  # store chunks, in seq order
    first_ns: int  # time_ns of the oldest event (for max_flush_lag_s)
    count: int
    written: threading.Event = field(default_factory=threading.Event)  # set by the writer thread when done


class _Dictionary:
    """An append-only string dictionary: indices stay valid, so batches only ever grow it."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.values: list[str] = []
        self._array: pa.Array | None = None

    def code(self, value: str) -> int:
        i = self.index.get(value)
        if i is None:
            if not isinstance(value, str):
                raise TypeError(f"expected str, got {type(value).__name__}")
            i = self.index[value] = len(self.values)
            self.values.append(value)
            self._array = None
        return i

    def array(self) -> pa.Array:
        """The dictionary so far (cached until it grows: every batch of a flush shares one)."""
        arr = self._array
        if arr is None or len(arr) != len(self.values):
            arr = self._array = column(self.values, pa.string())
        return arr


def _os_reason(e: OSError) -> str:
    """``[Errno 28] No space left on device`` from Python's or pyarrow's OSError."""
    if e.errno:
        return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _coerce(col: Column, value: Any) -> Any:
    """Lenient per-cell conversion used only when a whole-column conversion failed."""
    t = col.type
    if pa.types.is_boolean(t):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise TypeError(f"expected bool, got {value!r}")
    if pa.types.is_integer(t):
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError(f"expected int, got {value!r}")
        return int(value.__index__())
    if pa.types.is_binary(t):
        return bytes(memoryview(value))
    if pa.types.is_string(t):
        if isinstance(value, str):
            return value
        raise TypeError(f"expected str, got {type(value).__name__}")
    return value


class TraceWriter:
    """Record events into an Arrow IPC trace at ``path``; implements ``vmm.events.EventSink``.

    Raises ``TraceError`` right away if the destination cannot be written, so the VMM
    can refuse to start the guest. A write error later (e.g. ENOSPC) stops recording:
    ``enabled`` turns False, ``error`` holds a ``TraceError``, ``on_error`` is called
    once, and what was recorded so far stays readable.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        metadata: Mapping[str, Any] | None = None,
        *,
        batch_rows: int = 16384,
        max_age_s: float = 0.2,
        compression: str | None = STREAM_COMPRESSION,
        compression_level: int | None = None,
        on_error: Callable[[TraceError], None] | None = None,
        seal: bool = True,
        min_free_bytes: int = 16 << 20,
        fsync_on_close: bool = True,
    ) -> None:
        if batch_rows < 1 or max_age_s <= 0:
            raise ValueError("batch_rows must be >= 1 and max_age_s > 0")
        self.path = Path(path)
        self.batch_rows = batch_rows
        self.max_age_s = max_age_s
        self.on_error = on_error
        self.seal = seal
        self.fsync_on_close = fsync_on_close
        self.enabled = True
        self.error: TraceError | None = None
        self.sealed = False
        self.seal_error: str | None = None
        self.stats = WriterStats()

        self._t0 = time.monotonic_ns()
        self.metadata = build_metadata(metadata, self._t0)
        self.schema = arrow_schema(self.metadata)
        self._lock = threading.Lock()  # guards _rows, _closing and stamping (so a take is a consistent cut)
        self._write_lock = threading.Lock()  # serialises takes and batch building
        self._wake = threading.Event()
        self._rows: list[Row] = []
        self._closing = False
        self._closed = False
        # Busy VPs flush inline at half the age limit; far too many pending events make them wait.
        self._store = EventStore(
            self._t0,
            chunk_rows=batch_rows,
            due_rows=batch_rows,
            late_rows=batch_rows * LATE_BATCHES,
            due_age_ns=int(max_age_s * INLINE_AGE_FRACTION * 1e9),
        )
        self._late = self._store.LATE
        self._stamp, self._stamp_out = self._store.stamp_call()
        #: The PIO/MMIO fast path (``vmm.events.EventSink.record_io``): one C call per event.
        self.record_io = self._store.io
        #: The same from C: (function address, argument) of the store's append (``EventSink.native_io``).
        self.native_io = self._store.native_io()
        #: (function address, argument) with which a C fast path records an operation it performed
        #: (``recorder.store``); ``register_native`` says how such a record becomes events.
        self.native_record = self._store.native_record()
        #: The emulation's entry numbering (``vmm.emulation_io.Boundary``), shared with native records.
        self.entry_order = self._store.order
        self._native_decoders: dict[int, NativeDecoder] = {}
        self._dicts = {c.name: _Dictionary() for c in FIELD_COLUMNS if c.is_dictionary}
        self._queued: _Taken | None = None  # the last batch handed to the writer thread
        self._used: set[str] = set()  # columns written with a non-null value (what sealing must decode)
        self._kept: list[pa.RecordBatch] | None = []  # every batch written, while there are few (KEEP_ROWS)
        self._kept_rows = 0
        self._building = False  # a batch is being built: emitters wait at the gate
        self._gate = threading.Event()
        self._gate.set()

        self._check_destination(min_free_bytes)
        try:
            # OSFile writes straight to the kernel from C++ (no Python callbacks, no GIL
            # handoffs per buffer); what a killed process leaves is a torn tail at worst.
            self._file = pa.OSFile(str(self.path), "wb")
        except OSError as e:
            raise TraceError(f"cannot create trace {self.path}: {_os_reason(e)}") from None
        codec = None if compression is None else pa.Codec(compression, compression_level)
        try:
            self._ipc = ipc.new_stream(
                self._file,
                self.schema,
                # Compress on the writer thread itself: handing ~130 small buffers a batch to Arrow's
                # thread pool cost more CPU than it saved, on cores the VPs need.
                options=ipc.IpcWriteOptions(compression=codec, emit_dictionary_deltas=True, use_threads=False),
            )
            # Write the schema (and empty dictionaries) now: proves the file is writable before
            # the guest starts, and makes even an event-less trace a valid, self-describing file.
            self._ipc.write_batch(self._build_batch([]))
            self.stats.bytes_written = self._file.tell()
        except OSError as e:
            self._file.close()
            raise TraceError(f"cannot write trace {self.path}: {_os_reason(e)}") from None
        self._batches: queue.Queue[_Taken | None] = queue.Queue()
        self._writer_thread = threading.Thread(target=self._writer, name=f"trace-writer:{self.path.name}", daemon=True)
        self._writer_thread.start()
        self._thread = threading.Thread(target=self._flusher, name=f"trace-flusher:{self.path.name}", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None, **kwargs: Any) -> TraceWriter:
        """Alias of the constructor that reads well at call sites: ``TraceWriter.open(path, md)``."""
        return cls(path, metadata, **kwargs)

    def _check_destination(self, min_free_bytes: int) -> None:
        parent = self.path.parent
        if not parent.exists():
            raise TraceError(f"cannot record to {self.path}: directory {parent} does not exist")
        if not parent.is_dir():
            raise TraceError(f"cannot record to {self.path}: {parent} is not a directory")
        if self.path.is_dir():
            raise TraceError(f"cannot record to {self.path}: it is a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TraceError(f"cannot record to {self.path}: directory {parent} is not writable")
        try:
            st = os.statvfs(parent)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if free < min_free_bytes:
            raise TraceError(
                f"cannot record to {self.path}: only {free >> 20} MiB free on its filesystem (need {min_free_bytes >> 20} MiB)"
            )

    # ------------------------------------------------------------------ hot paths

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int | None:
        """Record one event and return its sequence number (None if recording is off).

        Unknown kinds or field names raise ``TypeError`` at the call site.
        """
        if not self.enabled:
            if self.error is not None:
                self.stats.dropped += 1
            return None
        allowed = _ALLOWED.get(kind)  # type: ignore[call-overload]
        if allowed is None or (fields and not allowed.issuperset(fields)):
            self._reject(kind, fields)
        if self._building:
            self._gate.wait()
        out = self._stamp_out
        with self._lock:  # also serialises the use of ``out``
            status = self._stamp(out)
            if status < 0:  # closing (or stopped on an error)
                return None
            seq = out[0]
            self._rows.append((seq, out[1], kind, vp, vtl, rip, fields))
        if status:
            self.flush_due(status)
        return seq

    def flush_due(self, status: int) -> None:
        """Flush after an event whose stamp reported ``status`` (DUE or LATE; see ``recorder.store``).

        A full batch is written unless another thread is at it; old events (LATE) make
        the caller wait for the writer: backpressure, so no event outlives max_age_s
        in memory. Busy VPs flush inline because a background thread would wait for
        the GIL behind them and fall seconds behind.
        """
        if status > 0:
            self._flush_pending(blocking=status == self._late, only_if_due=True)

    def register_native(self, tag: int, decoder: NativeDecoder) -> None:
        """Native records whose first word is ``tag`` become the events ``decoder`` gives (at flush, off the
        VP thread): the C fast path that writes them and the decoder are one definition, kept by one owner."""
        self._native_decoders[tag] = decoder

    def _native_rows(self, natives: list[tuple[int, ...]]) -> list[Row]:
        """The events the taken native records stand for, as Python-built rows (seqs and time from the record)."""
        rows: list[Row] = []
        for record in natives:
            seq, time_ns, _order, tag = record[:4]
            decoder = self._native_decoders.get(tag)
            if decoder is None:
                raise TraceError(f"a C fast path recorded an operation of unknown tag {tag} (event {seq})")
            for i, (kind, vp, vtl, rip, fields) in enumerate(decoder(record)):
                if not _ALLOWED[kind].issuperset(fields):
                    self._reject(kind, fields)
                rows.append((seq + i, time_ns, kind, vp, vtl, rip, fields))
        return rows

    def set_manual_time(self, time_ns: int) -> None:
        """Stamp later events ``time_ns`` ns after the start instead of reading the clock.

        For synthetic traces with hand-countable times (``analysis.synthetic``); pass a huge
        ``max_age_s`` too, or age-triggered flushes would compare fake and real time.
        """
        self._store.set_manual_time(time_ns)

    @staticmethod
    def _reject(kind: Any, fields: Mapping[str, Any]) -> None:
        k = _KIND_BY_VALUE.get(kind) if isinstance(kind, int) else None
        if k is None:
            raise TypeError(f"emit: unknown event kind {kind!r}")
        bad = sorted(set(fields) - KIND_FIELDS[k].keys())
        raise TypeError(f"emit({k.name}): unknown field(s) {', '.join(bad)}; allowed: {', '.join(sorted(KIND_FIELDS[k]))}")

    # ------------------------------------------------------------------ flushing

    def _flusher(self) -> None:
        """Background loop: flush what a VP left pending once it is 0.6 x max_age old (0.25 x with native records)."""
        quiet_ns = int(self.max_age_s * FLUSHER_AGE_FRACTION * 1e9)
        native_ns = int(self.max_age_s * NATIVE_AGE_FRACTION * 1e9)
        helper_thread_policy()
        while True:
            with self._lock:
                if self._closing:
                    return
            oldest = self._store.oldest()
            if oldest is not None:
                age_ns = monotonic_ns() - self._t0 - oldest
                natives = self._store.native_count() > 0
                deadline_ns = native_ns if natives else quiet_ns
                if age_ns >= deadline_ns:
                    self._flush_pending(blocking=False, only_if_due=not natives)
                    continue
                timeout = (deadline_ns - age_ns) / 1e9
            else:
                timeout = self.max_age_s / 4
            self._wake.wait(timeout)
            self._wake.clear()

    def _flush_pending(self, blocking: bool = True, only_if_due: bool = False) -> None:
        """Take every pending event and queue it for the writer thread.

        Non-blocking callers skip if another thread is already flushing. ``only_if_due``
        re-checks the size/age trigger after getting the lock, so threads that queued
        behind a flush do not each write a tiny batch. Taking under ``_lock`` makes the
        cut consistent: every Python row stamped before it is in ``_rows``, and the
        store hands over every C event stamped before it.
        """
        if not self._write_lock.acquire(blocking):
            return
        try:
            with self._lock:
                if only_if_due and self._store.due() <= 0:
                    return
                first_ns = self._store.oldest()
                rows, self._rows = self._rows, []
                chunks, cutoff, natives = self._store.take()
            count = cutoff - self.stats.events
            self.stats.events = cutoff
            if not count or first_ns is None or self.error is not None or self._file.closed:
                return
            try:
                if natives:  # expanded here, before the gate closes: VP threads go on meanwhile
                    rows += self._native_rows(natives)
                    rows.sort(key=_SEQ)
                py_batch = None
                if rows:
                    # Building is pure Python + short GIL-releasing Arrow calls; with VP threads
                    # competing it would crawl, so they wait at the gate for these milliseconds.
                    self._gate.clear()
                    self._building = True
                    try:
                        py_batch = self._build_batch(rows)
                    finally:
                        self._building = False
                        self._gate.set()
                hot = [self._hot_batch(c) for c in chunks if c.n]
                previous = self._queued
                if blocking and previous is not None:
                    # Old events are being flushed: if the writer thread has not even written the
                    # previous batch (starved of CPU), wait for it, so the backlog stays bounded.
                    while not previous.written.wait(WRITER_POLL_S) and self._writer_thread.is_alive():
                        pass
                # Merging, compressing and writing run on the writer thread (Arrow releases the
                # GIL for all three), so the VP thread that took the events goes back to its guest.
                self._queued = _Taken(py_batch, hot, first_ns, count)
                self._batches.put(self._queued)
            except Exception as e:  # a recorder bug: stop recording, never kill the VP thread
                self._fail(e)
        finally:
            self._write_lock.release()

    def _hot_batch(self, chunk: Any) -> pa.RecordBatch:
        """A full-schema batch over a store chunk: its columns zero-copy, every other column null."""
        arrays = self._store.chunk_arrays(chunk)
        n = len(arrays["seq"])
        arrays["kind"] = pa.DictionaryArray.from_arrays(arrays["kind"], KIND_DICTIONARY)
        columns = []
        for c in COLUMNS:
            arr = arrays.get(c.name)
            if arr is None:
                arr = NULLS.array(c.type, n, self._dicts[c.name].array() if c.is_dictionary else None)
            columns.append(arr)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _merge(self, taken: _Taken) -> list[pa.RecordBatch]:
        """The taken events as batches of at most ``batch_rows`` rows, in ``seq`` order.

        Store chunks and Python rows are each in seq order; they are interleaved with
        one ``take`` per column that has data in either (the others stay shared nulls).
        """
        parts = list(taken.hot)
        if taken.python is None:
            return parts  # chunks were filled in seq order
        if not parts:
            return [taken.python]
        parts.append(taken.python)
        order = compute.sort_indices(pa.chunked_array([p.column(0) for p in parts]))
        n = len(order)
        columns = []
        for i, c in enumerate(COLUMNS):
            chunks = [p.column(i) for p in parts]
            if all(a.null_count == len(a) for a in chunks):
                columns.append(NULLS.array(c.type, n, taken.python.column(i).dictionary if c.is_dictionary else None))
            else:
                columns.append(compute.take(pa.chunked_array(chunks, c.type), order).combine_chunks())
        merged = pa.RecordBatch.from_arrays(columns, schema=self.schema)
        return [merged.slice(start, self.batch_rows) for start in range(0, n, self.batch_rows)]

    def _writer(self) -> None:
        """Write taken events in order; an OSError (disk full...) stops recording cleanly."""
        helper_thread_policy()  # queueing a batch must not hand the VP thread's CPU to this thread
        while True:
            item = self._batches.get()
            try:
                if item is None:
                    return
                if self.error is not None or self._file.closed:
                    continue
                try:
                    batches = self._merge(item)
                    for batch in batches:
                        self._ipc.write_batch(batch)  # compresses and writes without the GIL
                        self._note_used(batch)
                        self._keep(batch)
                except Exception as e:
                    self._fail(e)
                    continue
                now = monotonic_ns() - self._t0
                self.stats.bytes_written = self._file.tell()
                self.stats.batches += len(batches)
                self.stats.flushed_events += item.count
                lag = (now - item.first_ns) / 1e9
                if lag > self.stats.max_flush_lag_s:
                    self.stats.max_flush_lag_s = lag
            finally:
                if item is not None:
                    item.written.set()  # written, skipped or failed: nobody waits for it any longer
                self._batches.task_done()

    def _keep(self, batch: pa.RecordBatch) -> None:
        if self._kept is None:
            return
        self._kept_rows += batch.num_rows
        if self._kept_rows > KEEP_ROWS:
            self._kept = None  # a big trace: sealing reads the stream back instead
        else:
            self._kept.append(batch)

    def _note_used(self, batch: pa.RecordBatch) -> None:
        used = self._used
        for name, col in zip(batch.schema.names, batch.columns, strict=True):
            if name not in used and col.null_count < len(col):
                used.add(name)

    def _fail(self, exc: BaseException) -> None:
        """Stop recording after a write error; keep what is on disk; tell the VMM once."""
        if isinstance(exc, OSError):
            what = _os_reason(exc)
        else:
            what = f"{type(exc).__name__}: {exc}"
        self.error = TraceError(
            f"trace recording stopped: writing {self.path} failed after {self.stats.flushed_events} events: {what}"
        )
        self.enabled = False
        with self._lock:
            self._store.stop()
            self._rows = []
        self._store.take()  # frees what C still held
        if self.on_error is not None:
            try:
                self.on_error(self.error)
            except Exception:
                pass

    def _build_batch(self, rows: list[Row]) -> pa.RecordBatch:
        """Transpose pending Python rows into typed Arrow columns (runs on the flushing thread).

        Rows are grouped by kind (a stable Arrow sort), each kind's fields are pulled out
        with one list comprehension per field, the columns are assembled in kind order
        and the batch is put back into seq order with one ``take``: Python touches only
        the cells that exist, everything per-row runs in Arrow.
        """
        n = len(rows)
        if n == 0:
            return pa.RecordBatch.from_arrays(
                [NULLS.array(c.type, 0, KIND_DICTIONARY if c.name == "kind" else None) for c in COLUMNS],
                schema=self.schema,
            )
        seqs, ts, kinds, vps, vtls, rips, fds = zip(*rows, strict=True)
        kind_arr = column(kinds, pa.int8())
        order = compute.sort_indices(kind_arr)  # stable: seq order within each kind
        order_list: list[int] = order.to_pylist()
        sorted_fds = [fds[i] for i in order_list]
        sorted_kinds = compute.take(kind_arr, order)
        groups: list[tuple[EventKind, int, int]] = []
        pos = 0
        for item in compute.value_counts(sorted_kinds):  # sorted input: counts come out in kind order
            k, cnt = item["values"].as_py(), item["counts"].as_py()
            groups.append((_KIND_BY_VALUE[k], pos, pos + cnt))
            pos += cnt
        groups.sort(key=lambda g: g[1])

        common = {c.name: c for c in COMMON_COLUMNS}
        arrays: dict[str, pa.Array] = {
            "seq": column(seqs, pa.uint64()),
            "time_ns": column(ts, pa.int64()),
            "vp": self._to_array(common["vp"], list(vps), seqs, None),
            "vtl": self._to_array(common["vtl"], list(vtls), seqs, None),
            "rip": self._to_array(common["rip"], list(rips), seqs, None),
            "kind": pa.DictionaryArray.from_arrays(column([k - 1 for k in kinds], pa.int8()), KIND_DICTIONARY),
        }
        pieces: dict[str, list[pa.Array | None]] = {}
        for gi, (kind, lo, hi) in enumerate(groups):
            sub = sorted_fds[lo:hi]
            if not any(sub):
                continue
            orig = order_list[lo:hi]
            for emit_name, col_name in KIND_FIELDS[kind].items():
                vals = [f.get(emit_name) for f in sub]
                col = COLUMN_BY_NAME[col_name]
                if col.is_dictionary:
                    arr = self._dict_codes(col, vals, seqs, orig)
                else:
                    if col_name == "detail":
                        vals = [v if v is None or isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for v in vals]
                    arr = self._to_array(col, vals, seqs, orig)
                if arr.null_count == len(arr):
                    continue
                plist = pieces.get(col_name)
                if plist is None:
                    plist = pieces[col_name] = [None] * len(groups)
                plist[gi] = arr
        # Assemble the columns that have data in kind order, then restore seq order with one take.
        names = [c.name for c in FIELD_COLUMNS if c.name in pieces]
        if names:
            kind_order: list[pa.Array] = []
            for name in names:
                c = COLUMN_BY_NAME[name]
                value_type = c.type.index_type if c.is_dictionary else c.type
                parts = [a if a is not None else NULLS.array(value_type, g[2] - g[1]) for a, g in zip(pieces[name], groups, strict=True)]
                kind_order.append(pa.concat_arrays(parts))
            restored = compute.take(pa.RecordBatch.from_arrays(kind_order, names=names), compute.sort_indices(order))
            for name, arr in zip(names, restored.columns, strict=True):
                arrays[name] = arr
        for c in FIELD_COLUMNS:
            data = arrays.get(c.name)
            if data is None:
                data = NULLS.array(c.type, n, self._dicts[c.name].array() if c.is_dictionary else None)
            elif c.is_dictionary:
                data = pa.DictionaryArray.from_arrays(data, self._dicts[c.name].array())
            arrays[c.name] = data
        return pa.RecordBatch.from_arrays([arrays[c.name] for c in COLUMNS], schema=self.schema)

    def _dict_codes(self, col: Column, vals: list[Any], seqs: Sequence[int], orig: list[int]) -> pa.Array:
        """Dictionary indices for a list of strings, growing the append-only dictionary."""
        d = self._dicts[col.name]
        out: list[int | None] = []
        for i, v in enumerate(vals):
            try:
                out.append(None if v is None else d.code(v))
            except TypeError as e:
                self._value_error(col, seqs[orig[i]], v, e)
                out.append(None)
        return column(out, col.type.index_type)

    def _to_array(self, col: Column, values: list[Any], seqs: Sequence[int], orig: list[int] | None) -> pa.Array:
        """Whole-column conversion; on failure, convert cell by cell and null what does not fit."""
        try:
            return column(values, col.type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            pass
        fixed: list[Any] = []
        for i, v in enumerate(values):
            if v is None:
                fixed.append(None)
                continue
            try:
                cv = _coerce(col, v)
                column([cv], col.type)
                fixed.append(cv)
            except (pa.ArrowException, TypeError, ValueError, OverflowError, AttributeError) as e:
                self._value_error(col, seqs[orig[i] if orig is not None else i], v, e)
                fixed.append(None)
        return column(fixed, col.type)

    def _value_error(self, col: Column, seq: int, value: Any, exc: BaseException) -> None:
        self.stats.value_errors += 1
        if self.stats.first_value_error is None:
            self.stats.first_value_error = f"seq {seq} column {col.name} ({col.type}): bad value {value!r}: {exc}"

    # ------------------------------------------------------------------ closing

    def flush(self) -> None:
        """Write everything pending now (tests, and the VMM before a guest-visible stop)."""
        self._flush_pending()
        self._batches.join()

    def close(self) -> None:
        """Flush, end the stream and seal it into an IPC file. Idempotent; later emits are no-ops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._store.stop()  # later emits and record_io calls are no-ops
        self.enabled = False
        self._wake.set()
        self._thread.join()
        self._flush_pending()  # events stamped before the store stopped
        self._batches.join()
        self._batches.put(None)
        self._writer_thread.join()
        ok = self.error is None
        with self._write_lock:
            if ok:
                try:
                    self._ipc.close()  # writes the end-of-stream marker
                    # A sealed trace is made durable by sealing (file fsynced before the rename):
                    # the stream it replaces is fsynced only when it stays.
                    if self.fsync_on_close and not self.seal:
                        os.fsync(self._file.fileno())
                except OSError as e:
                    self._fail(e)
                    ok = False
            try:
                self._file.close()
            except OSError:
                pass
        if ok and self.seal:
            t = time.perf_counter()
            try:
                dictionaries = {name: d.array() for name, d in self._dicts.items()} | {"kind": KIND_DICTIONARY}
                seal_trace(
                    self.path, extra={"summary": self._summary()}, fsync=self.fsync_on_close,
                    dictionaries=dictionaries, columns=self._used, batches=self._kept,
                )  # fmt: skip
                self._kept = None
                self.sealed = True
            except (OSError, pa.ArrowException, TraceError) as e:
                self.seal_error = f"sealing {self.path} failed, left as stream: {e}"
                if self.fsync_on_close:
                    try:
                        _fsync(self.path)
                    except OSError:
                        pass
            self.stats.seal_seconds = time.perf_counter() - t

    def _summary(self) -> dict[str, Any]:
        s = self.stats
        return {
            "events": s.flushed_events,
            "dropped": s.dropped + self._store.dropped(),
            "value_errors": s.value_errors,
            "first_value_error": s.first_value_error,
            "end_time_ns": time.monotonic_ns() - self._t0,
            "max_flush_lag_s": round(s.max_flush_lag_s, 6),
        }

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def seal_trace(
    path: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
    target_rows: int = 65536,
    compression: str = "zstd",
    fsync: bool = True,
    dictionaries: Mapping[str, pa.Array] | None = None,
    columns: Collection[str] | None = None,
    batches: Sequence[pa.RecordBatch] | None = None,
) -> None:
    """Rewrite the stream at ``path`` as an IPC file (what ``scan_ipc`` wants), atomically.

    Batches are coalesced to about ``target_rows`` rows and every dictionary column is
    given its final dictionary: the IPC file format allows one dictionary per column,
    and the writer's dictionaries are append-only, so old indices stay valid.
    Also usable on a recovered (killed) trace to make it scannable.

    The writer passes what it knows: the final ``dictionaries`` and the ``columns`` that
    hold any non-null value. Otherwise a first pass over the stream finds both. Only
    those columns are decoded and rewritten; every other column is written as shared
    nulls (decoding and re-encoding them was most of the cost of sealing). A writer that
    still holds every batch it wrote passes them as ``batches``: nothing is read back.
    """
    p = Path(path)
    trace = open_trace(p)
    if trace.sealed:
        return
    schema = trace.schema
    dict_names = {f.name for f in schema if pa.types.is_dictionary(f.type)}
    if dictionaries is None or columns is None:
        # A streaming pass (one batch in memory at a time): holding every batch would need
        # the whole trace in RAM.
        found: dict[str, pa.Array] = {}
        used: set[str] = set()
        for b in trace.batches():
            for f, col in zip(schema, b.columns, strict=True):
                if col.null_count < len(col):
                    used.add(f.name)
                if f.name in dict_names and len(col.dictionary) > len(found.get(f.name, ())):
                    found[f.name] = col.dictionary
        dictionaries, columns = found, used
    final = {name: d if (d := dictionaries.get(name)) is not None else NULLS.empty(pa.string()) for name in dict_names}
    wanted = [f.name for f in schema if f.name in columns] or [schema[0].name]
    md = dict(trace.metadata)
    md["sealed"] = True
    if extra:
        md.update(extra)
    out_schema = schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(md, sort_keys=True).encode()})
    tmp = p.with_name(p.name + ".sealing")
    # Compressing on this thread: Arrow's pool costs more than it saves for ~70 small buffers a batch.
    options = ipc.IpcWriteOptions(compression=compression, use_threads=False)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, out_schema, options=options) as w:
            group: list[pa.RecordBatch] = []
            rows = 0
            source = batches if batches is not None else trace.batches(wanted, threads=False)
            for b in source:
                if b.num_rows == 0:
                    continue
                group.append(b)
                rows += b.num_rows
                if rows >= target_rows:
                    w.write_batch(_coalesce(group, rows, out_schema, final, wanted))
                    group, rows = [], 0
            if group:
                w.write_batch(_coalesce(group, rows, out_schema, final, wanted))
        if fsync:
            _fsync(tmp)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(p.parent)


def _fsync(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _coalesce(
    group: list[pa.RecordBatch], rows: int, schema: pa.Schema, final: Mapping[str, pa.Array], wanted: Collection[str]
) -> pa.RecordBatch:
    """One batch of the full schema from (projected) batches: ``wanted`` columns concatenated with
    their dictionaries made final, the others shared nulls."""
    # Columns by position, not name: a name lookup in a batch's schema costs more than the rest of the loop.
    wanted = set(wanted)
    position = {name: i for i, name in enumerate(group[0].schema.names) if name in wanted}
    columns = []
    for f in schema:
        dictionary = final.get(f.name)
        i = position.get(f.name)
        if i is None:
            columns.append(NULLS.array(f.type, rows, dictionary))
            continue
        parts = [b.column(i) for b in group]
        if dictionary is not None:
            parts = [pa.DictionaryArray.from_arrays(a.indices, dictionary) for a in parts]
        columns.append(parts[0] if len(parts) == 1 else pa.concat_arrays(parts))
    return pa.RecordBatch.from_arrays(columns, schema=schema)
