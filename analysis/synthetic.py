"""Synthetic VSM traces written through the real TraceWriter, with a controllable clock.

Real VSM traces do not exist yet, so tests, the benchmark and notebooks need traces whose
content is known. Everything goes through ``TraceWriter.emit`` with the schema's field
names, so a synthetic trace is byte-for-byte the kind of file the VMM produces; only
``time_ns`` is ours (a fake clock), which makes latencies hand-countable and the files
reproducible.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vsmtrace.recorder.writer import TraceWriter
from vsmtrace.vmm.events import EventKind as K

__all__ = ["FakeClockWriter", "synthetic_writer", "write_realistic"]


class FakeClockWriter:
    """Wraps a TraceWriter; ``emit(..., at=ns)`` stamps the event at ``at`` ns after trace start.

    The writer stamps events with ``self.now`` (``TraceWriter.set_manual_time``) instead of
    its clock. ``max_age_s`` is huge so the writer never flushes on age (its age checks
    would mix real and fake time).
    """

    def __init__(self, writer: TraceWriter) -> None:
        self.writer = writer
        self.now = 0
        writer.set_manual_time(0)

    def emit(self, kind: K, vp: int, vtl: int, rip: int | None, *, at: int | None = None, **fields: Any) -> None:
        """Record one event; ``at`` (ns since start) must not go backwards."""
        if at is not None:
            if at < self.now:
                raise ValueError(f"fake clock cannot go backwards ({at} < {self.now})")
            self.now = at
            self.writer.set_manual_time(at)
        self.writer.emit(kind, vp, vtl, rip, **fields)

    def advance(self, ns: int) -> None:
        self.now += ns
        self.writer.set_manual_time(self.now)


@contextmanager
def synthetic_writer(path: str | os.PathLike[str], metadata: dict[str, Any] | None = None) -> Iterator[FakeClockWriter]:
    """Open a TraceWriter on ``path`` driven by a fake clock; seals the trace on exit."""
    md = {"vm_config": {"synthetic": True}, "command_line": ["synthetic"]}
    md.update(metadata or {})
    w = TraceWriter(path, md, max_age_s=1e6, fsync_on_close=False, batch_rows=65536)
    try:
        yield FakeClockWriter(w)
    finally:
        w.close()


# Secure-call service codes and the hypercalls a VTL1 kernel makes while serving them.
_SERVICES = (0x01, 0x02, 0x07, 0x10, 0x22)
_VTL0_CALLS = ((0x0002, "HvCallFlushVirtualAddressSpace"), (0x0050, "HvCallGetVpRegisters"),
               (0x0051, "HvCallSetVpRegisters"), (0x005C, "HvCallPostMessage"), (0x0008, "HvCallNotifyLongSpinWait"))
_VTL1_CALLS = ((0x000C, "HvCallModifyVtlProtectionMask"), (0x0050, "HvCallGetVpRegisters"), (0x0051, "HvCallSetVpRegisters"))
_STATUSES = ((0, "HV_STATUS_SUCCESS"), (0x0003, "HV_STATUS_INVALID_PARAMETER"), (0x0006, "HV_STATUS_ACCESS_DENIED"))


def write_realistic(path: str | os.PathLike[str], events: int, *, vps: int = 2, seed: int = 1) -> int:
    """Write about ``events`` events of a plausible VBS workload; returns the count written.

    Per VP, VTL0 runs port I/O, MSR, CPUID, exits, interrupts and ordinary hypercalls,
    and now and then makes a secure call (VtlCall + switch with service code in args[0])
    or hits a protected page (intercept + switch); VTL1 makes a few hypercalls (some
    change protections), sometimes takes an interrupt, then returns. VPs interleave
    in time; the fake clock advances 0.2-3 us per event.
    """
    rng = random.Random(seed)
    rnd = rng.random
    rips0 = [0xFFFF_F800_0010_0000 + 0x40 * i for i in range(512)]
    rips1 = [0xFFFF_F880_0020_0000 + 0x40 * i for i in range(128)]
    pages = [0x10_0000 + 0x1000 * i for i in range(1024)]
    written = 0
    with synthetic_writer(path, {"extra": {"generator": "analysis.synthetic.write_realistic", "seed": seed}}) as w:
        emit = w.emit
        vtl = [0] * vps
        depth = [0] * vps  # events left in the current VTL1 stint
        now = 0
        for vp in range(vps):
            emit(K.VP_START, vp, 0, 0xFFF0, at=now)
            written += 1
        while written < events - vps:
            vp = rng.randrange(vps)
            now += 200 + int(rnd() * 2800)
            w.now = now
            r = rnd()
            if vtl[vp] == 0:
                rip = rips0[int(rnd() * 512)]
                if r < 0.25:
                    emit(K.PIO, vp, 0, rip, address=0x3F8, size=1, is_write=True, data=0x41 + int(rnd() * 26))
                elif r < 0.40:
                    emit(K.MSR, vp, 0, rip, msr=0x40000070 + int(rnd() * 4), value=int(rnd() * 4096) << 12, is_write=rnd() < 0.6, fault=False)
                elif r < 0.47:
                    emit(K.CPUID, vp, 0, rip, leaf=0x40000000 + int(rnd() * 6), subleaf=0, eax=0x40000006, ebx=0x7263694D, ecx=0x666F736F, edx=0x76482074)
                elif r < 0.57:
                    emit(K.EXIT, vp, 0, rip, exit_reason="HLT" if rnd() < 0.7 else "IRQ_WINDOW_OPEN", exit_code=5)
                elif r < 0.67:
                    emit(K.INTERRUPT, vp, 0, rip, vector=0x30 if rnd() < 0.6 else 0xEF, source="apic-timer" if rnd() < 0.6 else "ipi")
                elif r < 0.72:
                    emit(K.TIMER, vp, 0, None, timer="apic-timer", deadline_ns=now - int(rnd() * 5000))
                elif r < 0.82:
                    code, name = _VTL0_CALLS[int(rnd() * len(_VTL0_CALLS))]
                    st, stn = _STATUSES[0] if rnd() < 0.95 else _STATUSES[1 + int(rnd() * 2)]
                    emit(K.HYPERCALL, vp, 0, rip, code=code, name=name, control=code, fast=rnd() < 0.4, rep_count=0,
                         rep_start=0, reps_done=0, status=st, status_name=stn, duration_ns=2000 + int(rnd() * 20000))
                elif r < 0.96:
                    svc = _SERVICES[int(rnd() * len(_SERVICES))]
                    emit(K.HYPERCALL, vp, 0, rip, code=0x11, name="HvCallVtlCall", control=0x11, fast=True, duration_ns=800)
                    emit(K.VTL_SWITCH, vp, 0, rip, from_vtl=0, to_vtl=1, reason="call", args=(svc, int(rnd() * 4096), 0, 0))
                    vtl[vp], depth[vp] = 1, 2 + int(rnd() * 12)
                    written += 1
                else:
                    gpa = pages[int(rnd() * 1024)] + int(rnd() * 4096)
                    emit(K.INTERCEPT, vp, 0, rip, access="write" if rnd() < 0.7 else ("read" if rnd() < 0.6 else "execute"), gpa=gpa,
                         gva=0xFFFF_C000_0000_0000 + gpa)
                    emit(K.VTL_SWITCH, vp, 0, rip, from_vtl=0, to_vtl=1, reason="intercept")
                    vtl[vp], depth[vp] = 1, 2 + int(rnd() * 6)
                    written += 1
            else:
                rip = rips1[int(rnd() * 128)]
                depth[vp] -= 1
                if depth[vp] <= 0:
                    emit(K.HYPERCALL, vp, 1, rip, code=0x12, name="HvCallVtlReturn", control=0x12, fast=True, duration_ns=700)
                    emit(K.VTL_SWITCH, vp, 1, rip, from_vtl=1, to_vtl=0, reason="return")
                    vtl[vp] = 0
                    written += 1
                elif r < 0.5:
                    code, name = _VTL1_CALLS[int(rnd() * len(_VTL1_CALLS))]
                    emit(K.HYPERCALL, vp, 1, rip, code=code, name=name, control=code, fast=False, rep_count=0, rep_start=0,
                         reps_done=0, status=0, status_name="HV_STATUS_SUCCESS", duration_ns=3000 + int(rnd() * 30000))
                    if code == 0x000C and rnd() < 0.3:
                        n = 1 + int(rnd() * 8)
                        emit(K.PROTECTION, vp, 1, rip, target_vtl=0, gpa_start=pages[int(rnd() * (1024 - n))], pages=n,
                             old_mask=None, new_mask=(0x1, 0x5, 0xD, 0xF)[int(rnd() * 4)])
                        written += 1
                elif r < 0.7:
                    emit(K.INTERRUPT, vp, 1, rip, vector=0xF0, source="synic")
                elif r < 0.8:
                    emit(K.SYNIC_MESSAGE, vp, 1, None, sint=0, message_type=0x80000001, message=bytes(32))
                else:
                    emit(K.MSR, vp, 1, rip, msr=0x40000090, value=0, is_write=False, fault=False)
            written += 1
            if rnd() < 2e-6:
                emit(K.ERROR, vp, vtl[vp], None, message="synthetic error for the report")
                written += 1
        for vp in range(vps):
            now += 1000
            emit(K.VP_STOP, vp, vtl[vp], None, at=now, reason="guest-exit")
            written += 1
    return written


def default_path(events: int) -> Path:
    """Cache location for generated traces: ``<cache>/analysis`` (the cache base of ``vmm.native.cache_dir``)."""
    from vsmtrace.vmm.native import cache_dir

    p = cache_dir() / "analysis"
    p.mkdir(parents=True, exist_ok=True)
    return p / f"synthetic-{events}.vsmt"
