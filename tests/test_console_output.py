"""vmm.console_output: the UART's bytes become one SERIAL event per line, nothing lost or reordered."""

from __future__ import annotations

import threading
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from vsmtrace.vmm.console_output import LINE_LIMIT, ConsoleLines
from vsmtrace.vmm.events import EventKind


class ListSink:
    """An EventSink that keeps (kind, vp, vtl, rip, fields) of every event."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int:
        self.events.append((kind, vp, vtl, rip, fields))
        return len(self.events) - 1


def feed(lines: ConsoleLines, sink: ListSink, text: bytes, vp: int = 0, vtl: int = 0, rip: int = 0x1000) -> None:
    for b in text:
        lines.add(sink, bytes((b,)), vp, vtl, rip)


def test_a_line_is_one_event_with_the_identity_of_its_newline() -> None:
    sink, lines = ListSink(), ConsoleLines()
    feed(lines, sink, b"hello\n", vp=1, vtl=1, rip=0x2000)
    assert sink.events == [(EventKind.SERIAL, 1, 1, 0x2000, {"data": b"hello\n"})]


def test_a_partial_line_waits_for_its_newline_or_a_flush() -> None:
    sink, lines = ListSink(), ConsoleLines()
    feed(lines, sink, b"login: ")
    assert sink.events == []
    lines.flush(sink)
    assert [e[4]["data"] for e in sink.events] == [b"login: "]
    lines.flush(sink)  # nothing pending: nothing recorded
    assert len(sink.events) == 1


def test_another_writer_ends_the_pending_line() -> None:
    sink, lines = ListSink(), ConsoleLines()
    feed(lines, sink, b"vp0 says", vp=0, rip=0x10)
    feed(lines, sink, b"vp1\n", vp=1, rip=0x20)
    feed(lines, sink, b"!", vp=-1)  # the machine itself (no VP thread)
    lines.flush(sink)
    assert [(e[1], e[3], e[4]["data"]) for e in sink.events] == [(0, 0x10, b"vp0 says"), (1, 0x20, b"vp1\n"), (0, None, b"!")]


def test_a_long_line_is_cut_at_the_limit() -> None:
    sink, lines = ListSink(), ConsoleLines()
    feed(lines, sink, b"x" * (LINE_LIMIT + 5))
    lines.flush(sink)
    assert [len(e[4]["data"]) for e in sink.events] == [LINE_LIMIT, 5]


@given(st.lists(st.tuples(st.integers(-1, 2), st.binary(min_size=1, max_size=40)), max_size=30))
def test_events_concatenate_to_the_output(writes: list[tuple[int, bytes]]) -> None:
    """Whatever the writers and bytes, the SERIAL data joined in order is the output, and an event
    ends at a newline only at its last byte (so no line is split except by a writer change)."""
    sink, lines = ListSink(), ConsoleLines()
    for vp, text in writes:
        feed(lines, sink, text, vp=vp)
    lines.flush(sink)
    data = [e[4]["data"] for e in sink.events]
    assert b"".join(data) == b"".join(text for _, text in writes)
    assert all(b"\n" not in d[:-1] and 0 < len(d) <= LINE_LIMIT for d in data)


def test_a_sink_that_flushes_from_inside_emit_does_not_deadlock() -> None:
    """A sink may stop the machine while it records a line (an error callback), and stopping flushes."""
    lines = ConsoleLines()

    class Reentrant(ListSink):
        def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int:
            lines.flush(self)
            return super().emit(kind, vp, vtl, rip, **fields)

    sink = Reentrant()
    done = threading.Event()

    def write() -> None:
        feed(lines, sink, b"ok\n")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    assert done.wait(10), "ConsoleLines deadlocked on a reentrant flush"
    assert [e[4]["data"] for e in sink.events] == [b"ok\n"]
