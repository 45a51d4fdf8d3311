"""Synthetic VSM traces written through the real TraceWriter, with a controllable clock.

Real VSM traces do not exist yet, so tests, the benchmark and notebooks need traces whose
content is known. Everything goes through ``TraceWriter.emit`` with the schema's field
names, so a synthetic trace is byte-for-byte the kind of file the VMM produces; only
``time_ns`` is ours (a fake clock), which makes latencies hand-countable and the files
reproducible.
"""

from __future__ import annotations

import heapq
import math
import os
import random
from collections.abc import Iterator, Mapping
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


# Timing model of write_realistic, calibrated on the demo trace recorded on this project's
# host (docs/analysis.md, "Synthetic traces"): per-VP gaps between ordinary events have a
# median of ~10 us and a tail into milliseconds (halts), hypercalls take ~0.25 ms median to
# serve, a secure call spends ~0.5-5 ms in VTL1. Lognormal draws: (median ns, sigma).
_GAP = (10_000, 1.2)  # between two ordinary events on one VP
_IDLE = (400_000, 1.0)  # after a HLT exit: the VP sleeps until an interrupt
_SHORT = (3_000, 0.5)  # between causally chained events (hypercall -> switch, intercept -> switch)
_HYPERCALL = (250_000, 1.0)  # service time of an ordinary hypercall (duration_ns)
_VTL_HOP = (260_000, 0.8)  # service time of HvCallVtlCall / HvCallVtlReturn
_VTL1_GAP = (40_000, 1.0)  # between events of a VTL1 stint (the secure kernel's work)


class _VP:
    """One virtual processor of the generator: its VTL and the events it has yet to emit."""

    __slots__ = ("vp", "vtl", "depth", "queue", "slow")

    def __init__(self, vp: int) -> None:
        self.vp = vp
        self.vtl = 0
        self.depth = 0  # events left in the current VTL1 stint
        self.queue: list[tuple[int, K, int, int | None, dict[str, Any]]] = []  # (delay ns, kind, vtl, rip, fields)
        self.slow = 1.0  # VTL1 time multiplier of the current stint (slow_services)


