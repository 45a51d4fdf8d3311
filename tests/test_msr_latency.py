"""SMP latency of synthetic MSR reads (issue 12, item 14).

Every VP thread handles its exits in Python, under the GIL. A guest's RDMSR therefore
waited for whichever thread held the GIL: another VP in the middle of its own exit, the
timer thread, the recorder - and when the host preempted that holder (2 busy VPs on a
2-core host), for the whole preemption (tens of ms). Reads that change no state (VP_INDEX,
the TSC and APIC frequencies, TIME_REF_COUNT) are now answered in C inside the KVM_RUN
loop (``vsm_kvm_run_fast``) and never take the GIL; the guests check the values.
The figures are for bench/msr_latency: they depend on the host's load, so they are
printed, not asserted.
"""

from __future__ import annotations

import io
import re

import pytest
from vsmtrace.vmm.builder import build_machine
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.events import EventKind, ListSink
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.machine import Machine

pytestmark = pytest.mark.kvm

HV_X64_MSR_VP_INDEX = 0x40000002
SAMPLES = 2000
GUEST_OK = 1


def run_guest(kernel, smp: int, sink=None, vsm: bool = False) -> tuple[Machine, int, str]:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    policy = HypervPolicy().with_vsm() if vsm else HypervPolicy()
    config = MachineConfig(kernel=kernel, smp=smp, cmdline=f"cpus={smp} n={SAMPLES}", hyperv=policy,
                           vtls=2 if vsm else 1, timeout_s=120, serial_out=out)  # fmt: skip
    m = build_machine(config, sink)
    m.boot()
    status = m.run()
    return m, status, out.getvalue().decode(errors="replace")


@pytest.mark.parametrize(("smp", "vsm"), [(2, False), (4, False), (2, True)])
def test_fixed_msr_reads_never_reach_python(kvm, guest, smp: int, vsm: bool) -> None:  # type: ignore[no-untyped-def]
    m, status, out = run_guest(guest("msr_latency"), smp, vsm=vsm)
    try:
        assert status == GUEST_OK, out
        assert "FAIL" not in out, out  # every VP read its own index
        served = [sum(v.fastpath.msrs_served for v in vp.vcpus if v.fastpath is not None) for vp in m.vps]
        assert all(n >= SAMPLES for n in served), served
        for line in re.findall(r"^cpu \d+: .*$", out, re.M):
            print(line)  # the guest-timed worst cases, for the record
    finally:
        m.close()


def test_recording_sees_every_read(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """A recorded run keeps every read in the emulation (one MSR event each): no fast path."""
    sink = ListSink()
    m, status, out = run_guest(guest("msr_latency"), 2, sink)
    try:
        assert status == GUEST_OK, out
        assert all(v.fastpath is None for vp in m.vps for v in vp.vcpus)
        reads = [e for e in sink.events if e[0] == EventKind.MSR and e[4].get("msr") == HV_X64_MSR_VP_INDEX]
        assert len(reads) >= 2 * SAMPLES
    finally:
        m.close()


def test_time_ref_count_from_the_shared_counter(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """TIME_REF_COUNT is answered in C from the one reference counter the emulation also reads:
    still never behind the TSC page and monotonic across VPs (the hv_refcount guest's checks)."""
    out = io.BytesIO()
    config = MachineConfig(kernel=guest("hv_refcount"), smp=2, cmdline="cpus=2 rounds=2000", hyperv=HypervPolicy(),
                           timeout_s=120, serial_out=out)  # fmt: skip
    m = build_machine(config)
    try:
        m.boot()
        status = m.run()
        text = out.getvalue().decode(errors="replace")
        assert status == GUEST_OK and "PASSED: 0 failed" in text, text[-2000:]
        served = [vp.vcpus[0].fastpath.msrs_served for vp in m.vps]
        assert all(n >= 2000 for n in served), served
        assert m.reference_time() >= int(m.refclock.last)  # the emulation's reads go through the same counter
    finally:
        m.close()
