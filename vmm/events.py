"""The event sink: how every layer of the VMM reports what it did.

Handlers call ``sink.emit(kind, vp, vtl, rip, **fields)``. The default sink
drops everything; the recorder (``recorder.writer.TraceWriter``) implements the
same protocol and turns each call into a row of the trace. Field names per kind
are the recorder schema's column names (see ``recorder/schema.py``), so a
handler never knows whether it is being recorded.

Port-I/O and MMIO events, one per exit on the hottest paths, have a positional
fast path, ``record_io``, which the recorder serves with one C call; when it
returns a positive status the caller passes it to ``flush_due``. A sink may also
offer ``native_io`` = (address of a C function with ``record_io``'s arguments after
a leading ``void *``, that argument): the machine then records OUTs to device ports
inside its KVM_RUN call, without Python (``Machine.attach_exit_recorders``).
"""

from __future__ import annotations

import enum
from typing import Any, Protocol


class EventKind(enum.IntEnum):
    """What happened. Values are stable: they are stored in traces."""

    VP_START = 1
    VP_STOP = 2
    EXIT = 3  # a VM exit handled (reason + decoded fields)
    PIO = 4  # port I/O access
    MMIO = 5  # MMIO access (device or protection-completed)
    MSR = 6  # MSR access
    CPUID = 7
    INTERRUPT = 8  # interrupt injected into a VP at a VTL
    TIMER = 9  # timer expiry (APIC timer, synthetic timer)
    HYPERCALL = 10
    VTL_SWITCH = 11
    INTERCEPT = 12  # secure memory intercept
    PROTECTION = 13  # VTL protection change
    SYNIC_MESSAGE = 14
    VTL_ENABLE = 15  # partition or VP VTL enablement
    GUEST_EXIT = 16  # isa-debug-exit, triple fault, crash MSRs
    ERROR = 17  # VMM error or guest stop with a message
    SERIAL = 18  # bytes written to the UART (for analysis and replay)
    EMULATION = 19  # one call into the Hyper-V/VSM emulation, with its I/O log (vmm/emulation_io.py)
    LIMITATION = 20  # the host cannot do something the guest asked for (reported once per run)


class EventSink(Protocol):
    """Receives events. ``enabled`` lets hot paths skip building field values."""

    enabled: bool

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int | None:
        """Record an event; a recording sink returns the event's sequence number."""
        ...

    def record_io(self, kind: EventKind, vp: int, vtl: int, rip: int, address: int, size: int, is_write: bool, data: int) -> int:
        """A PIO or MMIO event (the fields of ``emit``, positional); > 0: call ``flush_due`` with it."""
        ...

    def flush_due(self, status: int) -> None:
        """Let the sink write what ``record_io`` said is due (called outside any VMM lock)."""
        ...

    def close(self) -> None: ...


class NullSink:
    """The default: records nothing, costs one attribute check per event site."""

    enabled = False

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int, **fields: Any) -> None:
        return None

    def record_io(self, kind: EventKind, vp: int, vtl: int, rip: int, address: int, size: int, is_write: bool, data: int) -> int:
        return 0

    def flush_due(self, status: int) -> None:
        return None

    def close(self) -> None:
        return None


class ListSink:
    """Keeps events in memory; for tests and the in-process replay checker."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[EventKind, int, int, int, dict[str, Any]]] = []

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int, **fields: Any) -> None:
        self.events.append((kind, vp, vtl, rip, fields))

    def record_io(self, kind: EventKind, vp: int, vtl: int, rip: int, address: int, size: int, is_write: bool, data: int) -> int:
        self.emit(kind, vp, vtl, rip, address=address, size=size, is_write=bool(is_write), data=data)
        return 0

    def flush_due(self, status: int) -> None:
        return None

    def close(self) -> None:
        return None
