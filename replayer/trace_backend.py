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

from collections.abc import Callable, Sequence
from typing import Any

from replayer.errors import Divergence
from vmm.emulation_io import decode_exception, decode_value, encode
from vmm.events import EventKind
from vmm.vp import Access, CpuMode

#: Types that encode to themselves (fast path: most arguments are plain ints and names).
PLAIN = frozenset({int, str, type(None)})


class OpCursor:
    """The recorded I/O log of the entry being replayed, consumed in order."""

    def __init__(self) -> None:
        self.ops: list[Any] = []
        self.index = 0
        self.seq = -1  # the EMULATION event being replayed
        self.entry = ""
        self.on_io: Callable[[str, list[Any], Any], None] | None = None  # state tracking
        self.tracked_ops: frozenset[str] = frozenset()  # the ops ``on_io`` wants to see

    def start(self, seq: int, entry: str, ops: list[Any]) -> None:
        self.ops, self.index, self.seq, self.entry = ops, 0, seq, entry

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
        if op in self.tracked_ops and self.on_io is not None:
            self.on_io(op, rec_args, rec_result)
        if rec_result.__class__ is dict and "X" in rec_result:
            error = decode_exception(rec_result)
            if error is not None:
                raise error
        return rec_result

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
        return int(self.cursor.take("active_vtl", [self.index]))

    def get_register(self, vtl: int, name: str) -> Any:
        return decode_value(self.cursor.take("get_register", [self.index, vtl, name]))

    def set_register(self, vtl: int, name: str, value: Any) -> None:
        self.cursor.take("set_register", [self.index, vtl, name, value])

    def get_xmm(self, vtl: int, index: int) -> int:
        return int(self.cursor.take("get_xmm", [self.index, vtl, index]))

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        self.cursor.take("set_xmm", [self.index, vtl, index, value])

    def cpl(self, vtl: int) -> int:
        return int(self.cursor.take("cpl", [self.index, vtl]))

    def mode(self, vtl: int) -> CpuMode:
        return CpuMode(self.cursor.take("mode", [self.index, vtl]))

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        self.cursor.take("inject_exception", [self.index, vtl, vector, error_code])


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
        return bytes(decode_value(self.cursor.take("read_gpa", [vtl, gpa, size, access])))

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self.cursor.take("write_gpa", [vtl, gpa, bytes(data)])

    def reference_time(self) -> int:
        return int(self.cursor.take("reference_time", []))

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.cursor.take("assert_interrupt", [vp_index, vtl, vector])


class ReplayService:
    """A machine service (``apic``, ``tlb``, ``vsm``, ``clock``): every call is checked against the log."""

    def __init__(self, cursor: OpCursor, prefix: str) -> None:
        self._cursor = cursor
        self._prefix = prefix

    def __getattr__(self, name: str) -> Callable[..., Any]:
        op = f"{self._prefix}.{name}"

        def call(*args: Any) -> Any:
            return decode_value(self._cursor.take(op, args))

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
        self.cursor.take("timer.arm", [timer_id, deadline_ns])
        self.callbacks[timer_id] = callback
        self.deadlines[timer_id] = deadline_ns
        return timer_id

    def cancel(self, handle: Any) -> None:
        timer_id = int(handle)
        self.cursor.take("timer.cancel", [timer_id])
        self.callbacks.pop(timer_id, None)
        self.deadlines.pop(timer_id, None)

    def fire(self, timer_id: int) -> None:
        callback = self.callbacks.pop(timer_id, None)
        self.deadlines.pop(timer_id, None)
        if callback is None:
            raise Divergence(self.cursor.seq, "EMULATION", "timer", f"timer {timer_id} armed", "no such armed timer")
        callback()


#: Fields that measure host time: they describe the run, not an emulation decision.
TIMING_FIELDS = frozenset({"duration_ns"})


class ReplaySink:
    """Events the replayed emulation emits, compared with the rows it emitted when recorded."""

    enabled = True

    def __init__(self, cursor: OpCursor, row: Callable[[int], Any], kind_fields: dict[Any, dict[str, str]]) -> None:
        self.cursor = cursor
        self.row = row
        self.kind_fields = kind_fields

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int:
        seq = int(self.cursor.take("emit", [int(kind)]))
        recorded = self.row(seq)
        name = EventKind(kind).name
        if recorded["kind"] != name:
            raise Divergence(seq, recorded["kind"], "kind", recorded["kind"], name)
        for field, value in (("vp", vp), ("vtl", vtl), ("rip", rip)):
            if recorded[field] != value:
                raise Divergence(seq, name, field, recorded[field], value)
        columns = self.kind_fields[EventKind(kind)]
        for field, value in fields.items():
            if field in TIMING_FIELDS:
                continue
            have = recorded[columns.get(field, field)]
            if have == value and have.__class__ is value.__class__:  # fast path: the same plain value
                continue
            if _normalise(have) != _normalise(value):
                raise Divergence(seq, name, field, have, value)
        return seq

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
