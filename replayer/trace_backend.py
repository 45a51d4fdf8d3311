"""The trace backend of the VP interface: the emulation's I/O, served from a recording.

During replay the Hyper-V/VSM code runs unchanged; every call it makes out
through the VP interface or a machine service lands here instead of on KVM.
Each call must be the next one in the recorded I/O log of the entry being
replayed: reads get the recorded value back (inputs), writes are compared with
the recorded arguments (outputs), and events the emulation emits are compared
field by field with the recorded event row. The first difference raises
:class:`replayer.errors.Divergence`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vsmtrace.recorder.schema import KIND_FIELDS
from vsmtrace.replayer.errors import Divergence
from vsmtrace.replayer.recorded_rows import TIMING_FIELDS, EmittedRows
from vsmtrace.vmm.emulation import EmulationPorts
from vsmtrace.vmm.emulation_io import decode_exception, decode_value, encode
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.protocol import TSC_PAGE_PARAMS, Op, Service, service_op
from vsmtrace.vmm.vp import Access, CpuMode

#: Types that encode to themselves (fast path: most arguments are plain ints and names).
PLAIN = frozenset({int, str, type(None)})
#: Recorded mode -> CpuMode, without the Enum constructor on every hypercall.
CPU_MODES: dict[int, CpuMode] = {int(mode): mode for mode in CpuMode}


class OpCursor:
    """The recorded I/O log of the entry being replayed, consumed in order."""

    __slots__ = ("ops", "index", "seq", "entry")

    def __init__(self) -> None:
        self.ops: list[Any] = []
        self.index = 0
        self.seq = -1  # the EMULATION event being replayed
        self.entry = ""

    def start(self, seq: int, entry: str, ops: list[Any]) -> None:
        self.ops = ops
        self.index = 0
        self.seq = seq
        self.entry = entry

    def take(self, op: str, args: Sequence[Any]) -> Any:
        """Check that the emulation's next call is the recorded one; return the recorded result."""
        encoded = [a if a.__class__ in PLAIN else encode(a) for a in args]
        if self.index >= len(self.ops):
            raise Divergence(
                self.seq, "EMULATION", f"{self.entry}: io[{self.index}]", "end of recorded I/O", f"{op}{tuple(encoded)}"
            )
        rec_op, rec_args, rec_result = self.ops[self.index]
        if rec_op != op or rec_args != encoded:
            raise Divergence(
                self.seq, "EMULATION", f"{self.entry}: io[{self.index}]", f"{rec_op}{tuple(rec_args)}", f"{op}{tuple(encoded)}"
            )
        self.index += 1
        return self._result(rec_result)

    def take_plain(self, op: str, args: list[Any], plain: bool = True) -> Any:
        """:meth:`take` for the VP interface's calls, whose arguments are ints and names.

        Exact ints, names and None encode to themselves, so the recorded arguments are
        compared with the arguments as they are. ``plain`` is the caller's check that the
        values the emulation passed it are such ints (its own, like the VP index, are);
        if not (an Enum, bytes, a Segment, a float equal to an int), or if the recorded
        call differs, :meth:`take` encodes the arguments as the recording did and decides.
        """
        index = self.index
        if plain and index < len(self.ops):
            recorded = self.ops[index]
            if recorded[1] == args and recorded[0] == op:
                self.index = index + 1
                result = recorded[2]
                return result if result.__class__ is not dict else self._result(result)  # a dict may be an exception
        return self.take(op, args)

    @staticmethod
    def _result(recorded: Any) -> Any:
        """The recorded result of a call; a recorded exception is raised, as the machine raised it."""
        if recorded.__class__ is dict and "X" in recorded:
            error = decode_exception(recorded)
            if error is not None:
                raise error
        return recorded

    def finish(self) -> None:
        if self.index != len(self.ops):
            rec_op, rec_args, _ = self.ops[self.index]
            raise Divergence(
                self.seq, "EMULATION", f"{self.entry}: io[{self.index}]", f"{rec_op}{tuple(rec_args)}", "entry returned early"
            )


class ReplayVp:
    def __init__(self, index: int, cursor: OpCursor) -> None:
        self.index = index
        self.cursor = cursor

    @property
    def active_vtl(self) -> int:
        return int(self.cursor.take_plain(Op.ACTIVE_VTL, [self.index]))

    def get_register(self, vtl: int, name: str) -> Any:
        value = self.cursor.take_plain(Op.GET_REGISTER, [self.index, vtl, name], vtl.__class__ is int)
        return value if value.__class__ is int else decode_value(value)

    def set_register(self, vtl: int, name: str, value: Any) -> None:
        plain = vtl.__class__ is int and value.__class__ is int
        self.cursor.take_plain(Op.SET_REGISTER, [self.index, vtl, name, value], plain)

    def get_xmm(self, vtl: int, index: int) -> int:
        return int(self.cursor.take_plain(Op.GET_XMM, [self.index, vtl, index], vtl.__class__ is int and index.__class__ is int))

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        plain = vtl.__class__ is int and index.__class__ is int and value.__class__ is int
        self.cursor.take_plain(Op.SET_XMM, [self.index, vtl, index, value], plain)

    def cpl(self, vtl: int) -> int:
        return int(self.cursor.take_plain(Op.CPL, [self.index, vtl], vtl.__class__ is int))

    def mode(self, vtl: int) -> CpuMode:
        value = self.cursor.take_plain(Op.MODE, [self.index, vtl], vtl.__class__ is int)
        mode = CPU_MODES.get(value)
        return mode if mode is not None else CpuMode(value)  # ValueError for a mode this vsmtrace does not know

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        self.cursor.take(Op.INJECT_EXCEPTION, [self.index, vtl, vector, error_code])  # rare: always encoded