def write_realistic(
    path: str | os.PathLike[str],
    events: int,
    *,
    vps: int = 2,
    seed: int = 1,
    metadata: Mapping[str, Any] | None = None,
    slow_services: Mapping[int, float] | None = None,
) -> int:
    """Write about ``events`` events of a plausible VBS workload; returns the count written.

    Per VP, VTL0 runs port I/O, MSR, CPUID, exits, interrupts and ordinary hypercalls,
    and now and then makes a secure call (HvCallVtlCall, then a switch with the service
    code in args[0]) or hits a protected page (intercept, then a switch); VTL1 makes a
    few hypercalls (some change protections), takes interrupts, then returns
    (HvCallVtlReturn, then the switch back). Each VP keeps its own clock: the next event
    of a VP is due a lognormal gap after its last one (see the timing constants above),
    a hypercall event lands ``duration_ns`` after the VP's previous event at the
    earliest (it is stamped when the call completes), and VPs interleave in time order,
    so ``time_ns`` is non-decreasing in ``seq`` and per VP, as in a recorded trace.
    Every VTL1 stint returns before its VP stops. ``slow_services`` multiplies the time VTL1
    spends on secure calls to the given service codes (its gaps and hypercall service
    times; a planted regression);
    ``metadata`` adds trace metadata (``vm_config``, ``guest_image``, ...).
    """
    rng = random.Random(seed)
    rnd = rng.random
    lognorm = rng.lognormvariate
    slow = dict(slow_services or {})

    def draw(spec: tuple[int, float]) -> int:
        return int(lognorm(math.log(spec[0]), spec[1]))

    rips0 = [0xFFFF_F800_0010_0000 + 0x40 * i for i in range(512)]
    rips1 = [0xFFFF_F880_0020_0000 + 0x40 * i for i in range(128)]
    pages = [0x10_0000 + 0x1000 * i for i in range(1024)]

    def vtl0_action(p: _VP) -> None:
        """Queue the next thing VTL0 does on ``p``."""
        r = rnd()
        rip = rips0[int(rnd() * 512)]
        q = p.queue
        if r < 0.25:
            q.append((draw(_GAP), K.PIO, 0, rip, {"address": 0x3F8, "size": 1, "is_write": True, "data": 0x41 + int(rnd() * 26)}))
        elif r < 0.40:
            q.append((draw(_GAP), K.MSR, 0, rip, {"msr": 0x40000070 + int(rnd() * 4), "value": int(rnd() * 4096) << 12,
                                                  "is_write": rnd() < 0.6, "fault": False}))  # fmt: skip
        elif r < 0.47:
            q.append((draw(_GAP), K.CPUID, 0, rip, {"leaf": 0x40000000 + int(rnd() * 6), "subleaf": 0, "eax": 0x40000006,
                                                    "ebx": 0x7263694D, "ecx": 0x666F736F, "edx": 0x76482074}))  # fmt: skip
        elif r < 0.57:
            if rnd() < 0.7:  # HLT: the VP sleeps until the next interrupt
                q.append((draw(_GAP), K.EXIT, 0, rip, {"exit_reason": "HLT", "exit_code": 5}))
                q.append((draw(_IDLE), K.INTERRUPT, 0, rip, {"vector": 0x30, "source": "apic-timer"}))
            else:
                q.append((draw(_GAP), K.EXIT, 0, rip, {"exit_reason": "IRQ_WINDOW_OPEN", "exit_code": 7}))
        elif r < 0.67:
            apic = rnd() < 0.6
            q.append((draw(_GAP), K.INTERRUPT, 0, rip, {"vector": 0x30 if apic else 0xEF, "source": "apic-timer" if apic else "ipi"}))
        elif r < 0.72:
            lag = int(rnd() * 5000)
            q.append((draw(_GAP), K.TIMER, 0, None, {"timer": "apic-timer", "deadline_ns": -lag}))  # made absolute at emit
        elif r < 0.82:
            code, name = _VTL0_CALLS[int(rnd() * len(_VTL0_CALLS))]
            st, stn = _STATUSES[0] if rnd() < 0.95 else _STATUSES[1 + int(rnd() * 2)]
            d = draw(_HYPERCALL)
            q.append((d + draw(_SHORT), K.HYPERCALL, 0, rip, {"code": code, "name": name, "control": code, "fast": rnd() < 0.4,
                                                              "rep_count": 0, "rep_start": 0, "reps_done": 0, "status": st,
                                                              "status_name": stn, "duration_ns": d}))  # fmt: skip
        elif r < 0.96:
            svc = _SERVICES[int(rnd() * len(_SERVICES))]
            d = draw(_VTL_HOP)
            q.append((d + draw(_SHORT), K.HYPERCALL, 0, rip, {"code": 0x11, "name": "HvCallVtlCall", "control": 0x11, "fast": True,
                                                              "duration_ns": d}))  # fmt: skip
            q.append((draw(_SHORT), K.VTL_SWITCH, 0, rip, {"from_vtl": 0, "to_vtl": 1, "reason": "call",
                                                            "args": (svc, int(rnd() * 4096), 0, 0)}))  # fmt: skip
            p.depth, p.slow = 2 + int(rnd() * 12), slow.get(svc, 1.0)
        else:
            gpa = pages[int(rnd() * 1024)] + int(rnd() * 4096)
            access = "write" if rnd() < 0.7 else ("read" if rnd() < 0.6 else "execute")
            q.append((draw(_GAP), K.INTERCEPT, 0, rip, {"access": access, "gpa": gpa, "gva": 0xFFFF_C000_0000_0000 + gpa}))
            q.append((draw(_SHORT), K.VTL_SWITCH, 0, rip, {"from_vtl": 0, "to_vtl": 1, "reason": "intercept"}))
            p.depth, p.slow = 2 + int(rnd() * 6), 1.0
        if p.depth:
            p.vtl = 1  # takes effect with the switch, the last event queued

    def vtl1_action(p: _VP) -> None:
        """Queue the next thing VTL1 does on ``p`` (its last action returns to VTL0)."""
        rip = rips1[int(rnd() * 128)]
        q = p.queue
        p.depth -= 1
        gap = int(draw(_VTL1_GAP) * p.slow)
        if p.depth <= 0:
            d = draw(_VTL_HOP)
            q.append((gap + d, K.HYPERCALL, 1, rip, {"code": 0x12, "name": "HvCallVtlReturn", "control": 0x12, "fast": True,
                                                     "duration_ns": d}))  # fmt: skip
            q.append((draw(_SHORT), K.VTL_SWITCH, 1, rip, {"from_vtl": 1, "to_vtl": 0, "reason": "return"}))
            p.vtl, p.depth = 0, 0
            return
        r = rnd()
        if r < 0.5:
            code, name = _VTL1_CALLS[int(rnd() * len(_VTL1_CALLS))]
            d = int(draw(_HYPERCALL) * p.slow)
            q.append((gap + d, K.HYPERCALL, 1, rip, {"code": code, "name": name, "control": code, "fast": False, "rep_count": 0,
                                                     "rep_start": 0, "reps_done": 0, "status": 0,
                                                     "status_name": "HV_STATUS_SUCCESS", "duration_ns": d}))  # fmt: skip
            if code == 0x000C and rnd() < 0.3:
                n = 1 + int(rnd() * 8)
                q.append((draw(_SHORT), K.PROTECTION, 1, rip, {"target_vtl": 0, "gpa_start": pages[int(rnd() * (1024 - n))], "pages": n,
                                                               "old_mask": None, "new_mask": (0x1, 0x5, 0xD, 0xF)[int(rnd() * 4)]}))  # fmt: skip
        elif r < 0.7:
            q.append((gap, K.INTERRUPT, 1, rip, {"vector": 0xF0, "source": "synic"}))
        elif r < 0.8:
            q.append((gap, K.SYNIC_MESSAGE, 1, None, {"sint": 0, "message_type": 0x80000001, "message": bytes(32)}))
        else:
            q.append((gap, K.MSR, 1, rip, {"msr": 0x40000090, "value": 0, "is_write": False, "fault": False}))

    md: dict[str, Any] = {"generator": "analysis.synthetic.write_realistic", "seed": seed}  # kept under "extra"
    md.update(metadata or {})
    written = 0
    with synthetic_writer(path, md) as w:
        emit = w.emit
        state = [_VP(vp) for vp in range(vps)]
        heap: list[tuple[int, int]] = []
        last = 0
        for p in state:
            emit(K.VP_START, p.vp, 0, 0xFFF0, at=1000 * p.vp)
            written += 1
        for p in state:
            vtl0_action(p)
            heapq.heappush(heap, (1000 * vps + p.queue[0][0], p.vp))
        budget = events - 3 * vps  # room for the closing return and stop of each VP
        while written < budget or any(p.queue for p in state):
            now, vp = heapq.heappop(heap)
            last = now
            p = state[vp]
            _, kind, vtl, rip, fields = p.queue.pop(0)
            if kind is K.TIMER:
                fields["deadline_ns"] += now
            emit(kind, vp, vtl, rip, at=now, **fields)
            written += 1
            if kind is K.INTERRUPT and rnd() < 2e-5:
                emit(K.ERROR, vp, vtl, None, at=now, message="synthetic error for the report")
                written += 1
            if not p.queue:
                if written >= budget:
                    if p.vtl == 0:
                        continue  # this VP is done; the others drain
                    p.depth = 0  # finish the stint: return to VTL0
                (vtl1_action if p.vtl else vtl0_action)(p)
            heapq.heappush(heap, (now + p.queue[0][0], vp))
        end = last
        for p in state:
            end += 1000
            emit(K.VP_STOP, p.vp, p.vtl, None, at=end, reason="guest-exit")
            written += 1
    return written


#: Bumped whenever write_realistic's output changes, so a cached trace of an older generator
#: (version 1 stamped every event at time 0) is never measured again.
GENERATOR_VERSION = "v2"


def default_path(events: int) -> Path:
    """Cache location for generated traces (per generator version): ``<cache>/analysis`` (the cache base of ``vmm.native.cache_dir``)."""
    from vsmtrace.vmm.native import cache_dir

    p = cache_dir() / "analysis"
    p.mkdir(parents=True, exist_ok=True)
    return p / f"synthetic-{GENERATOR_VERSION}-{events}.vsmt"
