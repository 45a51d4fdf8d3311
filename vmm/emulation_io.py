"""The recorded boundary between the machine and the emulation code (Hyper-V, VSM).

Deterministic replay (docs/architecture.md, "The trace -> replay path") needs every input the emulation
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
import re
import threading
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.events import EventKind, EventSink
from vsmtrace.vmm.protocol import SERVICE_INPUTS, TSC_PAGE_PARAMS, Entry, Op, Service, service_op
from vsmtrace.vmm.vp import Access, CpuMode, GuestMemoryError, Segment, Table, VtlAccessDenied

if TYPE_CHECKING:
    from vsmtrace.vmm.emulation import EmulationPorts

# -- value encoding ----------------------------------------------------------------------------


_SELF_ENCODED = frozenset({int, str, bool, type(None)})


def encode(value: Any) -> Any:
    """A JSON-able form of any value that crosses the boundary.

    The form depends only on the value's class (and, for an Enum, on its value), so the
    branch is chosen once per class and kept: recording and replay encode every
    argument and result, mostly the same few classes over and over.
    """
    cls = value.__class__
    if cls in _SELF_ENCODED:  # the common case, first
        return value
    encoder = _ENCODERS.get(cls)
    if encoder is None:
        encoder = _ENCODERS[cls] = _encoder_for(cls)
    return encoder(value)


def _same(value: Any) -> Any:
    return value


def _encode_enum(value: enum.Enum) -> Any:
    encoded = _ENUMS_ENCODED.get(value)
    if encoded is None:
        raw = value.value  # a descriptor lookup per call: the form is kept per member instead
        encoded = int(raw) if isinstance(raw, int) else {"E": raw}
        if len(_ENUMS_ENCODED) < _ENUMS_KEPT:  # bounded: a guest can make IntFlag members of any value
            _ENUMS_ENCODED[value] = encoded
    return encoded


#: The encoded form of each enum member seen (immutable, except the {"E": ...} dicts, which no caller changes).
_ENUMS_ENCODED: dict[enum.Enum, Any] = {}
_ENUMS_KEPT = 4096


def _encode_bytes(value: bytes | bytearray | memoryview) -> Any:
    return {"b": bytes(value).hex()}


def _encode_segment(value: Segment) -> Any:
    return {"S": [value.base, value.limit, value.selector, value.attributes]}


def _encode_table(value: Table) -> Any:
    return {"T": [value.base, value.limit]}


def _encode_access_denied(value: VtlAccessDenied) -> Any:
    return {"X": "VtlAccessDenied", "a": [value.vtl, value.gpa, int(value.access)]}


def _encode_memory_error(value: GuestMemoryError) -> Any:
    return {"X": "GuestMemoryError", "a": [value.gpa, value.size]}


def _encode_exception(value: BaseException) -> Any:
    return {"X": type(value).__name__, "a": [encode(a) for a in value.args]}


def _encode_dict(value: dict[Any, Any]) -> Any:
    return {"M": [[encode(k), encode(v)] for k, v in value.items()]}


def _encode_sequence(value: list[Any] | tuple[Any, ...]) -> Any:
    return [encode(v) for v in value]


def _encode_other(value: Any) -> Any:
    """Anything packable (hvdef structures); checked per value since ``pack`` may be an instance attribute."""
    if hasattr(value, "pack") and callable(value.pack):
        return {"P": type(value).__name__, "b": bytes(value.pack()).hex()}
    raise TypeError(f"cannot encode {type(value).__name__} for the trace")


def _dataclass_encoder(cls: type) -> Callable[[Any], Any]:
    names = tuple(f.name for f in dataclasses.fields(cls))
    label = cls.__name__

    def encode_dataclass(value: Any) -> Any:
        fields = {}
        for name in names:
            field_value = getattr(value, name)
            fields[name] = field_value if field_value.__class__ in _SELF_ENCODED else encode(field_value)
        return {"D": label, "f": fields}

    return encode_dataclass


#: The first matching class decides the form (so a str Enum stays a str, a Segment is not a plain dataclass).
_BY_BASE: tuple[tuple[type | tuple[type, ...], Callable[[Any], Any]], ...] = (
    ((bool, str, type(None)), _same),
    (enum.Enum, _encode_enum),
    (int, _same),
    ((bytes, bytearray, memoryview), _encode_bytes),
    (Segment, _encode_segment),
    (Table, _encode_table),
    (VtlAccessDenied, _encode_access_denied),
    (GuestMemoryError, _encode_memory_error),
    (BaseException, _encode_exception),
)
_ENCODERS: dict[type, Callable[[Any], Any]] = {}


def _encoder_for(cls: type) -> Callable[[Any], Any]:
    for base, encoder in _BY_BASE:
        if issubclass(cls, base):
            return encoder
    if dataclasses.is_dataclass(cls) and not issubclass(cls, type):
        return _dataclass_encoder(cls)
    if issubclass(cls, dict):
        return _encode_dict
    if issubclass(cls, list | tuple):
        return _encode_sequence
    return _encode_other


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


def fields_of(encoded: Any) -> dict[str, Any]:
    """The (still encoded) fields of a dataclass as :func:`encode` wrote it; {} for anything else."""
    return encoded.get("f", {}) if isinstance(encoded, dict) and "D" in encoded else {}


def enum_value_of(encoded: Any) -> Any:
    """The value of an Enum as :func:`encode` wrote it (ints stay ints, other values were tagged)."""
    return encoded["E"] if isinstance(encoded, dict) else encoded


def input_types() -> dict[str, type]:
    """Dataclasses the machine hands *to* the emulation (so replay must rebuild them)."""
    from vsmtrace.vmm.hyperv.reference_time import TscPageParams

    return {"TscPageParams": TscPageParams}


def decode_exception(data: Any) -> BaseException | None:
    if isinstance(data, dict) and "X" in data:
        make = EXCEPTIONS.get(data["X"])
        args = [decode_value(a) for a in data["a"]]
        return make(*args) if make is not None else RuntimeError(f"{data['X']}: {args}")
    return None


#: The standard library's compact encoder, for what orjson refuses (integers beyond 64 bits).
_JSON = json.JSONEncoder(separators=(",", ":"))


def json_writer() -> Callable[[Any], bytes]:
    """``dumps(value) -> bytes``: compact JSON of an encoded value (what ``encode`` returns), as UTF-8.

    orjson, because a recording makes three of these per emulation entry: 0.5 us for a
    hypercall's I/O log against 8.1 us with ``json`` (docs/benchmarks.md, issue 18, ninth
    session). Both write JSON that ``json.loads`` reads back to the same values, and replay
    compares values, never bytes. Imported here, by a machine that records, because
    importing orjson costs 3-4 ms (datetime, uuid) that no other run needs.
    """
    from orjson import dumps as fast

    def dumps(value: Any) -> bytes:
        try:
            return fast(value)
        except TypeError:  # orjson.JSONEncodeError: an integer beyond 64 bits (a 128-bit register)
            return _JSON.encode(value).encode()

    return dumps


def loads(data: bytes | None) -> Any:
    return None if data is None else json.loads(data)


#: An ``emit`` op of an I/O log, ``["emit",[KIND],SEQ]`` (any JSON whitespace allowed). JSON escapes
#: every quote inside a string, so this matches log elements only, never text inside a value.
EMIT_OP = re.compile(rb'\[\s*"' + Op.EMIT.encode() + rb'"\s*,\s*\[\s*(\d+)\s*\]\s*,\s*(\d+)\s*\]')


def emitted_events(log: bytes) -> tuple[list[int], list[int]]:
    """(kinds, seqs) of the events an encoded I/O log says its entry emitted, in order, without decoding the log.

    Replay needs these for every entry before it replays any (to check that no emulation
    event lacks its entry); a pattern scan costs a fraction of parsing every log.
    """
    found = EMIT_OP.findall(log)
    if not found:
        return [], []
    kinds, seqs = zip(*found, strict=True)
    return list(map(int, kinds)), list(map(int, seqs))


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
        self.dumps = json_writer() if self.recording else None
        self.local = threading.local()
        #: Numbers entries as they start. A recorder that lets C fast paths record operations standing for
        #: entries (``TraceWriter.entry_order``) numbers both, so the numbering has no gaps or repeats.
        self.next_order: Callable[[], int] = getattr(sink, "entry_order", None) or itertools.count().__next__

    def _stack(self) -> list[list[Any]]:
        stack = getattr(self.local, "stack", None)
        if stack is None:
            stack = self.local.stack = []
        return stack

    def note(self, op: str, args: Sequence[Any], result: Any = None) -> None:
        # The innermost open entry's list, read without ``_stack()`` (a recording notes tens of calls per
        # entry): a thread with no entry open has no stack, or an empty one, and logs nothing.
        stack = getattr(self.local, "stack", None)
        if stack:
            log = stack[-1]
            # encode()'s own first test, inlined: most arguments and results are ints and strings
            self_encoded = _SELF_ENCODED
            log.append([
                op,
                [a if a.__class__ in self_encoded else encode(a) for a in args],
                result if result.__class__ in self_encoded else encode(result),
            ])  # fmt: skip

    def entry(self, name: str, vp: int, vtl: int, args: Sequence[Any], fn: Callable[[], Any]) -> Any:
        if not self.recording:
            return fn()
        with self.lock:
            order = self.next_order()
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
            dumps = self.dumps
            assert dumps is not None
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
        return int(self._in(Op.ACTIVE_VTL, [self.index], lambda: self._inner.active_vtl))

    def get_register(self, vtl: int, name: str) -> Any:
        return self._in(Op.GET_REGISTER, [self.index, vtl, name], lambda: self._inner.get_register(vtl, name))

    def set_register(self, vtl: int, name: str, value: Any) -> None:
        self._out(Op.SET_REGISTER, [self.index, vtl, name, value], lambda: self._inner.set_register(vtl, name, value))

    def get_xmm(self, vtl: int, index: int) -> int:
        return int(self._in(Op.GET_XMM, [self.index, vtl, index], lambda: self._inner.get_xmm(vtl, index)))

    def set_xmm(self, vtl: int, index: int, value: int) -> None:
        self._out(Op.SET_XMM, [self.index, vtl, index, value], lambda: self._inner.set_xmm(vtl, index, value))

    def cpl(self, vtl: int) -> int:
        return int(self._in(Op.CPL, [self.index, vtl], lambda: self._inner.cpl(vtl)))

    def mode(self, vtl: int) -> CpuMode:
        return CpuMode(self._in(Op.MODE, [self.index, vtl], lambda: self._inner.mode(vtl)))

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        self._out(
            Op.INJECT_EXCEPTION, [self.index, vtl, vector, error_code], lambda: self._inner.inject_exception(vtl, vector, error_code)
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
        return self._in(Op.READ_GPA, [vtl, gpa, size, access], lambda: self._inner.read_gpa(vtl, gpa, size, access))

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self._out(Op.WRITE_GPA, [vtl, gpa, bytes(data)], lambda: self._inner.write_gpa(vtl, gpa, data))

    def reference_time(self) -> int:
        return int(self._in(Op.REFERENCE_TIME, [], self._inner.reference_time))

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self._out(Op.ASSERT_INTERRUPT, [vp_index, vtl, vector], lambda: self._inner.assert_interrupt(vp_index, vtl, vector))


class RecordedService(_Recorded):
    """Any other machine service (``vmm.protocol.Service``: APIC access, TLB flushes, VSM services, the clock).

    The methods ``SERVICE_INPUTS`` names for the service are inputs (their results are
    recorded), every other method an output.
    """

    def __init__(self, inner: Any, boundary: Boundary, service: str) -> None:
        super().__init__(inner, boundary)
        self._prefix = service
        self._inputs = SERVICE_INPUTS[service]

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)
        if not callable(target):
            return target
        op = service_op(self._prefix, name)

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
        self._live: set[int] = set()  # armed, neither fired nor cancelled (guarded by the emulation's lock)

    def arm(self, deadline_ns: int, callback: Callable[[], None]) -> Any:
        timer_id = next(self._ids)

        def fire() -> None:
            # The timer thread takes a due timer before it holds the emulation's lock, so an
            # entry may cancel it in between (a guest re-arming its synthetic timer on another
            # VP). The emulation ignores such a late expiry; it is not an entry either, or the
            # replay, which knows the timer was cancelled, would diverge there.
            with self._b.lock:
                if timer_id not in self._live:
                    return
                self._live.discard(timer_id)
                self._b.entry(Entry.TIMER, Entry.NO_VP, Entry.NO_VP, [timer_id], callback)

        handle = self._inner.arm(deadline_ns, fire)
        self._b.note(Op.TIMER_ARM, [timer_id, deadline_ns], None)
        self._handles[id(handle)] = timer_id
        self._live.add(timer_id)
        return handle

    def cancel(self, handle: Any) -> None:
        timer_id = self._handles.pop(id(handle), -1)
        self._live.discard(timer_id)
        self._b.note(Op.TIMER_CANCEL, [timer_id], None)
        self._inner.cancel(handle)


class RecordedSink:
    """The emulation's event sink: forwards to the trace and logs the sequence number of each event."""

    def __init__(self, inner: EventSink, boundary: Boundary) -> None:
        self._inner = inner
        self._b = boundary
        self.enabled = inner.enabled

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> Any:
        seq = self._inner.emit(kind, vp, vtl, rip, **fields)
        self._b.note(Op.EMIT, [int(kind)], seq)
        return seq

    def close(self) -> None:
        return None


def recorded_ports(ports: EmulationPorts, boundary: Boundary) -> EmulationPorts:
    """``ports`` with every call the emulation makes through them noted in ``boundary``'s I/O logs."""
    tsc_page = ports.tsc_page
    clock = RecordedService(SimpleNamespace(**{TSC_PAGE_PARAMS: tsc_page}), boundary, Service.CLOCK)
    return dataclasses.replace(
        ports,
        partition=RecordedPartition(ports.partition, boundary),
        timers=RecordedTimers(ports.timers, boundary),
        apic=RecordedService(ports.apic, boundary, Service.APIC),
        tlb=RecordedService(ports.tlb, boundary, Service.TLB),
        tsc_page=getattr(clock, TSC_PAGE_PARAMS),
        sink=RecordedSink(ports.sink, boundary),  # type: ignore[arg-type]
        vsm=None if ports.vsm is None else RecordedService(ports.vsm, boundary, Service.VSM),
    )
