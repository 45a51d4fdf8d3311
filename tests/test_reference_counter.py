"""TIME_REF_COUNT agrees with the reference TSC page (item 11 of issue 12).

The counter is derived from the guest TSC through KVM's exact TSC offset
(KVM_VCPU_TSC_OFFSET), shared by every VP; the guest checks page <= MSR <= page on 2
and 4 VPs in a tight loop and that no VP ever reads a value below one another VP
already published.
"""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.builder import build_machine
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

pytestmark = pytest.mark.kvm


def test_machine_uses_kvm_exact_tsc_offset(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """The offset behind the reference clock is KVM's own, on every VP and VTL (not an estimate)."""
    m = build_machine(MachineConfig(kernel=guest("hv_refcount"), smp=3, vtls=2, hyperv=HypervPolicy()))
    try:
        m.boot()
        assert m.tsc_offset_exact, "this host offers KVM_VCPU_TSC_OFFSET"
        for vp in m.vps:
            for vcpu in vp.vcpus:
                assert vcpu.get_tsc_offset() == m.tsc_offset & ((1 << 64) - 1)
    finally:
        m.close()


def test_estimated_offset_errs_ahead(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """Without the attribute the estimate may only make the guest TSC (and the counter) lead, never lag."""
    m = build_machine(MachineConfig(kernel=guest("hv_refcount"), smp=1))
    try:
        vcpu = m.vps[0].vcpus[0]
        exact = vcpu.get_tsc_offset()
        exact = exact - (1 << 64) if exact >= 1 << 63 else exact
        for _ in range(20):
            estimate = m._estimate_tsc_offset(vcpu)
            assert estimate >= exact
    finally:
        m.close()


@pytest.mark.parametrize("cpus", [2, 4])
def test_ref_count_never_behind_tsc_page(kvm, guest, vsmtrace, cpus: int) -> None:  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--smp", str(cpus), "--append", f"cpus={cpus} rounds=3000", "--timeout", "100",
                  str(guest("hv_refcount"))], timeout=160)  # fmt: skip
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, r.stdout[-3000:]
    assert r.status == 1, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("tsc_page_valid", "all_cpus_done", "msr_never_behind_page", "msr_never_ahead_of_later_page",
                 "msr_monotonic_across_vps"):  # fmt: skip
        assert re.search(rf"^ok {name}$", r.stdout, re.M), name
    assert len(re.findall(r"^cpu \d+: msr behind page 0 ", r.stdout, re.M)) == cpus