class ReplayPartition:
    def __init__(self, vp_count: int, cursor: OpCursor) -> None:
        self.cursor = cursor
        self._vps = [ReplayVp(i, cursor) for i in range(vp_count)]

    def vp(self, index: int) -> ReplayVp:
        return self._vps[index]

    @property
    def vp_count(self) -> int:
        return len(self._vps)

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        plain = vtl.__class__ is int and gpa.__class__ is int and size.__class__ is int and access.__class__ is Access
        return bytes(decode_value(self.cursor.take_plain(Op.READ_GPA, [vtl, gpa, size, access], plain)))

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self.cursor.take(Op.WRITE_GPA, [vtl, gpa, bytes(data)])

    def reference_time(self) -> int:
        return int(self.cursor.take_plain(Op.REFERENCE_TIME, []))

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.cursor.take(Op.ASSERT_INTERRUPT, [vp_index, vtl, vector])


class ReplayService:
    """A machine service (``vmm.protocol.Service``): every call is checked against the log."""

    def __init__(self, cursor: OpCursor, service: str) -> None:
        self._cursor = cursor
        self._prefix = service

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = service_op(self._prefix, name)
        cursor = self._cursor

        def call(*args: Any) -> Any:
            return decode_value(cursor.take(op, args))

        setattr(self, name, call)  # found directly from now on
        return call


class ReplayTimers:
    """Arming is checked; callbacks are kept by arming order so a recorded expiry can fire them."""

    def __init__(self, cursor: OpCursor) -> None:
        self.cursor = cursor
        self.next_id = 0
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.deadlines: dict[int, int] = {}

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> int:
        timer_id = self.next_id
        self.next_id += 1
        self.cursor.take_plain(Op.TIMER_ARM, [timer_id, deadline_ns], deadline_ns.__class__ is int)
        self.callbacks[timer_id] = callback
        self.deadlines[timer_id] = deadline_ns
        return timer_id

    def cancel(self, handle: Any) -> None:
        timer_id = int(handle)
        self.cursor.take_plain(Op.TIMER_CANCEL, [timer_id])
        self.callbacks.pop(timer_id, None)
        self.deadlines.pop(timer_id, None)

    def fire(self, timer_id: int) -> None:
        callback = self.callbacks.pop(timer_id, None)
        self.deadlines.pop(timer_id, None)
        if callback is None:
            raise Divergence(self.cursor.seq, "EMULATION", "timer", f"timer {timer_id} armed", "no such armed timer")
        callback()


class ReplaySink:
    """Events the replayed emulation emits, compared with the rows it emitted when recorded."""

    enabled = True

    def __init__(self, cursor: OpCursor, rows: EmittedRows, row: Callable[[int], Mapping[str, Any]]) -> None:
        self.cursor = cursor
        self.rows = rows
        self.row = row  # any recorded event (one not among ``rows``: the trace has a mismatch)

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int:
        seq = int(self.cursor.take_plain(Op.EMIT, [kind], kind.__class__ is EventKind))
        group = self.rows.by_kind.get(kind)
        index = None if group is None else group.index.get(seq)
        if group is None or index is None:  # recorded as another kind, or missing: the whole recorded row decides
            self._compare(seq, kind, vp, vtl, rip, fields, self.row(seq))
            return seq
        names = tuple(fields)
        field_set = group.field_sets.get(names) or group.field_set(names)  # recorded fields, in this site's order
        if field_set.rows[index] != (vp, vtl, rip, *field_set.values(fields)):
            self._compare(seq, kind, vp, vtl, rip, fields, group.row(index))
        return seq

    @staticmethod
    def _compare(
        seq: int, kind: EventKind, vp: int, vtl: int, rip: int | None, fields: dict[str, Any], recorded: Mapping[str, Any]
    ) -> None:
        """Field by field, in the order a report names them; raise at the first real difference."""
        name = EventKind(kind).name
        if recorded["kind"] != name:
            raise Divergence(seq, recorded["kind"], "kind", recorded["kind"], name)
        for field, value in (("vp", vp), ("vtl", vtl), ("rip", rip)):
            if recorded[field] != value:
                raise Divergence(seq, name, field, recorded[field], value)
        columns = KIND_FIELDS[EventKind(kind)]
        for field, value in fields.items():
            if field in TIMING_FIELDS:
                continue
            have = recorded[columns.get(field, field)]
            if _normalise(have) != _normalise(value):
                raise Divergence(seq, name, field, have, value)

    def close(self) -> None:
        return None


def _normalise(value: Any) -> Any:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if hasattr(value, "value") and not isinstance(value, int | bool):  # plain Enum
        return value.value
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    return value


def replay_ports(cursor: OpCursor, vp_count: int, sink: ReplaySink) -> EmulationPorts:
    """The emulation's ports over the recorded I/O logs (what ``emulation_io.recorded_ports`` recorded)."""
    return EmulationPorts(
        partition=ReplayPartition(vp_count, cursor),
        timers=ReplayTimers(cursor),
        apic=ReplayService(cursor, Service.APIC),
        tlb=ReplayService(cursor, Service.TLB),
        tsc_page=getattr(ReplayService(cursor, Service.CLOCK), TSC_PAGE_PARAMS),
        sink=sink,  # type: ignore[arg-type]
        vsm=ReplayService(cursor, Service.VSM),
    )
