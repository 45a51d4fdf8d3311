"""vsmtrace's CPUID hiding, as ring-0 guest code really sees it (vmm/cpuid_probe.py).

The probe's verdict must agree with what a long-mode guest reads: every bit it
calls ineffective is set in the guest's leaf 1, every other hidden bit is clear.
And CPUID 0x80000008.EBX[2] (XSAVEERPTR) is set, which does take effect.
"""

from __future__ import annotations

import re

import pytest
from vsmtrace.recorder import open_trace
from vsmtrace.vmm.cpuid import EBX_XSAVEERPTR, CpuidPolicy, build_cpuid
from vsmtrace.vmm.cpuid_probe import HIDDEN_BITS, ineffective_hiding
from vsmtrace.vmm.kvm.system import Kvm

from tests.conftest import build_guest, run_vsmtrace

pytestmark = pytest.mark.kvm


def test_probe_agrees_with_a_guest_and_xsaveerptr_is_set() -> None:
    kvm = Kvm("/dev/kvm")
    try:
        policy = CpuidPolicy(hypervisor_bit=True)
        leaky = ineffective_hiding(kvm, build_cpuid(kvm.supported_cpuid(), 0, 1, policy), policy)
    finally:
        kvm.close()
    r = run_vsmtrace(["run", "--timeout", "60", str(build_guest("cpuid_bits"))])
    assert r.status == 1, r.stderr
    m = re.fullmatch(r"leaf1 ecx=0x([0-9a-f]+) edx=0x[0-9a-f]+\nleaf80000008 ebx=0x([0-9a-f]+)\n", r.stdout)
    assert m, r.stdout
    ecx, ebx = int(m[1], 16), int(m[2], 16)
    for bit in HIDDEN_BITS:
        assert bool(ecx & bit.mask) == (bit.name in leaky), (bit.name, hex(ecx), leaky)
    assert ebx & EBX_XSAVEERPTR


def test_ineffective_hiding_is_said_for_pvh_kernels_and_recorded(tmp_path) -> None:
    pvh = build_guest("pvh", sources=["pvh.c", "pvh_note.S"], cflags=["-DGUEST_NO_MULTIBOOT_HEADER"])
    trace = tmp_path / "pvh.arrow"
    r = run_vsmtrace(["run", "--timeout", "60", "--record", str(trace), str(pvh)])
    assert r.status == 1
    recorded = open_trace(trace).metadata["extra"]["cpuid_hiding_ineffective"]
    if recorded:
        assert r.stderr.count("ignores vsmtrace's CPUID hiding") == 1
        assert f"CPUID hiding of {', '.join(recorded)}:" in r.stderr
    else:
        assert "CPUID hiding" not in r.stderr
    hello = run_vsmtrace(["run", "--timeout", "60", str(build_guest("hello"))])
    assert hello.stderr == ""  # vsmtrace's own guests never use the leaky features: no noise
