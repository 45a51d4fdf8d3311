"""VMM replay: run the recorded emulation entries again, offline, and compare.

The Hyper-V and VSM objects are built exactly as the recorded machine built
them (from the trace metadata), but over the trace backend
(:mod:`replayer.trace_backend`). Every ``EMULATION`` event is replayed in the
order the entries started; its inputs come from its I/O log, its outputs and
the events it emitted are compared bit for bit. Along the way
:class:`ReplayState` keeps what a user wants to inspect at any event.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from recorder.errors import TraceError
from recorder.reader import open_trace
from recorder.schema import KIND_FIELDS, SCHEMA_VERSION
from replayer.errors import Divergence, ReplayError
from replayer.state import TRACKED_OPS, ReplayState
from replayer.trace_backend import OpCursor, ReplayPartition, ReplayService, ReplaySink, ReplayTimers
from vmm.emulation_io import encode, loads
from vmm.events import EventKind

ENTRY_COLUMNS = ["seq", "vp", "vtl", "entry", "emu_order", "emu_args", "emu_io", "emu_result"]
#: Kinds of event that only the Hyper-V/VSM emulation emits (always inside an entry).
EMULATION_ONLY_KINDS = (EventKind.HYPERCALL, EventKind.SYNIC_MESSAGE, EventKind.VTL_ENABLE)


@dataclass(slots=True)
class Entry:
    """One recorded call into the emulation."""

    seq: int
    vp: int
    vtl: int
    entry: str
    order: int
    args: list[Any]
    io: list[Any]
    result: Any
    emitted: list[int] = field(default_factory=list)


class EmittedRows:
    """The recorded rows of every event the entries emitted, decoded column by column on first use.

    The sink compares a handful of columns per emitted event; converting whole rows
    one at a time (``slice(i, 1).to_pylist()``) dominated replay time. Rows are
    grouped by kind so that a kind's columns are converted for that kind's rows only.
    """

    def __init__(self, table: pa.Table, seqs: list[int], seq_is_row: bool) -> None:
        seqs = sorted(set(seqs))
        if seq_is_row:
            positions = [s for s in seqs if s < table.num_rows]
        else:
            where = {s: i for i, s in enumerate(table.column("seq").to_pylist())}
            positions = [where[s] for s in seqs if s in where]
        taken = table.take(pa.array(positions, pa.int64()))
        kinds = pc.cast(taken.column("kind"), pa.string())
        self.pos: dict[int, tuple[_KindRows, int]] = {}
        for kind in pc.unique(kinds).to_pylist():
            group = _KindRows(taken.filter(pc.equal(kinds, kind)))
            for i, seq in enumerate(group.table.column("seq").to_pylist()):
                self.pos[seq] = (group, i)

    def get(self, seq: int) -> LazyRow | None:
        where = self.pos.get(seq)
        return None if where is None else LazyRow(*where)


class _KindRows:
    """The emitted rows of one kind, with a cache of converted columns."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.columns: dict[str, list[Any]] = {}

    def column(self, name: str) -> list[Any]:
        values = self.columns.get(name)
        if values is None:
            values = self.columns[name] = self.table.column(name).to_pylist() if name in self.table.column_names else []
        return values


