"""VMM replay: run the recorded emulation entries again, offline, and compare.

The Hyper-V and VSM objects are built exactly as the recorded machine built
them (from the trace metadata), but over the trace backend
(:mod:`replayer.trace_backend`). Every ``EMULATION`` event is replayed in the
order the entries started; its inputs come from its I/O log, its outputs and
the events it emitted are compared bit for bit. Along the way
:class:`ReplayState` keeps what a user wants to inspect at any event.

Opening a trace reads only the columns replay needs and converts them column
by column; each entry's I/O log stays encoded until the entry is replayed, so
the work and memory per entry are what replaying it takes, nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from vsmtrace.recorder.arrays import column, scalar
from vsmtrace.recorder.errors import TraceError
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.schema import SCHEMA_VERSION
from vsmtrace.replayer.errors import Divergence, ReplayError
from vsmtrace.replayer.recorded_rows import KNOWN_KINDS, EmittedRows, kind_columns, paused_gc, pylist
from vsmtrace.replayer.state import ReplayState
from vsmtrace.replayer.trace_backend import OpCursor, ReplaySink, replay_ports
from vsmtrace.vmm.emulation import build_emulation
from vsmtrace.vmm.emulation_io import decode_value, emitted_events, encode
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.protocol import Entry as EntryName
from vsmtrace.vmm.trace_metadata import recorded_policy

ENTRY_COLUMNS = ["seq", "vp", "vtl", "entry", "emu_order", "emu_args", "emu_io", "emu_result"]
#: What replay reads of every event: its kind (to find the events that need an entry) and
#: what the state derives from the trace (last RIPs; active VTLs from VTL_SWITCH.to_vtl).
EVENT_COLUMNS = ["seq", "kind", "vp", "vtl", "rip", "to_vtl"]
#: Kinds of event that only the Hyper-V/VSM emulation emits (always inside an entry).
EMULATION_ONLY_KINDS = (EventKind.HYPERCALL, EventKind.SYNIC_MESSAGE, EventKind.VTL_ENABLE)

#: The JSON decoder's scanner: one call per value, without json.loads' encoding detection and checks.
_SCAN = json.JSONDecoder().scan_once


def decode_json(raw: bytes | None) -> Any:
    """One JSON value of an EMULATION row, as ``json.loads`` reads it, with less overhead per call."""
    if raw is None:
        return None
    text = raw.decode()
    try:
        value, end = _SCAN(text, 0)
    except (StopIteration, ValueError):
        return json.loads(text)  # leading whitespace, or the error json.loads reports
    return value if end == len(text) else json.loads(text)


def unreadable(seq: int, exc: Exception) -> str:
    """The one-line reason a damaged EMULATION row cannot be replayed."""
    return f"event {seq} (EMULATION): unreadable I/O log: {exc}"


@dataclass(slots=True)
class Entry:
    """One recorded call into the emulation.

    ``args`` and ``result`` are decoded when the trace is opened. The I/O log stays encoded
    (``raw_io``) and is decoded on each access of ``io``: a long trace would otherwise hold
    every decoded call of every entry, and replay decodes each log once, as it replays it.
    """

    seq: int
    vp: int
    vtl: int
    entry: str
    order: int
    args: list[Any]
    result: Any
    raw_io: bytes | None

    @property
    def io(self) -> list[Any]:
        """The calls the entry made out: ``[op, args, result]`` each (ReplayError if the log is damaged)."""
        try:
            return decode_json(self.raw_io) or []
        except ValueError as exc:
            raise ReplayError(unreadable(self.seq, exc)) from None

    @property
    def emitted(self) -> list[int]:
        """Sequence numbers of the events the entry emitted."""
        return emitted_events(self.raw_io or b"")[1]


@dataclass
class ReplayReport:
    """What :meth:`VmmReplayer.run` found: entries replayed, the first divergence (if any) and its context."""

    entries: int
    events: int
    divergence: Divergence | None
    context: list[dict[str, Any]]
    note: str | None = None  # e.g. "the trace is truncated ..." (only its complete prefix was replayed)
    cpuid_leaves: int = 0  # Hyper-V CPUID leaves checked against the recorded VM configuration


class VmmReplayer:
    """Replays the emulation of one trace; iterate with :meth:`run` or :meth:`states`."""

    def __init__(self, path: str | Path, *, break_at: int | None = None) -> None:
        with paused_gc():  # loading makes many small objects, none cyclic
            self._load(path, break_at)

    def _load(self, path: str | Path, break_at: int | None) -> None:
        try:
            self.trace = open_trace(path)
        except TraceError as exc:
            raise ReplayError(str(exc)) from None
        md = self.trace.metadata
        version = md.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReplayError(f"{path}: trace schema v{version}, this vsmtrace replays v{SCHEMA_VERSION}")
        self.path = Path(path)
        self.config: dict[str, Any] = md.get("vm_config") or {}
        if "hyperv_policy" not in self.config or "vps" not in self.config:
            raise ReplayError(f"{path}: the trace metadata lacks the VM configuration replay needs (vps, hyperv_policy)")
        missing = [c for c in ENTRY_COLUMNS if c not in self.trace.schema.names]
        if missing:
            raise ReplayError(f"{path}: the trace has no recorded emulation I/O (columns {', '.join(missing)} missing)")
        #: The events, with only the columns replay reads (``table`` has them all).
        self.events = self._read(EVENT_COLUMNS + ENTRY_COLUMNS)
        #: A trace whose recording was cut short (killed VMM, partial copy): only its complete prefix replays.
        self.torn = bool(self.trace.torn_tail or not self.trace.end_of_stream)
        if self.events.num_rows == 0:
            why = f"truncated (torn tail at byte {self.trace.torn_offset})" if self.trace.torn_tail else "empty"
            raise ReplayError(f"{path}: no complete events to replay: the trace is {why}")
        self.break_at = break_at
        self.seq_is_row = self._check_seq()
        self.note: str | None = None
        self.entries, raw_logs = self._entries()
        kinds, seqs = emitted_events(b"\n".join(raw for raw in raw_logs if raw))  # of every event the entries emitted
        self._check_inputs(seqs)
        columns = sorted({c for kind in KNOWN_KINDS.intersection(kinds) for c in kind_columns(kind)})
        self.emitted_rows = EmittedRows(self._read(columns or ["seq"]), kinds, seqs, self.seq_is_row)
        #: The entries --break-at stops before: the EMULATION event itself, or the entry that emitted that event.
        self.break_entries = (
            set() if break_at is None else {e.seq for e in self.entries if e.seq == break_at or break_at in e.emitted}
        )
        self.cursor = OpCursor()
        self.state = ReplayState.for_config(self.config)
        try:
            self._build()
        except Divergence as exc:
            raise ReplayError(f"{path}: cannot rebuild the recorded emulation: {exc}") from None

    # -- loading -------------------------------------------------------------------------------
    def _read(self, columns: list[str]) -> pa.Table:
        try:
            return self.trace.table(columns)
        except (TraceError, pa.ArrowException, OSError) as exc:
            raise ReplayError(f"{self.path}: cannot read the trace: {exc}") from None

    @cached_property
    def table(self) -> pa.Table:
        """Every column of every complete event (read on first use: divergence reports, :meth:`row`)."""
        return self._read(list(self.trace.schema.names))

    def _check_seq(self) -> bool:
        seqs = self.events.column("seq")
        n = len(seqs)
        return int(seqs[0].as_py()) == 0 and int(seqs[n - 1].as_py()) == n - 1

    @cached_property
    def _kinds(self) -> pa.ChunkedArray:
        """The kind of every event, as strings."""
        return pc.cast(self.events.column("kind"), pa.string())

    def _entries(self) -> tuple[list[Entry], list[bytes | None]]:
        """The entries in the order they started, and their encoded I/O logs."""
        emulation = pc.equal(self._kinds, scalar(EventKind.EMULATION.name, pa.string()))
        columns = [pylist(self.events.column(c).filter(emulation)) for c in ENTRY_COLUMNS]
        orders = columns[ENTRY_COLUMNS.index("emu_order")]
        if orders != sorted(orders):  # a nested entry (started inside another) finished, and was written, first
            by_order = sorted(range(len(orders)), key=orders.__getitem__)
            columns = [[values[i] for i in by_order] for values in columns]
        seqs, vps, vtls, names, orders, raw_args, raw_logs, raw_results = columns
        decoded: dict[bytes | None, Any] = {}  # entries share most arguments and results: decode each value once
        for raw in {*raw_args, *raw_results}:
            try:
                decoded[raw] = decode_json(raw)
            except ValueError as exc:
                seq = next(s for s, a, r in zip(seqs, raw_args, raw_results, strict=True) if raw in (a, r))
                raise ReplayError(f"{self.path}: {unreadable(seq, exc)}") from None
        args = [decoded[raw] or [] for raw in raw_args]
        results = [decoded[raw] for raw in raw_results]
        out = list(map(Entry, seqs, vps, vtls, names, orders, args, results, raw_logs))
        if orders != list(range(len(orders))):  # entries are numbered 0, 1, 2... as they start: one is missing
            index = next(i for i, order in enumerate(orders) if order != i)
            if not self.torn:
                raise ReplayError(
                    f"{self.path}: missing inputs: emulation entry #{index} is not in the trace "
                    f"(entry #{orders[index]} at event {seqs[index]} follows #{index - 1})"
                )
            out, raw_logs = out[:index], raw_logs[:index]
        if self.torn:
            self.note = (
                f"the trace is truncated ({self.trace.state}): replayed the {len(out)} emulation entries "
                f"recorded before the cut"
            )
        return out, raw_logs

    def _check_inputs(self, claimed: list[int]) -> None:
        """Every event only the emulation emits must belong to a recorded entry (else its inputs are missing)."""
        kinds = self._kinds
        seqs = self.events.column("seq")
        only_emulation = column([k.name for k in EMULATION_ONLY_KINDS], pa.string())
        unclaimed = pc.and_(
            pc.is_in(kinds, value_set=only_emulation), pc.invert(pc.is_in(seqs, value_set=column(claimed, seqs.type)))
        )
        if self.torn:  # events after the last complete entry lost their entry to the cut
            horizon = max((e.seq for e in self.entries), default=-1)
            unclaimed = pc.and_(unclaimed, pc.less(seqs, scalar(max(horizon, 0), seqs.type)))  # none is < 0
        first = pc.indices_nonzero(unclaimed)
        if len(first):
            for entry in self.entries:  # a damaged log hides what it emitted: name the damage, not its effect
                self._ops(entry)
            index = first[0].as_py()
            raise ReplayError(
                f"{self.path}: missing inputs: event {seqs[index].as_py()} ({kinds[index].as_py()}) came from the emulation, "
                f"but no EMULATION event records the call that produced it (trace recorded without the emulation boundary?)"
            )

    @cached_property
    def last_seq(self) -> int:
        """The sequence number of the last complete event."""
        return int(pc.max(self.events.column("seq")).as_py())

    def _index(self, seq: int) -> int:
        """The row of event ``seq``; ReplayError if the trace does not have it."""
        if seq > self.last_seq:
            cut = f"; the recording was cut short ({self.trace.partial})" if self.torn else ""
            raise ReplayError(f"{self.path}: no event {seq}: the trace ends at event {self.last_seq}{cut}")
        if self.seq_is_row:
            index = seq
        else:
            seqs = self.events.column("seq")
            matches = pc.indices_nonzero(pc.equal(seqs, scalar(seq, seqs.type)))
            if len(matches) == 0:
                raise ReplayError(f"{self.path}: event {seq} is missing from the trace (a gap in its sequence numbers)")
            index = int(matches[0].as_py())
        return index

    def _ops(self, entry: Entry) -> list[Any]:
        """The decoded I/O log of ``entry``; ReplayError naming the trace and the event if it is damaged."""
        try:
            return decode_json(entry.raw_io) or []
        except ValueError as exc:
            raise ReplayError(f"{self.path}: {unreadable(entry.seq, exc)}") from None

    def row(self, seq: int) -> dict[str, Any]:
        """One event as a dict (dictionary columns as strings)."""
        return self.table.slice(self._index(seq), 1).to_pylist()[0]

    # -- the emulation, rebuilt over the trace ---------------------------------------------------
    def _build(self) -> None:
        from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
        from vsmtrace.vmm.memory import ram_layout

        cfg = self.config
        policy = recorded_policy(cfg) or HypervPolicy()
        cursor = self.cursor
        self.sink = ReplaySink(cursor, self.emitted_rows, self.row)
        ports = replay_ports(cursor, int(cfg["vps"]), self.sink)
        self.partition = ports.partition
        self.timers = ports.timers
        vtls = int(cfg.get("vtls", 1))
        ram = ram_layout(int(cfg.get("ram_bytes") or int(cfg["memory_mib"]) << 20)) if vtls > 1 else []
        emulation = build_emulation(
            policy, ports, vtl_count=vtls, tsc_hz=cfg.get("tsc_hz"), apic_hz=cfg.get("apic_timer_hz"),
            ram_ranges=[(r.gpa, r.size) for r in ram],
        )  # fmt: skip
        self.hv = emulation.hv
        self.vsm: Any = emulation.vsm
        self.state.attach(self.hv, self.vsm)
        self.state.table = self.events
        #: Entry name -> the emulation method it called, with the recorded arguments.
        self.calls: dict[str, Callable[..., Any]] = {
            EntryName.HYPERCALL: self.hv.hypercall,
            EntryName.MSR_READ: self.hv.msr_read,
            EntryName.MSR_WRITE: self.hv.msr_write,
            EntryName.EOI: self.hv.on_apic_eoi,
            EntryName.AUTO_EOI: self.hv.is_auto_eoi,
            EntryName.TEST_DEVICE: self.hv.test_device_command,
            EntryName.TIMER: self.timers.fire,
            EntryName.VTL_ENTRY: self._vtl_entry,
            EntryName.VINA: self._vina,
            EntryName.POST_INTERCEPT: self._post_intercept,
        }

    def _vtl_entry(self, vp: int, vtl: int, reason: Any, arg: Any) -> Any:
        from vsmtrace.vmm.vsm.services import EntryReason

        return self.vsm.on_vtl_entry(vp, vtl, EntryReason(reason), arg)

    def _vina(self, vp: int, vtl: int) -> Any:
        return self.vsm.notify_lower_vtl_interrupt(vp, vtl)

    def _post_intercept(self, vp: int, vtl: int, message: dict[str, str]) -> Any:
        from vsmtrace.vmm.hyperv.hvdef import HvMessage

        return self.hv.post_intercept(vp, vtl, HvMessage.unpack(decode_value(message)))

    def replay_entry(self, entry: Entry) -> None:
        call = self.calls.get(entry.entry)
        if call is None:
            raise ReplayError(f"event {entry.seq}: unknown emulation entry {entry.entry!r} (trace from a newer vsmtrace?)")
        self.cursor.start(entry.seq, entry.entry, self._ops(entry))
        if entry.seq in self.break_entries:
            print(
                f"vsmtrace replay: stopping before entry {entry.entry!r} of event {entry.seq} "
                f"(args {entry.args}); step into `call()` to enter the handler"
            )
            breakpoint()  # noqa: T100 - the documented --break-at workflow
        try:
            try:
                result: Any = call(*entry.args)
            except Divergence:
                raise
            except Exception as exc:  # the emulation raised: compare with what it raised when recorded
                result = exc
            self.cursor.finish()
            got = encode(result)
            if got != entry.result:
                raise Divergence(entry.seq, "EMULATION", f"{entry.entry} result", entry.result, got)
        except Divergence as div:
            if div.entry_seq is None:
                div.entry_seq, div.entry = entry.seq, entry.entry
            raise
        self.state.after_entry(entry)

    # -- driving -------------------------------------------------------------------------------
    def run(self, *, progress: bool = False, stop_at: int | None = None) -> ReplayReport:
        """Replay every entry (or those up to event ``stop_at``); stop at the first divergence."""
        done = 0
        try:
            leaves = self.check_cpuid()
        except Divergence as div:
            return ReplayReport(0, self.events.num_rows, div, [], self.note)
        iterator: Iterator[Entry] = iter(self.entries)
        if progress:
            from tqdm import tqdm

            iterator = iter(tqdm(self.entries, desc="replay", unit="entry", leave=False))
        try:
            for entry in iterator:
                if stop_at is not None and entry.seq > stop_at:
                    continue
                self.replay_entry(entry)
                done += 1
        except Divergence as div:
            return ReplayReport(done, self.events.num_rows, div, self.context(div.seq), self.note, leaves)
        return ReplayReport(done, self.events.num_rows, None, [], self.note, leaves)

    def check_cpuid(self) -> int:
        """The Hyper-V CPUID leaves (set once at VM creation, no exit) against the recorded configuration.

        Returns how many leaves matched; raises :class:`Divergence` (event -1, kind ``vm_config``) on a difference.
        """
        recorded_leaves = (self.config.get("cpuid_policy") or {}).get("extra_leaves")
        if recorded_leaves is None or not self.hv.policy.enabled:
            return 0
        recorded = {(e[0], e[1]): list(e[3:7]) for e in recorded_leaves}
        replayed = {(leaf, sub): [a, b, c, d] for leaf, sub, a, b, c, d in self.hv.cpuid_leaves()}
        for key in sorted(recorded.keys() | replayed.keys()):
            want, got = recorded.get(key), replayed.get(key)
            if want != got:
                name = f"cpuid {key[0]:#x}.{key[1]}"
                if want is not None and got is not None:  # name the register
                    i = next(i for i in range(4) if want[i] != got[i])
                    name, want, got = f"{name} {('eax', 'ebx', 'ecx', 'edx')[i]}", want[i], got[i]
                raise Divergence(-1, "vm_config", name, want, got)
        return len(recorded)

    def states(self) -> Iterator[tuple[int, ReplayState]]:
        """Yield (seq, state) after each replayed entry, incrementally (no re-replay)."""
        for entry in self.entries:
            self.replay_entry(entry)
            yield entry.seq, self.state

    def state_at(self, seq: int) -> ReplayState:
        """The state right after event ``seq``."""
        self._index(seq)  # ReplayError if the trace has no such event
        for entry in self.entries:
            if entry.seq <= seq:
                self.replay_entry(entry)
        self.state.finish_at(seq)
        return self.state

    def context(self, seq: int, before: int = 5) -> list[dict[str, Any]]:
        out = []
        for s in range(max(0, seq - before), seq + 1):
            try:
                r = self.row(s)
            except ReplayError:
                continue
            out.append({k: r[k] for k in ("seq", "kind", "vp", "vtl", "rip")} | _summary(r))
        return out


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("name", "status_name", "entry", "msr", "access", "gpa", "reason", "from_vtl", "to_vtl", "address", "vector")
    return {k: row[k] for k in keep if row.get(k) is not None}


def format_report(report: ReplayReport) -> str:
    note = [f"note: {report.note}"] if report.note else []
    if report.divergence is None:
        verified = f"replay verified: {report.entries} emulation entries reproduced bit for bit ({report.events} events in the trace)"
        if report.cpuid_leaves:
            verified += f"; {report.cpuid_leaves} Hyper-V CPUID leaves as recorded"
        return "\n".join([verified, *note])
    d = report.divergence
    if d.kind == "vm_config":
        return "\n".join([f"DIVERGENCE in the recorded VM configuration, field {d.field}:", f"  recorded: {d.recorded!r}", f"  replayed: {d.replayed!r}"])
    lines = [
        f"DIVERGENCE at event {d.seq} ({d.kind}), field {d.field}:",
        f"  recorded: {d.recorded!r}",
        f"  replayed: {d.replayed!r}",
    ]
    if d.entry_seq is not None and d.entry_seq != d.seq:
        lines.append(f"  emitted while replaying emulation entry {d.entry!r} of event {d.entry_seq}")
    lines += [f"  after {report.entries} entries replayed identically", *(f"  {n}" for n in note), "  preceding events:"]
    for r in report.context:
        extra = " ".join(f"{k}={v:#x}" if isinstance(v, int) and k in ("msr", "gpa", "address") else f"{k}={v}" for k, v in r.items() if k not in ("seq", "kind", "vp", "vtl", "rip"))
        rip = f"{r['rip']:#x}" if r.get("rip") is not None else "-"
        lines.append(f"    {r['seq']:>8}  {r['kind']:<14} vp{r['vp']} vtl{r['vtl']} rip={rip} {extra}".rstrip())
    return "\n".join(lines)


def report_dict(report: ReplayReport) -> dict[str, Any]:
    """The replay report as plain data (``vsmtrace replay --json``)."""
    d = report.divergence
    return {
        "verified": d is None,
        "entries_replayed": report.entries,
        "events": report.events,
        "cpuid_leaves_checked": report.cpuid_leaves,
        "note": report.note,
        "divergence": None if d is None else {
            "seq": d.seq, "kind": d.kind, "field": d.field, "recorded": d.recorded, "replayed": d.replayed,
            "entry_seq": d.entry_seq, "entry": d.entry,
        },
        "context": report.context,
    }  # fmt: skip


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
