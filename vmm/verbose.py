"""``vsmtrace -v``: what the VMM does, as log lines, from the events it emits anyway.

:class:`VerboseSink` sits in front of the real sink (the trace writer, or nothing)
and logs the events a person follows a VSM guest by: VPs starting and stopping,
VTL enablement and switches, protection changes, secure intercepts, hypercalls,
guest exits and errors. Every kind has its own rate limit (a burst, then a steady
rate), and what the limit held back is counted and reported, so a guest that
switches VTLs a million times cannot flood the terminal or slow the run to a crawl.
Port I/O and MMIO go straight to the wrapped sink, unlogged: they are the bulk of
every trace and say little on their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vsmtrace.vmm.events import EventKind, EventSink, NullSink

log = logging.getLogger("vsmtrace.vmm")

#: Lines per kind let through at once, then per second.
BURST = 20
RATE_PER_S = 5.0


def verbose_enabled() -> bool:
    """Whether -v asked for the VMM's debug log."""
    return log.isEnabledFor(logging.DEBUG)


def _mask(mask: int | None) -> str:
    if mask is None:
        return "?"
    parts = [c for bit, c in ((1, "R"), (2, "W"), (4, "X"), (8, "UX")) if mask & bit]
    return f"{mask:#x} ({''.join(parts) or 'no access'})"


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"


def _describe(kind: EventKind, vp: int, vtl: int, rip: int | None, f: dict[str, Any]) -> str | None:
    """One log line for an event of a logged kind, None for the others."""
    where = f"VP{vp} VTL{vtl}"
    if kind is EventKind.VP_START:
        return f"{where}: VP started at rip {_hex(rip)}"
    if kind is EventKind.VP_STOP:
        return f"{where}: VP stopped" + (f" ({f['reason']})" if f.get("reason") else "")
    if kind is EventKind.VTL_SWITCH:
        return f"VP{vp}: VTL{f.get('from_vtl', vtl)} -> VTL{f.get('to_vtl', '?')} ({f.get('reason', '?')}) at rip {_hex(rip)}"
    if kind is EventKind.VTL_ENABLE:
        target = "the partition" if f.get("target_vp") is None else f"VP{f['target_vp']}"
        return f"{where}: VTL{f.get('target_vtl', '?')} enabled for {target}"
    if kind is EventKind.PROTECTION:
        pages = f.get("pages") or 0
        start = f.get("gpa_start") or 0
        return (
            f"{where}: VTL{f.get('target_vtl', '?')} protection of {pages} page(s) at GPA {_hex(start)}"
            f"-{_hex(start + pages * 4096 - 1) if pages else '?'}: {_mask(f.get('old_mask'))} -> {_mask(f.get('new_mask'))}"
        )
    if kind is EventKind.INTERCEPT:
        return f"{where}: secure memory intercept: {f.get('access', '?')} of GPA {_hex(f.get('gpa'))} at rip {_hex(rip)}"
    if kind is EventKind.HYPERCALL:
        return f"{where}: hypercall {f.get('name') or _hex(f.get('code'))} -> {f.get('status_name') or f.get('status')}"
    if kind is EventKind.GUEST_EXIT:
        return f"{where}: guest exit status {f.get('exit_status')}" + (f": {f['message']}" if f.get("message") else "")
    if kind is EventKind.ERROR:
        return f"{where}: error: {f.get('message')}"
    return None


@dataclass
class _Bucket:
    """A token bucket per kind, plus how many lines it held back since the last one let through."""

    tokens: float = BURST
    last: float = field(default_factory=time.monotonic)
    held: int = 0
    held_total: int = 0


class VerboseSink:
    """An ``EventSink`` that logs notable events (rate-limited) and forwards everything to ``inner``."""

    def __init__(self, inner: EventSink | None = None, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.inner: Any = inner if inner is not None else NullSink()
        self.enabled = True
        self.clock = clock
        self._buckets: dict[EventKind, _Bucket] = {}
        self._lock = threading.Lock()
        # The hot paths go to the wrapped sink unchanged (a recorder's C fast path included).
        inner_on = bool(self.inner.enabled)
        self.record_io = self.inner.record_io if inner_on else _no_io
        self.flush_due = self.inner.flush_due
        native = getattr(self.inner, "native_io", None) if inner_on else None
        if native is not None:
            self.native_io = native

    def emit(self, kind: EventKind, vp: int, vtl: int, rip: int | None, **fields: Any) -> int | None:
        seq = self.inner.emit(kind, vp, vtl, rip, **fields) if self.inner.enabled else None
        try:
            line = _describe(kind, vp, vtl, rip, fields)
        except Exception:  # a field of an unexpected type: logging must never stop the guest
            line = f"VP{vp} VTL{vtl}: {kind.name}"
        if line is not None:
            self._log(kind, line)
        return seq

    def _log(self, kind: EventKind, line: str) -> None:
        with self._lock:
            b = self._buckets.get(kind)
            if b is None:
                b = self._buckets[kind] = _Bucket(last=self.clock())
            now = self.clock()
            b.tokens = min(BURST, b.tokens + (now - b.last) * RATE_PER_S)
            b.last = now
            if b.tokens < 1:
                b.held += 1
                b.held_total += 1
                return
            b.tokens -= 1
            held, b.held = b.held, 0
        if held:
            line += f"  [{held} more {kind.name} event(s) not shown]"
        log.debug("%s", line)

    @property
    def held_back(self) -> dict[str, int]:
        """Lines the rate limit held back, per kind."""
        return {k.name: b.held_total for k, b in self._buckets.items() if b.held_total}

    def close_log(self) -> None:
        """Say what the rate limit held back (the wrapped sink is closed by its owner)."""
        held = self.held_back
        if held:
            log.debug("rate limit held back %s", ", ".join(f"{n} {k}" for k, n in sorted(held.items())))

    def close(self) -> None:
        self.close_log()
        self.inner.close()


def _no_io(kind: EventKind, vp: int, vtl: int, rip: int, address: int, size: int, is_write: bool, data: int) -> int:
    return 0
