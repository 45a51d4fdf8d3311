"""`vsmtrace -v`: the VMM says what it does (VP starts, VTL switches, protections, intercepts), rate-limited."""

from __future__ import annotations

import logging
import re

import pytest
from vsmtrace.vmm.events import EventKind, ListSink
from vsmtrace.vmm.verbose import BURST, VerboseSink

from tests.conftest import run_vsmtrace


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_holds_back_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    inner = ListSink()
    clock = Clock()
    sink = VerboseSink(inner, clock=clock)
    caplog.set_level(logging.DEBUG, logger="vsmtrace.vmm")
    for i in range(BURST + 30):
        sink.emit(EventKind.VTL_SWITCH, 0, 0, 0x1000 + i, from_vtl=0, to_vtl=1, reason="call")
    assert len(inner.events) == BURST + 30  # everything reaches the recorder
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == BURST and lines[0] == "VP0: VTL0 -> VTL1 (call) at rip 0x1000"
    clock.now += 1.0  # the bucket refills
    sink.emit(EventKind.VTL_SWITCH, 0, 1, 0x2000, from_vtl=1, to_vtl=0, reason="return")
    assert caplog.records[-1].getMessage() == "VP0: VTL1 -> VTL0 (return) at rip 0x2000  [30 more VTL_SWITCH event(s) not shown]"
    sink.emit(EventKind.PROTECTION, 1, 1, None, target_vtl=0, gpa_start=0x10A000, pages=2, old_mask=0xF, new_mask=0x1)
    assert caplog.records[-1].getMessage() == "VP1 VTL1: VTL0 protection of 2 page(s) at GPA 0x10a000-0x10bfff: 0xf (RWXUX) -> 0x1 (R)"
    sink.close_log()
    assert caplog.records[-1].getMessage() == "rate limit held back 30 VTL_SWITCH"


def test_port_io_goes_to_the_recorder_unlogged(caplog: pytest.LogCaptureFixture) -> None:
    inner = ListSink()
    sink = VerboseSink(inner)
    caplog.set_level(logging.DEBUG, logger="vsmtrace.vmm")
    assert sink.record_io(EventKind.PIO, 0, 0, 0x10, 0x3F8, 1, True, 0x41) == 0
    assert inner.events[0][0] is EventKind.PIO and not caplog.records


@pytest.mark.kvm
@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_run_logs_what_the_vmm_does(guest, where: str) -> None:  # type: ignore[no-untyped-def]
    kernel = str(guest("vsm_protect"))
    args = ["run", kernel, "-v", "--timeout", "120"] if where == "after" else ["-v", "run", kernel, "--timeout", "120"]
    r = run_vsmtrace(args, timeout=240)
    assert r.guest_exit_code == 0, r.stderr[-2000:]
    log = r.stderr
    assert re.search(r"^vsmtrace: DEBUG: VP0 VTL0: VP started at rip 0x[0-9a-f]+$", log, re.M), log[:2000]
    assert re.search(r"^vsmtrace: DEBUG: VP0: VTL0 -> VTL1 \(call\) at rip 0x", log, re.M)
    assert re.search(r"^vsmtrace: DEBUG: VP0 VTL0: VTL1 enabled for the partition$", log, re.M)
    assert re.search(r"^vsmtrace: DEBUG: VP0 VTL0: VTL1 enabled for VP0$", log, re.M)
    assert re.search(r"^vsmtrace: DEBUG: VP0 VTL1: VTL0 protection of \d+ page\(s\) at GPA 0x", log, re.M)
    assert re.search(r"^vsmtrace: DEBUG: VP0 VTL0: secure memory intercept: (read|write|execute) of GPA 0x", log, re.M)
    assert "rate limit held back" in log or "not shown" in log or log.count("VTL0 -> VTL1") < 200
    quiet = run_vsmtrace(["run", kernel, "--timeout", "120"], timeout=240)
    assert "DEBUG" not in quiet.stderr
