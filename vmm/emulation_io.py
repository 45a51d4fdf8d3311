"""The recorded boundary between the machine and the emulation code (Hyper-V, VSM).

Deterministic replay (DESIGN.md, "replayer") needs every input the emulation
reads and every output it produces. The emulation reaches the machine only
through a few narrow interfaces (``vmm.vp`` VP/partition access, the APIC and
TLB services, timers, VSM services, the event sink), so wrapping those
interfaces is enough:

* each call *into* the emulation from the machine (a hypercall, an MSR access, a
  timer expiry, a VTL entry...) is an **entry**: :meth:`Boundary.entry` runs it
  and emits one ``EMULATION`` event with its arguments, its result and its I/O log;
* the I/O log lists, in order, every call the emulation made *out* through the
  wrapped interfaces: reads with the value they returned (inputs), writes with
  their arguments (outputs), and the sequence number of every event it emitted.

The replayer feeds the inputs back and checks the outputs. Values are encoded to
JSON (:func:`encode`), so the log is self-describing and stable across versions.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

from vmm.events import EventKind, EventSink
from vmm.vp import Access, CpuMode, GuestMemoryError, Segment, Table, VtlAccessDenied

# -- value encoding ----------------------------------------------------------------------------


_SELF_ENCODED = frozenset({int, str, bool, type(None)})
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(value: Any) -> Any:
    """A JSON-able form of any value that crosses the boundary."""
    if value.__class__ in _SELF_ENCODED:  # the common case, first (also on the replay hot path)
        return value
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, enum.Enum):
        return int(value.value) if isinstance(value.value, int) else {"E": value.value}
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": bytes(value).hex()}
    if isinstance(value, Segment):
        return {"S": [value.base, value.limit, value.selector, value.attributes]}
    if isinstance(value, Table):
        return {"T": [value.base, value.limit]}
    if isinstance(value, VtlAccessDenied):
        return {"X": "VtlAccessDenied", "a": [value.vtl, value.gpa, int(value.access)]}
    if isinstance(value, GuestMemoryError):
        return {"X": "GuestMemoryError", "a": [value.gpa, value.size]}
    if isinstance(value, BaseException):
        return {"X": type(value).__name__, "a": [encode(a) for a in value.args]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"D": type(value).__name__, "f": {name: encode(getattr(value, name)) for name in _field_names(type(value))}}
    if isinstance(value, dict):
        return {"M": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if hasattr(value, "pack") and callable(value.pack):
        return {"P": type(value).__name__, "b": bytes(value.pack()).hex()}
    raise TypeError(f"cannot encode {type(value).__name__} for the trace")


EXCEPTIONS: dict[str, Callable[..., BaseException]] = {
    "VtlAccessDenied": lambda vtl, gpa, access: VtlAccessDenied(vtl, gpa, Access(access)),
    "GuestMemoryError": GuestMemoryError,
}


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode` for the values replay hands back to the emulation (inputs)."""
    if isinstance(data, list):
        return [decode_value(v) for v in data]
    if not isinstance(data, dict):
        return data
    if "b" in data and len(data) == 1:
        return bytes.fromhex(data["b"])
    if "S" in data:
        base, limit, selector, attributes = data["S"]
        return Segment(base, limit, selector, attributes)
    if "T" in data:
        return Table(*data["T"])
    if "M" in data:
        return {decode_value(k): decode_value(v) for k, v in data["M"]}
    if "D" in data:
        cls = input_types().get(data["D"])
        if cls is not None:
            return cls(**{k: decode_value(v) for k, v in data["f"].items()})
    return data


def input_types() -> dict[str, type]:
    """Dataclasses the machine hands *to* the emulation (so replay must rebuild them)."""
    from vmm.hyperv.reference_time import TscPageParams

    return {"TscPageParams": TscPageParams}


def decode_exception(data: Any) -> BaseException | None:
    if isinstance(data, dict) and "X" in data:
        make = EXCEPTIONS.get(data["X"])
        args = [decode_value(a) for a in data["a"]]
        return make(*args) if make is not None else RuntimeError(f"{data['X']}: {args}")
    return None


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def loads(data: bytes | None) -> Any:
    return None if data is None else json.loads(data)


# -- the boundary ----------------------------------------------------------------------------------


class Boundary:
    """Runs entries and keeps their I/O logs; a pass-through when not recording.

    ``lock`` is the emulation's own lock (HyperV's): entries are serialised with
    everything else the emulation does, so their order in the trace is the order
    in which they touched emulation state.
    """

    def __init__(self, sink: EventSink, lock: threading.RLock) -> None:
        self.sink = sink
        self.lock = lock
        self.recording = bool(sink.enabled)
        self.local = threading.local()
        self.order = itertools.count()

    def _stack(self) -> list[list[Any]]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    @property
    def log(self) -> list[Any] | None:
        stack = self._stack()
        return stack[-1] if stack else None

    def note(self, op: str, args: Sequence[Any], result: Any = None) -> None:
        log = self.log
        if log is not None:
            log.append([op, [encode(a) for a in args], encode(result)])

    def entry(self, name: str, vp: int, vtl: int, args: Sequence[Any], fn: Callable[[], Any]) -> Any:
        if not self.recording:
            return fn()
        with self.lock:
            order = next(self.order)
            stack = self._stack()
            ops: list[Any] = []
            stack.append(ops)
            error: BaseException | None = None
            result: Any = None
            try:
                result = fn()
            except BaseException as exc:  # recorded, then re-raised unchanged
                error = exc
            finally:
                stack.pop()
            self.sink.emit(
                EventKind.EMULATION,
                vp,
                vtl,
                None,
                entry=name,
                emu_order=order,
                emu_args=dumps([encode(a) for a in args]),
                emu_io=dumps(ops),
                emu_result=dumps(encode(error if error is not None else result)),
            )
            if error is not None:
                raise error
            return result