class LazyRow:
    """One recorded event, read-only, as the sink needs it: ``row[column]`` and ``row.get(column)``."""

    __slots__ = ("rows", "index")

    def __init__(self, rows: _KindRows, index: int) -> None:
        self.rows = rows
        self.index = index

    def __getitem__(self, name: str) -> Any:
        values = self.rows.columns.get(name)
        if values is None:
            values = self.rows.column(name)
        return values[self.index] if values else None

    def get(self, name: str, default: Any = None) -> Any:
        value = self[name]
        return default if value is None else value


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
        collecting = gc.isenabled()
        gc.disable()  # loading makes millions of small objects, none cyclic: the collector would rescan them over and over
        try:
            self._load(path, break_at)
        finally:
            if collecting:
                gc.enable()

    def _load(self, path: str | Path, break_at: int | None) -> None:
        try:
            self.trace = open_trace(path)
            self.table = self.trace.table()
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
        missing = [c for c in ENTRY_COLUMNS if c not in self.table.column_names]
        if missing:
            raise ReplayError(f"{path}: the trace has no recorded emulation I/O (columns {', '.join(missing)} missing)")
        #: A trace whose recording was cut short (killed VMM, partial copy): only its complete prefix replays.
        self.torn = bool(self.trace.torn_tail or not self.trace.end_of_stream)
        if self.table.num_rows == 0:
            why = f"truncated (torn tail at byte {self.trace.torn_offset})" if self.trace.torn_tail else "empty"
            raise ReplayError(f"{path}: no complete events to replay: the trace is {why}")
        self.break_at = break_at
        self.seq_is_row = self._check_seq()
        self.note: str | None = None
        self.entries = self._entries()
        self.emitted_rows = EmittedRows(self.table, [seq for e in self.entries for seq in e.emitted], self.seq_is_row)
        self._check_inputs()
        self.cursor = OpCursor()
        self.state = ReplayState.for_config(self.config)
        self.state.table = self.table
        self.cursor.on_io = self.state.on_io
        self.cursor.tracked_ops = TRACKED_OPS
        try:
            self._build()
        except Divergence as exc:
            raise ReplayError(f"{path}: cannot rebuild the recorded emulation: {exc}") from None

    # -- loading -------------------------------------------------------------------------------
    def _check_seq(self) -> bool:
        n = self.table.num_rows
        if n == 0:
            return True
        seqs = self.table.column("seq")
        return int(seqs[0].as_py()) == 0 and int(seqs[n - 1].as_py()) == n - 1

    def _entries(self) -> list[Entry]:
        kinds = self.table.column("kind")
        mask = pc.equal(pc.cast(kinds, pa.string()), EventKind.EMULATION.name)
        rows = self.table.filter(mask).select(ENTRY_COLUMNS)
        cols = {name: rows.column(name).to_pylist() for name in ENTRY_COLUMNS}
        decoded = self._decode_json(cols)
        out: list[Entry] = []
        for seq, vp, vtl, name, order, (args, io, result) in zip(
            cols["seq"], cols["vp"], cols["vtl"], cols["entry"], cols["emu_order"], decoded, strict=True
        ):
            io = io or []
            emitted = [op[2] for op in io if op[0] == "emit"]
            out.append(Entry(seq, vp, vtl, name, order, args or [], io, result, emitted))
        out.sort(key=lambda e: e.order)
        for index, e in enumerate(out):
            if e.order != index:  # entries are numbered 0, 1, 2... as they start: one is missing
                if not self.torn:
                    raise ReplayError(
                        f"{self.path}: missing inputs: emulation entry #{index} is not in the trace "
                        f"(entry #{e.order} at event {e.seq} follows #{index - 1})"
                    )
                out = out[:index]
                break
        if self.torn:
            self.note = (
                f"the trace is truncated ({self.trace.state}): replayed the {len(out)} emulation entries "
                f"recorded before the cut"
            )
        return out

    def _decode_json(self, cols: dict[str, list[Any]]) -> list[Any]:
        """[args, io, result] of every entry, parsed as one JSON document (one parser call, not three per row)."""
        parts = [
            b"[%b,%b,%b]" % (a or b"null", i or b"null", r or b"null")
            for a, i, r in zip(cols["emu_args"], cols["emu_io"], cols["emu_result"], strict=True)
        ]
        try:
            return json.loads(b"[" + b",".join(parts) + b"]")
        except ValueError:
            pass
        for seq, part in zip(cols["seq"], parts, strict=True):  # name the damaged row
            try:
                loads(part)
            except ValueError as exc:
                raise ReplayError(f"{self.path}: event {seq} (EMULATION): unreadable I/O log: {exc}") from None
        raise ReplayError(f"{self.path}: unreadable emulation I/O logs")

    def _check_inputs(self) -> None:
        """Every event only the emulation emits must belong to a recorded entry (else its inputs are missing)."""
        kinds = pc.cast(self.table.column("kind"), pa.string())
        only_emulation = pa.array([k.name for k in EMULATION_ONLY_KINDS])
        seqs = self.table.column("seq").filter(pc.is_in(kinds, value_set=only_emulation)).to_pylist()
        claimed = {s for e in self.entries for s in e.emitted}
        horizon = max((e.seq for e in self.entries), default=-1) if self.torn else None
        for seq in seqs:
            if seq not in claimed and (horizon is None or seq < horizon):
                kind = self.row(seq)["kind"]
                raise ReplayError(
                    f"{self.path}: missing inputs: event {seq} ({kind}) came from the emulation, but no "
                    f"EMULATION event records the call that produced it (trace recorded without the emulation boundary?)"
                )

    def row(self, seq: int) -> dict[str, Any]:
        """One event as a dict (dictionary columns as strings)."""
        if self.seq_is_row:
            index = seq
        else:
            matches = pc.indices_nonzero(pc.equal(self.table.column("seq"), seq))
            if len(matches) == 0:
                raise ReplayError(f"{self.path}: event {seq} is missing from the trace")
            index = int(matches[0].as_py())
        if index >= self.table.num_rows:
            raise ReplayError(f"{self.path}: event {seq} is missing from the trace (torn tail?)")
        return self.table.slice(index, 1).to_pylist()[0]

    def emitted_row(self, seq: int) -> Any:
        """The recorded row of an event an entry emitted (column access only)."""
        row = self.emitted_rows.get(seq)
        return row if row is not None else self.row(seq)

    # -- the emulation, rebuilt over the trace ---------------------------------------------------
    def _build(self) -> None:
        from vmm.hyperv import HyperV
        from vmm.hyperv.cpuid import HypervPolicy

        cfg = self.config
        known = {f.name for f in dataclasses.fields(HypervPolicy)}
        policy_fields = {k: v for k, v in (cfg["hyperv_policy"] or {}).items() if k in known}
        policy = HypervPolicy(**policy_fields)
        cursor = self.cursor
        self.partition = ReplayPartition(int(cfg["vps"]), cursor)
        self.timers = ReplayTimers(cursor)
        self.sink = ReplaySink(cursor, self.emitted_row, KIND_FIELDS)
        vtls = int(cfg.get("vtls", 1))
        self.hv = HyperV(
            self.partition,
            policy,
            timers=self.timers,
            apic=ReplayService(cursor, "apic"),
            tlb=ReplayService(cursor, "tlb"),
            sink=self.sink,
            tsc_page=ReplayService(cursor, "clock").tsc_page_params,
            tsc_frequency_hz=cfg.get("tsc_hz"),
            apic_frequency_hz=cfg.get("apic_timer_hz"),
            vtl_count=vtls,
        )
        self.vsm: Any = None
        if vtls > 1 and policy.enabled:
            from vmm.memory import ram_layout
            from vmm.vsm import Vsm

            ram = ram_layout(int(cfg.get("ram_bytes") or int(cfg["memory_mib"]) << 20))
            self.vsm = Vsm(
                self.hv, self.partition, ReplayService(cursor, "vsm"), vtl_count=vtls, sink=self.sink,
                ram_ranges=[(r.gpa, r.size) for r in ram],
            )  # fmt: skip
        self.state.attach(self.hv, self.vsm)
        self.state.table = self.table

    def _invoke(self, entry: Entry) -> Callable[[], Any]:
        hv, args = self.hv, entry.args
        name = entry.entry
        if name == "hypercall":
            return lambda: hv.hypercall(args[0], args[1])
        if name == "msr_read":
            return lambda: hv.msr_read(args[0], args[1], args[2])
        if name == "msr_write":
            return lambda: hv.msr_write(args[0], args[1], args[2], args[3])
        if name == "eoi":
            return lambda: hv.on_apic_eoi(args[0], args[1])
        if name == "auto_eoi":
            return lambda: hv.is_auto_eoi(args[0], args[1], args[2])
        if name == "timer":
            return lambda: self.timers.fire(args[0])
        if name == "vtl_entry":
            from vmm.vsm.services import EntryReason

            return lambda: self.vsm.on_vtl_entry(args[0], args[1], EntryReason(args[2]), args[3])
        if name == "vina":
            return lambda: self.vsm.notify_lower_vtl_interrupt(args[0], args[1])
        if name == "post_intercept":
            from vmm.hyperv.hvdef import HvMessage

            message = HvMessage.unpack(bytes.fromhex(args[2]["b"]))
            return lambda: hv.post_intercept(args[0], args[1], message)
        raise ReplayError(f"event {entry.seq}: unknown emulation entry {name!r} (trace from a newer vsmtrace?)")

    def replay_entry(self, entry: Entry) -> None:
        call = self._invoke(entry)
        self.cursor.start(entry.seq, entry.entry, entry.io)
        self.state.before_entry(entry.seq)
        if self.break_at is not None and (self.break_at == entry.seq or self.break_at in entry.emitted):
            print(
                f"vsmtrace replay: stopping before entry {entry.entry!r} of event {entry.seq} "
                f"(args {entry.args}); step into `call()` to enter the handler"
            )
            breakpoint()  # noqa: T100 - the documented --break-at workflow
        try:
            try:
                result: Any = call()
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
            return ReplayReport(0, self.table.num_rows, div, [], self.note)
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
            return ReplayReport(done, self.table.num_rows, div, self.context(div.seq), self.note, leaves)
        return ReplayReport(done, self.table.num_rows, None, [], self.note, leaves)

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
        self.row(seq)  # ReplayError if the trace has no such event
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


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
