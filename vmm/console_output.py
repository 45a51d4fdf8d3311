"""The guest's console output as SERIAL events: one event per line, not per byte.

A guest prints a byte per OUT to the UART, and the PIO event of that OUT already holds
the byte. A SERIAL event per byte doubled the recorded events of a chatty guest (the VSM
demo: 980 of its 2,440 events built in Python) and made the console hard to read in a
trace. So bytes are gathered, per writer, until one of:

* a newline (it ends the event's data),
* another VP (or the machine itself) writes to the UART,
* ``LINE_LIMIT`` bytes are pending,
* the machine stops (``flush``), so a prompt without a newline is recorded too.

The event carries the identity (VP, VTL, RIP) of the write that ended it, and the
``seq`` of that moment: the line's bytes are the ``serial_data`` of SERIAL events
concatenated in ``seq`` order, exactly as before (docs/trace-format.md).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vsmtrace.vmm.events import EventKind, EventSink

#: A line longer than this is recorded in pieces of this many bytes.
LINE_LIMIT = 4096
NEWLINE = 0x0A


@dataclass
class ConsoleLines:
    """Pending console bytes of one writer, turned into SERIAL events on the sink a call names.

    The sink is an argument, not a field: a machine's sink is replaced after the
    machine is built (``vsmtrace run --record`` attaches the trace writer then).
    """

    # Reentrant: an event sink that stops the machine from inside emit (an error callback) flushes again.
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _pending: bytearray = field(default_factory=bytearray)
    _writer: tuple[int, int, int] | None = None  # (vp, vtl, rip) of the last pending byte; vp -1: the machine

    def add(self, sink: EventSink, data: bytes, vp: int, vtl: int, rip: int) -> None:
        """Bytes written by ``vp`` (-1: no VP) at ``rip``; emits what a newline, a new writer or the limit ends."""
        with self._lock:
            writer = self._writer
            if writer is not None and writer[0] != vp:
                self._emit(sink)
            self._pending += data
            self._writer = (vp, vtl, rip)
            if data[-1] == NEWLINE or len(self._pending) >= LINE_LIMIT:
                self._emit(sink)

    def flush(self, sink: EventSink) -> None:
        """Emit what is pending (the machine is stopping, or output must precede an event)."""
        with self._lock:
            self._emit(sink)

    def _emit(self, sink: EventSink) -> None:
        writer = self._writer
        if writer is None:
            return
        data = bytes(self._pending)
        self._pending.clear()
        self._writer = None
        vp, vtl, rip = writer
        if vp < 0:
            sink.emit(EventKind.SERIAL, 0, 0, None, data=data)
        else:
            sink.emit(EventKind.SERIAL, vp, vtl, rip, data=data)
