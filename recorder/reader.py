"""Open a trace, sealed or not, complete or torn, and hand out Arrow/Polars views of it.

A trace file is either
  * a sealed Arrow IPC *file* (magic ``ARROW1``, footer): what a clean close leaves;
    read lazily with ``polars.scan_ipc``;
  * an Arrow IPC *stream*: what the writer appends while recording. A killed writer
    leaves a stream whose last message may be cut short (the "torn tail"); every
    record batch before it is complete and readable, and so is a stream that is
    still growing.
Every failure to recognise a file becomes a one-line ``TraceFormatError``.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.ipc as ipc
from vsmtrace.recorder.errors import TraceFormatError
from vsmtrace.recorder.schema import COLUMN_BY_NAME, COMMON_NAMES, METADATA_KEY, SCHEMA_VERSION

if TYPE_CHECKING:
    import polars as pl


def _keep_python_sigint() -> None:
    """Give SIGINT back to Python's handler after Polars took it.

    Polars (2.x) installs a native SIGINT handler when imported, and once a signal
    came that handler leaves SIG_DFL behind: a second Ctrl-C then kills the process
    in the middle of its cleanup (status -2, a trace left unsealed, no message).
    Re-installing the current Python-level handler restores Python's own (which
    ``vsmtrace.interrupts`` builds on); Arrow is told not to swap handlers either.
    """
    import signal
    import threading

    pa.enable_signal_handlers(False)
    if threading.current_thread() is not threading.main_thread():
        return
    current = signal.getsignal(signal.SIGINT)
    if current is None:  # set outside Python: leave it
        return
    try:
        signal.signal(signal.SIGINT, current)
    except (ValueError, TypeError):
        pass


_keep_python_sigint()

FILE_MAGIC = b"ARROW1"
CONTINUATION = b"\xff\xff\xff\xff"
EOS_MARKER = CONTINUATION + b"\x00\x00\x00\x00"


@dataclass
class StreamScan:
    """Where the complete part of an IPC stream ends, found by walking its message framing."""

    schema: pa.Schema
    data_end: int  # offset just past the last complete record batch (or the schema)
    batches: int  # complete record batches
    end_of_stream: bool  # the writer closed the stream (EOS marker right after data_end)
    torn_offset: int | None  # offset where incomplete bytes start, or None


def scan_stream(buf: pa.Buffer, label: str, base: int = 0) -> StreamScan:
    """Walk the stream in ``buf`` message by message without decoding bodies.

    ``base`` is added to reported offsets (an IPC file's embedded stream starts at 8).
    """
    reader = pa.BufferReader(buf)
    try:
        messages = ipc.MessageReader.open_stream(reader)
        first = messages.read_next_message()
    except StopIteration:
        raise TraceFormatError(f"{label}: truncated before the schema ({buf.size} bytes of stream, no schema message)") from None
    except (pa.ArrowException, OSError, ValueError):
        raise TraceFormatError(f"{label}: truncated or corrupt before the schema ({buf.size} bytes)") from None
    if first.type != "schema":
        raise TraceFormatError(f"{label}: Arrow stream does not start with a schema (first message: {first.type})")
    try:
        schema = ipc.read_schema(first)
    except (pa.ArrowException, OSError, ValueError):
        raise TraceFormatError(f"{label}: unreadable schema message at byte {base}") from None
    data_end = reader.tell()
    batches = 0
    while True:
        try:
            msg = messages.read_next_message()
        except StopIteration:
            break
        except (pa.ArrowException, OSError, ValueError):
            break  # a message cut short: everything from data_end on is the torn tail
        if msg.type == "record batch":
            batches += 1
            data_end = reader.tell()
    rest = buf.size - data_end
    eos = rest == len(EOS_MARKER) and buf.slice(data_end).to_pybytes() == EOS_MARKER
    torn = None if eos or rest == 0 else base + data_end
    return StreamScan(schema, base + data_end, batches, eos, torn)


def parse_metadata(schema: pa.Schema, label: str) -> dict[str, Any]:
    """The vsmtrace metadata of a schema, with the version checks every reader needs."""
    try:
        schema.names  # noqa: B018 - decodes every field name: a damaged one is not valid UTF-8
        raw = (schema.metadata or {}).get(METADATA_KEY)
        # Each column's own metadata (doc, kinds, unit) too: Polars decodes it as UTF-8 and
        # panics (a Rust panic, not an exception) on a damaged byte.
        for f in schema:
            for key, value in (f.metadata or {}).items():
                key.decode("utf-8"), value.decode("utf-8")
    except ValueError:
        raise TraceFormatError(f"{label}: corrupt schema (a field name or metadata entry is not valid UTF-8)") from None
    if raw is None:
        raise TraceFormatError(f"{label}: Arrow IPC data but not a vsmtrace trace (no 'vsmtrace' schema metadata)")
    try:
        md = json.loads(raw)
    except ValueError:
        raise TraceFormatError(f"{label}: corrupt vsmtrace metadata (not JSON)") from None
    version = md.get("schema_version") if isinstance(md, dict) else None
    if not isinstance(version, int) or version < 1:
        raise TraceFormatError(f"{label}: invalid vsmtrace schema version {version!r}")
    if version > SCHEMA_VERSION:
        raise TraceFormatError(
            f"{label}: trace schema version {version} is newer than this vsmtrace supports ({SCHEMA_VERSION}); upgrade vsmtrace"
        )
    return md


def _type_matches(actual: pa.DataType, declared: pa.DataType) -> bool:
    """Whether a column's Arrow type is the one the schema declares (dictionaries: integer codes over strings)."""
    if pa.types.is_dictionary(declared):
        return (
            pa.types.is_dictionary(actual)
            and pa.types.is_integer(actual.index_type)
            and (pa.types.is_string(actual.value_type) or pa.types.is_large_string(actual.value_type))
        )
    return actual.equals(declared)


def validate_schema(schema: pa.Schema, md: dict[str, Any], label: str) -> None:
    """Check the columns against the schema version the metadata declares; one line naming the bad column.

    Every common column must be there; every column the schema knows must have its
    declared type (a trace from an older vsmtrace may lack later field columns; unknown
    extra columns are tolerated). Without this a trace whose metadata says vsmtrace but
    whose ``kind`` is missing, or whose ``vp`` holds strings, fails deep inside Polars.
    """
    version = md.get("schema_version")
    names = schema.names
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TraceFormatError(f"{label}: not a valid vsmtrace v{version} trace: column {dupes[0]!r} appears twice")
    missing = [n for n in COMMON_NAMES if n not in names]
    if missing:
        raise TraceFormatError(
            f"{label}: not a valid vsmtrace v{version} trace: core column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(m) for m in missing)} missing"
        )
    for f in schema:
        col = COLUMN_BY_NAME.get(f.name)
        if col is not None and not _type_matches(f.type, col.type):
            raise TraceFormatError(
                f"{label}: not a valid vsmtrace v{version} trace: column {f.name!r} is {f.type}, schema v{version} says {col.type}"
            )


@dataclass
class Trace:
    """An opened trace: a snapshot of the file as it was when opened."""

    path: Path
    metadata: dict[str, Any]
    schema: pa.Schema
    sealed: bool
    torn_tail: bool
    torn_offset: int | None  # byte offset where the torn tail starts
    end_of_stream: bool  # sealed, or a stream the writer closed cleanly
    file_size: int
    batch_count: int
    _buf: pa.Buffer = field(repr=False)
    _stream_start: int = field(repr=False)  # where the IPC stream begins inside the file
    _stream_end: int = field(repr=False)  # end of the last complete batch

    @property
    def state(self) -> str:
        """One phrase for humans: sealed, cleanly closed stream, recovered, or still open."""
        if self.sealed:
            return "sealed"
        if self.torn_tail:
            return f"recovered: torn tail at byte {self.torn_offset} ({self.file_size - (self.torn_offset or 0)} bytes ignored)"
        if self.end_of_stream:
            return "unsealed stream, closed cleanly (sealing did not happen)"
        return "unsealed stream, no end marker (writer killed between batches, or still recording)"

    @property
    def partial(self) -> str | None:
        """Why this trace does not hold the whole recording, or None if it does.

        A torn tail, a stream without its end marker (killed writer), or a trace that
        `vsmtrace seal` recovered from either: its report must say it is partial.
        """
        if self.torn_tail:
            return f"recording cut short: torn tail at byte {self.torn_offset} ignored"
        if not self.end_of_stream:
            return "recording cut short: the stream has no end marker (writer killed, or still recording)"
        recovered = self.metadata.get("recovered")
        if isinstance(recovered, dict):
            return f"recording cut short: recovered by `vsmtrace seal` ({recovered.get('reason', 'unsealed stream')})"
        return None

    def batches(self, columns: Sequence[str] | None = None, *, threads: bool = True) -> Iterator[pa.RecordBatch]:
        """Every complete record batch, in seq order; only ``columns`` (in schema order) when given.

        Reading a few columns decodes only their buffers: the replayer needs a handful of
        the ~70 columns, and decoding all of them was most of its load time.
        ``threads=False`` decodes on the calling thread: cheaper than Arrow's thread pool
        for batches of many small buffers when the other cores are busy.
        """
        options = None
        if columns is not None or not threads:
            fields = None if columns is None else self._field_indices(columns)
            options = ipc.IpcReadOptions(included_fields=fields, use_threads=threads)
        try:
            if self.sealed:
                reader = ipc.open_file(self._buf, options=options)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
                return
            body = self._buf.slice(self._stream_start, self._stream_end - self._stream_start)
            stream = ipc.open_stream(pa.BufferReader(body), options=options)
            while True:
                try:
                    yield stream.read_next_batch()
                except StopIteration:
                    return
        except (pa.ArrowException, OSError, ValueError) as exc:
            # Framing was sound when opened, but a batch's body is not (bit rot, a file edited
            # in place): the reader's own one-line error, never Arrow's exception types.
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TraceFormatError(f"{self.path}: damaged record batch: {first}") from None

    def table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All complete events as one pyarrow Table (chunks = batches), optionally only some columns.

        Names the trace does not have are left out (an older trace may lack a newer column).
        """
        if columns is None:
            return pa.Table.from_batches(list(self.batches()), schema=self.schema)
        indices = self._field_indices(columns)
        schema = pa.schema([self.schema.field(i) for i in indices], metadata=self.schema.metadata)
        return pa.Table.from_batches(list(self.batches(columns)), schema=schema)

    def _field_indices(self, columns: Sequence[str]) -> list[int]:
        names = set(columns)
        indices = [i for i, name in enumerate(self.schema.names) if name in names]
        if not indices:  # Arrow reads every column for an empty selection
            raise ValueError(f"none of the columns {sorted(names)} is in the trace")
        return indices

    def lazy(self) -> pl.LazyFrame:
        """A Polars LazyFrame; sealed traces are scanned lazily from disk, streams are read first."""
        import polars as pl  # here, not at the top: recording (which seals through this module) never needs Polars

        if self.sealed:
            return pl.scan_ipc(self.path)
        return pl.from_arrow(self.table()).lazy()  # type: ignore[union-attr]


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open ``path`` as a vsmtrace trace; raise ``TraceFormatError`` (one line) if it is not one."""
    p = Path(path)
    label = str(p)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise TraceFormatError(f"{label}: no such file") from None
    except OSError as e:
        raise TraceFormatError(f"{label}: cannot access: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise TraceFormatError(f"{label}: is a directory, not a trace file")
    if not stat.S_ISREG(st.st_mode):
        raise TraceFormatError(f"{label}: not a regular file")
    if st.st_size == 0:
        raise TraceFormatError(f"{label}: empty file (0 bytes); recording never started")
    try:
        buf = pa.memory_map(label, "r").read_buffer()
    except (OSError, pa.ArrowException) as e:
        raise TraceFormatError(f"{label}: cannot read: {getattr(e, 'strerror', None) or e}") from None
    size = buf.size
    head = buf.slice(0, min(8, size)).to_pybytes()
    if head.startswith(FILE_MAGIC):
        try:
            reader = ipc.open_file(buf)
            schema = reader.schema
            nbatches = reader.num_record_batches
        except (pa.ArrowException, OSError, ValueError):
            # A sealed file cut short (e.g. a partial copy): its body is still a stream after the 8-byte magic.
            if size <= 8:
                raise TraceFormatError(f"{label}: truncated Arrow IPC file ({size} bytes)") from None
            scan = scan_stream(buf.slice(8), label, base=8)
            md = parse_metadata(scan.schema, label)
            validate_schema(scan.schema, md, label)
            return Trace(p, md, scan.schema, False, True, scan.data_end, False, size, scan.batches, buf, 8, scan.data_end)
        md = parse_metadata(schema, label)
        validate_schema(schema, md, label)
        return Trace(p, md, schema, True, False, None, True, size, nbatches, buf, 0, size)
    if head[:4] != CONTINUATION:
        if size < 8 and CONTINUATION.startswith(head[:4]):
            raise TraceFormatError(f"{label}: truncated before the schema ({size} bytes)")
        raise TraceFormatError(f"{label}: not an Arrow IPC trace (foreign file starting with {head!r})")
    scan = scan_stream(buf, label)
    md = parse_metadata(scan.schema, label)
    validate_schema(scan.schema, md, label)
    return Trace(
        p, md, scan.schema, False, scan.torn_offset is not None, scan.torn_offset, scan.end_of_stream, size, scan.batches, buf, 0, scan.data_end
    )