class _Recorded:
    """Base for proxies: forwards to ``inner`` and notes each call in the boundary's log."""

    def __init__(self, inner: Any, boundary: Boundary) -> None:
        self._inner = inner
        self._b = boundary

    def _in(self, op: str, args: Sequence[Any], fn: Callable[[], Any]) -> Any:
        """An input: note what it returned (or raised)."""
        try:
            result = fn()
        except (VtlAccessDenied, GuestMemoryError) as exc:
            self._b.note(op, args, exc)
            raise
        self._b.note(op, args, result)
        return result

    def _out(self, op: str, args: Sequence[Any], fn: Callable[[], Any]) -> Any:
        """An output: note the arguments (and an error, if the machine refused)."""
        try:
            result = fn()
        except (VtlAccessDenied, GuestMemoryError) as exc:
            self._b.note(op, args, exc)
            raise
        self._b.note(op, args, None)
        return result


class RecordedVp(_Recorded):
    """``vmm.vp.VpAccess`` that logs every call."""

    def __init__(self, inner: Any, boundary: Boundary) -> None:
        super().__init__(inner, boundary)
        self.index = inner.index

    @property
    def active_vtl(self) -> int:
        return int(self._in("active_vtl", [self.index], lambda: self._inner.active_vtl))

    def get_register(self, vtl: int, name: str) -> Any:
        return self._in("get_register", [self.index, vtl, name], lambda: self._inner.get_register(vtl, name))

    def set_register(self, vtl: int, name: str, value: Any) -> None:
        self._out("set_register", [self.index, vtl, name, value], lambda: self._inner.set_register(vtl, name, value))

    def get_xmm(self, vtl: int, index: int) -> int:
        return int(self._in("get_xmm", [self.index, vtl, index], lambda: self._inner.get_xmm(vtl, index)))

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        self._out("set_xmm", [self.index, vtl, index, value], lambda: self._inner.set_xmm(vtl, index, value))

    def cpl(self, vtl: int) -> int:
        return int(self._in("cpl", [self.index, vtl], lambda: self._inner.cpl(vtl)))

    def mode(self, vtl: int) -> CpuMode:
        return CpuMode(self._in("mode", [self.index, vtl], lambda: self._inner.mode(vtl)))

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        self._out(
            "inject_exception", [self.index, vtl, vector, error_code], lambda: self._inner.inject_exception(vtl, vector, error_code)
        )


class RecordedPartition(_Recorded):
    """``vmm.vp.PartitionAccess`` that logs every call."""

    def __init__(self, inner: Any, boundary: Boundary) -> None:
        super().__init__(inner, boundary)
        self._vps: dict[int, RecordedVp] = {}

    def vp(self, index: int) -> RecordedVp:
        proxy = self._vps.get(index)
        if proxy is None:
            proxy = self._vps[index] = RecordedVp(self._inner.vp(index), self._b)
        return proxy

    @property
    def vp_count(self) -> int:
        return int(self._inner.vp_count)

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        return self._in("read_gpa", [vtl, gpa, size, access], lambda: self._inner.read_gpa(vtl, gpa, size, access))

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self._out("write_gpa", [vtl, gpa, bytes(data)], lambda: self._inner.write_gpa(vtl, gpa, data))

    def reference_time(self) -> int:
        return int(self._in("reference_time", [], self._inner.reference_time))

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self._out("assert_interrupt", [vp_index, vtl, vector], lambda: self._inner.assert_interrupt(vp_index, vtl, vector))


class RecordedService(_Recorded):
    """Any other machine service (APIC access, TLB flushes, VSM services): reads are inputs, the rest outputs.

    ``inputs`` names the methods whose return value the emulation uses.
    """

    def __init__(self, inner: Any, boundary: Boundary, prefix: str, inputs: frozenset[str]) -> None:
        super().__init__(inner, boundary)
        self._prefix = prefix
        self._inputs = inputs

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target
        op = f"{self._prefix}.{name}"

        def call(*args: Any) -> Any:
            if name in self._inputs:
                return self._in(op, args, lambda: target(*args))
            return self._out(op, args, lambda: target(*args))

        return call


class RecordedTimers(_Recorded):
    """Timers: arming is an output; an expiry is an entry, identified by the order of arming."""

    def __init__(self, inner: Any, boundary: Boundary) -> None:
        super().__init__(inner, boundary)
        self._ids = itertools.count()
        self._handles: dict[int, Any] = {}

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> Any:
        timer_id = next(self._ids)

        def fire() -> None:
            self._b.entry("timer", -1, -1, [timer_id], callback)

        handle = self._inner.arm(deadline_ns, fire)
        self._b.note("timer.arm", [timer_id, deadline_ns], None)
        self._handles[id(handle)] = timer_id
        return handle

    def cancel(self, handle: Any) -> None:
        timer_id = self._handles.pop(id(handle), -1)
        self._b.note("timer.cancel", [timer_id], None)
        self._inner.cancel(handle)


class RecordedSink:
    """The emulation's event sink: forwards to the trace and logs the sequence number of each event."""

    def __init__(self, inner: EventSink, boundary: Boundary) -> None:
        self._inner = inner
        self._b = boundary
        self.enabled = inner.enabled

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> Any:
        seq = self._inner.emit(kind, vp, vtl, rip, **fields)
        self._b.note("emit", [int(kind)], seq)
        return seq

    def close(self) -> None:
        return None
