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
from replayer.state import ReplayState
from replayer.trace_backend import OpCursor, ReplayPartition, ReplayService, ReplaySink, ReplayTimers
from vmm.emulation_io import encode, loads
from vmm.events import EventKind

ENTRY_COLUMNS = ["seq", "vp", "vtl", "entry", "emu_order", "emu_args", "emu_io", "emu_result"]


@dataclass
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


@dataclass
class ReplayReport:
    entries: int
    events: int
    divergence: Divergence | None
    context: list[dict[str, Any]]


class VmmReplayer:
    """Replays the emulation of one trace; iterate with :meth:`run` or :meth:`states`."""

    def __init__(self, path: str | Path, *, break_at: int | None = None) -> None:
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
        self.break_at = break_at
        self.seq_is_row = self._check_seq()
        self.entries = self._entries()
        self.cursor = OpCursor()
        self.state = ReplayState.for_config(self.config)
        self.cursor.on_io = self.state.on_io
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
        rows = self.table.filter(mask).select(ENTRY_COLUMNS).to_pylist()
        out: list[Entry] = []
        for r in rows:
            io = loads(r["emu_io"]) or []
            out.append(
                Entry(
                    seq=r["seq"], vp=r["vp"], vtl=r["vtl"], entry=r["entry"], order=r["emu_order"],
                    args=loads(r["emu_args"]) or [], io=io, result=loads(r["emu_result"]),
                    emitted=[op[2] for op in io if op[0] == "emit"],
                )
            )  # fmt: skip
        out.sort(key=lambda e: e.order)
        return out

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
        self.sink = ReplaySink(cursor, self.row, KIND_FIELDS)
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
            result: Any = call()
        except Divergence:
            raise
        except Exception as exc:  # the emulation raised: compare with what it raised when recorded
            result = exc
        self.cursor.finish()
        got = encode(result)
        if got != entry.result:
            raise Divergence(entry.seq, "EMULATION", f"{entry.entry} result", entry.result, got)
        self.state.after_entry(entry)

    # -- driving -------------------------------------------------------------------------------
    def run(self, *, progress: bool = False, stop_at: int | None = None) -> ReplayReport:
        """Replay every entry (or those up to event ``stop_at``); stop at the first divergence."""
        done = 0
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
            return ReplayReport(done, self.table.num_rows, div, self.context(div.seq))
        return ReplayReport(done, self.table.num_rows, None, [])

    def states(self) -> Iterator[tuple[int, ReplayState]]:
        """Yield (seq, state) after each replayed entry, incrementally (no re-replay)."""
        for entry in self.entries:
            self.replay_entry(entry)
            yield entry.seq, self.state

    def state_at(self, seq: int) -> ReplayState:
        """The state right after event ``seq``."""
        for entry in self.entries:
            if entry.seq <= seq:
                self.replay_entry(entry)
        self.state.finish_at(self.table, seq)
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
    if report.divergence is None:
        return f"replay verified: {report.entries} emulation entries reproduced bit for bit ({report.events} events in the trace)"
    d = report.divergence
    lines = [
        f"DIVERGENCE at event {d.seq} ({d.kind}), field {d.field}:",
        f"  recorded: {d.recorded!r}",
        f"  replayed: {d.replayed!r}",
        f"  after {report.entries} entries replayed identically",
        "  preceding events:",
    ]
    for r in report.context:
        extra = " ".join(f"{k}={v:#x}" if isinstance(v, int) and k in ("msr", "gpa", "address") else f"{k}={v}" for k, v in r.items() if k not in ("seq", "kind", "vp", "vtl", "rip"))
        rip = f"{r['rip']:#x}" if r.get("rip") is not None else "-"
        lines.append(f"    {r['seq']:>8}  {r['kind']:<14} vp{r['vp']} vtl{r['vtl']} rip={rip} {extra}".rstrip())
    return "\n".join(lines)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
