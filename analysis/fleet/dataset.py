"""The fleet dataset: traces as Hive-partitioned Parquet, added atomically and idempotently.

Layout (docs/fleet.md)::

    DATASET/events/config=<config id>/date=<YYYY-MM-DD>/trace=<trace id>/part-0.parquet
                                                                        /_trace.json
    DATASET/_staging/   traces being written (ignored by readers)
    DATASET/_lock       taken by every writer while it commits (local filesystems)

``part-0.parquet`` holds every event of one trace: the trace's columns and types (its
Arrow schema, metadata included, travels in the file) plus the trace's metadata as
constant columns (``META_COLUMNS``), zstd-compressed, rows grouped by kind so that each
row group holds one kind (a query over one kind reads only those row groups: their
``kind`` statistics say so). ``_trace.json`` is written last and is the commit marker:
readers list traces by their markers. On a local filesystem a trace is written under
``_staging`` and its directory renamed into place (atomic), so a killed ``add`` leaves
the dataset as it was plus a staging directory the next ``add`` removes.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shlex
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

__all__ = [
    "FLEET_FORMAT",
    "HIVE_KEYS",
    "META_COLUMNS",
    "AddResult",
    "Dataset",
    "FleetError",
    "TraceEntry",
    "add_traces",
    "open_dataset",
]

FLEET_FORMAT = 1
EVENTS = "events"
STAGING = "_staging"
LOCK = "_lock"
MARKER = "_trace.json"
DATA = "part-0.parquet"
ROW_GROUP_ROWS = 65536

#: Directory keys, outermost first (all strings): a query on one configuration or one date
#: range reads only its directories.
HIVE_KEYS = ("config", "date", "trace")

#: Trace metadata stored as a constant column in every row (cheap: one dictionary entry
#: per column chunk), so any engine can filter and group events by it.
META_COLUMNS: dict[str, pa.DataType] = {
    "guest_name": pa.string(),
    "guest_sha256": pa.string(),
    "command_line": pa.string(),
    "vm_config": pa.string(),  # canonical JSON
    "vsmtrace_version": pa.string(),
    "start_time": pa.timestamp("us", tz="UTC"),
    "sealed": pa.bool_(),
    "recovered": pa.bool_(),
}


class FleetError(Exception):
    """Something the user can fix (a bad path, not a dataset, an unreadable trace): one line."""


@dataclass(frozen=True)
class TraceEntry:
    """One committed trace of a dataset (what its ``_trace.json`` says)."""

    trace: str
    config: str
    date: str
    events: int
    meta: dict[str, Any]  # META_COLUMNS values (start_time as ISO text)
    source: str  # the path it was added from
    directory: str  # the trace's directory inside the dataset's filesystem

    def row(self) -> dict[str, Any]:
        return {"trace": self.trace, "config": self.config, "date": self.date, "events": self.events, **self.meta}


@dataclass(frozen=True)
class AddResult:
    source: str
    trace: str
    added: bool  # False: the dataset already held this trace
    events: int


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def trace_identity(md: dict[str, Any]) -> str:
    """The trace id: a hash of what identifies one recording (start instants, host, command, guest).

    The same recording added twice (even after it was sealed or copied) is one trace;
    two recordings never share their start instants on one host.
    """
    ident = {
        "start_unix_ns": md.get("start_unix_ns"),
        "start_monotonic_ns": md.get("start_monotonic_ns"),
        "host": (md.get("host") or {}).get("nodename"),
        "command_line": md.get("command_line"),
        "guest": (md.get("guest_image") or {}).get("sha256"),
    }
    return hashlib.sha256(_canonical(ident).encode()).hexdigest()[:16]


def config_id(vm_config: Any) -> str:
    """Short hash of the VM configuration (the ``config`` directory key)."""
    return hashlib.sha256(_canonical(vm_config).encode()).hexdigest()[:12]


def meta_values(md: dict[str, Any], sealed: bool, recovered: bool) -> dict[str, Any]:
    """The META_COLUMNS values of a trace, from its metadata."""
    image = md.get("guest_image") or {}
    start = md.get("start_time_utc")
    try:
        when = dt.datetime.fromisoformat(start) if start else None
    except ValueError:
        when = None
    if when is None and md.get("start_unix_ns"):
        when = dt.datetime.fromtimestamp(md["start_unix_ns"] / 1e9, dt.UTC)
    cmd = md.get("command_line")
    return {
        "guest_name": image.get("name"),
        "guest_sha256": image.get("sha256"),
        "command_line": shlex.join(cmd) if isinstance(cmd, list) else (None if cmd is None else str(cmd)),
        "vm_config": _canonical(md.get("vm_config") or {}),
        "vsmtrace_version": md.get("vsmtrace_version"),
        "start_time": when.astimezone(dt.UTC) if when else None,
        "sealed": sealed,
        "recovered": recovered,
    }


# ----------------------------------------------------------------------------- the dataset


class Dataset:
    """A fleet dataset on any fsspec filesystem (a local path, ``s3://bucket/fleet``, ...)."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> None:
        import fsspec.core

        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def url_of(self, path: str) -> str:
        """A path of this filesystem as a URL other processes (Dask workers, Polars) can open."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self) -> bool:
        return self.fs.isdir(self.path(EVENTS))

    # -- reading ---------------------------------------------------------------------------

    def traces(self) -> list[TraceEntry]:
        """Every committed trace (those with a commit marker), by trace id."""
        if not self.fs.exists(self.root):
            raise FleetError(f"{self.url}: no such dataset")
        if not self.exists():
            raise FleetError(f"{self.url}: not a fleet dataset (no {EVENTS}/ directory; create one with `vsmtrace fleet add`)")
        markers = self.fs.glob(self.path(EVENTS, "config=*", "date=*", "trace=*", MARKER))
        out = []
        for m in markers:
            try:
                with self.fs.open(m, "rb") as f:
                    d = json.load(f)
            except (OSError, ValueError) as e:
                raise FleetError(f"{self.url}: unreadable commit marker {m}: {e}") from None
            out.append(TraceEntry(d["trace"], d["config"], d["date"], int(d["events"]), d["meta"], d.get("source", ""),
                                  m.rsplit("/", 1)[0]))  # fmt: skip
        return sorted(out, key=lambda e: e.trace)

    def leftovers(self) -> list[str]:
        """Staging directories of adds that did not finish (a killed add, or one running now)."""
        return sorted(self.fs.glob(self.path(STAGING, "*")))

    def orphans(self) -> list[str]:
        """Trace directories without a commit marker (an add interrupted on a non-local filesystem)."""
        dirs = self.fs.glob(self.path(EVENTS, "config=*", "date=*", "trace=*"))
        return sorted(d for d in dirs if not self.fs.exists(f"{d}/{MARKER}"))

    def data_file(self, entry: TraceEntry) -> str:
        return f"{entry.directory}/{DATA}"

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive writer lock (flock on ``_lock``) on local filesystems.

        Elsewhere a commit is a copy followed by the marker: two writers adding the same
        trace write the same bytes, and different traces never share a path.
        """
        if not self.local:
            yield
            return
        fd = os.open(self.path(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _clean_staging(self) -> None:
        """Remove staging directories whose writer is gone (called with the lock held)."""
        host = socket.gethostname()
        for d in self.leftovers():
            name = d.rsplit("/", 1)[-1]
            parts = name.split(".")
            try:
                pid, who = int(parts[1]), parts[2]
            except (IndexError, ValueError):
                continue
            if who != _host_tag(host) or _alive(pid):
                continue
            self.fs.rm(d, recursive=True)


def _host_tag(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


def open_dataset(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> Dataset:
    return Dataset(url, storage_options)


# ----------------------------------------------------------------------------- adding


def _kind_grouped_batches(trace: Any) -> Iterator[pa.Table]:
    """The trace's rows as tables of one kind each (<= ROW_GROUP_ROWS rows), seq order within a kind."""
    import pyarrow.compute as pc

    pending: dict[int, list[pa.RecordBatch]] = {}
    sizes: dict[int, int] = {}
    for batch in trace.batches():
        if batch.num_rows == 0:
            continue
        # one stable sort by kind code, then zero-copy slices: seq order within each kind
        batch = batch.take(pc.sort_indices(batch.column("kind").indices))
        codes = batch.column("kind").indices.to_numpy(zero_copy_only=False)
        starts = [0, *(i for i in range(1, len(codes)) if codes[i] != codes[i - 1])] if len(codes) < 64 else _run_starts(codes)
        for start, end in zip(starts, [*starts[1:], len(codes)], strict=True):
            code = int(codes[start])
            part = batch.slice(start, end - start)
            pending.setdefault(code, []).append(part)
            sizes[code] = sizes.get(code, 0) + part.num_rows
            if sizes[code] >= ROW_GROUP_ROWS:
                yield pa.Table.from_batches(pending.pop(code))
                sizes[code] = 0
    for code in sorted(pending):
        yield pa.Table.from_batches(pending[code])


def _run_starts(codes: Any) -> list[int]:
    """Indices where a sorted code array changes value (the first is 0)."""
    import numpy as np

    return [0, *(np.flatnonzero(codes[1:] != codes[:-1]) + 1).tolist()]


def _with_meta(table: pa.Table, meta: dict[str, Any], schema: pa.Schema) -> pa.Table:
    n = table.num_rows
    cols = list(table.columns)
    for name, typ in META_COLUMNS.items():
        cols.append(pa.repeat(pa.scalar(meta[name], typ), n) if meta[name] is not None else pa.nulls(n, typ))
    return pa.Table.from_arrays(cols, schema=schema)


def _write_parquet(trace: Any, meta: dict[str, Any], sink: Any) -> int:
    import pyarrow.parquet as pq

    base = trace.schema
    schema = pa.schema([*base, *(pa.field(n, t) for n, t in META_COLUMNS.items())], metadata=base.metadata)
    rows = 0
    # Parquet dictionary pages only where the values repeat (the trace's dictionary columns and
    # the constant metadata); elsewhere they cost time and bytes (measured: half the write time).
    dict_cols = [f.name for f in schema if pa.types.is_dictionary(f.type) or f.name in META_COLUMNS]
    with pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=dict_cols, write_statistics=True, store_schema=True) as w:
        for t in _kind_grouped_batches(trace):
            t = _with_meta(t.combine_chunks().unify_dictionaries(), meta, schema)
            w.write_table(t, row_group_size=ROW_GROUP_ROWS)
            rows += t.num_rows
        if rows == 0:
            w.write_table(schema.empty_table())
    return rows


def add_traces(dataset: Dataset | str | os.PathLike[str], traces: Sequence[str | os.PathLike[str]]) -> list[AddResult]:
    """Add trace files to the dataset (created if missing); the same recording twice is one trace.

    A recording already held whole (sealed) is skipped; one held as recovered from a torn
    tail or unsealed is replaced when the file holds more of its events (e.g. the trace
    after ``seal``), so the dataset keeps the most complete copy.

    Each trace is written under ``_staging`` and committed under the writer lock: its
    directory renamed into place (local) or copied and marked (other filesystems). A
    process killed at any point leaves every committed trace intact and no partial one
    visible. Raises FleetError for a file that is not a readable trace.
    """
    from vsmtrace.recorder.errors import TraceError
    from vsmtrace.recorder.reader import open_trace

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if ds.local and os.path.exists(ds.root) and not os.path.isdir(ds.root):
        raise FleetError(f"{ds.url}: exists and is not a directory")
    try:
        ds.fs.makedirs(ds.path(EVENTS), exist_ok=True)
        ds.fs.makedirs(ds.path(STAGING), exist_ok=True)
    except OSError as e:
        raise FleetError(f"{ds.url}: cannot create the dataset: {e.strerror or e}") from None
    with ds.lock():
        ds._clean_staging()
    results = []
    for src in traces:
        try:
            t = open_trace(src)
        except TraceError as e:
            raise FleetError(str(e)) from None
        md = t.metadata
        tid = trace_identity(md)
        meta = meta_values(md, t.sealed, t.torn_tail)
        cfg = config_id(md.get("vm_config") or {})
        date = meta["start_time"].date().isoformat() if meta["start_time"] else "unknown"
        final = ds.path(EVENTS, f"config={cfg}", f"date={date}", f"trace={tid}")
        held = _held(ds, final)
        if held is not None and not _better(t.sealed, t.torn_tail, held):
            results.append(AddResult(str(src), tid, False, int(held["events"])))
            continue
        stage = ds.path(STAGING, f"{tid}.{os.getpid()}.{_host_tag(socket.gethostname())}.{secrets.token_hex(4)}")
        ds.fs.makedirs(stage, exist_ok=True)
        try:
            with ds.fs.open(f"{stage}/{DATA}", "wb") as f:
                rows = _write_parquet(t, meta, f)
        except (OSError, pa.ArrowException) as e:
            ds.fs.rm(stage, recursive=True)
            raise FleetError(f"{src}: cannot add to {ds.url}: {getattr(e, 'strerror', None) or e}") from None
        marker = {
            "fleet_format": FLEET_FORMAT,
            "trace": tid,
            "config": cfg,
            "date": date,
            "events": rows,
            "meta": {**meta, "start_time": meta["start_time"].isoformat() if meta["start_time"] else None},
            "source": str(Path(src).resolve()),
            "added_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        with ds.fs.open(f"{stage}/{MARKER}", "w") as f:
            f.write(json.dumps(marker, indent=1))
        with ds.lock():
            held = _held(ds, final)  # another writer may have committed it meanwhile
            if held is not None and (int(held["events"]) >= rows or not _better(t.sealed, t.torn_tail, held)):
                ds.fs.rm(stage, recursive=True)
                results.append(AddResult(str(src), tid, False, int(held["events"])))
                continue
            if held is not None:  # a recovered copy of this recording is replaced by a more complete one
                _retire(ds, final)
            _commit(ds, stage, final)
        results.append(AddResult(str(src), tid, True, rows))
    return results


def _held(ds: Dataset, final: str) -> dict[str, Any] | None:
    """The commit marker of the trace at ``final``, or None if the dataset does not hold it."""
    try:
        with ds.fs.open(f"{final}/{MARKER}", "rb") as f:
            return dict(json.load(f))
    except FileNotFoundError:
        return None


def _better(sealed: bool, torn: bool, held: dict[str, Any]) -> bool:
    """Whether a trace file may hold more of a recording than the dataset's copy: the copy
    is unsealed or was recovered from a torn tail, and the file is not worse off."""
    meta = held.get("meta", {})
    if meta.get("sealed") and not meta.get("recovered"):
        return False
    return sealed or not torn or bool(meta.get("recovered"))


def _retire(ds: Dataset, final: str) -> None:
    """Move a committed trace out of the dataset (into _staging, then delete it), lock held."""
    trash = ds.path(STAGING, f"retired.{os.getpid()}.{_host_tag(socket.gethostname())}.{secrets.token_hex(4)}")
    if ds.local:
        os.rename(final, trash)
    else:
        ds.fs.rm(f"{final}/{MARKER}")
        ds.fs.mv(final, trash, recursive=True)
    ds.fs.rm(trash, recursive=True)


def _commit(ds: Dataset, stage: str, final: str) -> None:
    """Make the staged trace visible: one rename locally; data then marker elsewhere."""
    parent = final.rsplit("/", 1)[0]
    ds.fs.makedirs(parent, exist_ok=True)
    if ds.local:
        if os.path.isdir(final):  # a directory without marker: only an older non-atomic commit leaves one
            ds.fs.rm(final, recursive=True)
        os.rename(stage, final)
        _fsync_dir(parent)
        return
    ds.fs.makedirs(final, exist_ok=True)
    ds.fs.copy(f"{stage}/{DATA}", f"{final}/{DATA}")
    ds.fs.copy(f"{stage}/{MARKER}", f"{final}/{MARKER}")
    ds.fs.rm(stage, recursive=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
