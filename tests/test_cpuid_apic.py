"""CPUID.01H:EDX.APIC follows IA32_APIC_BASE.EN (the userspace APIC's MSR mirrored into KVM)."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kvm

CHECKS = ("bsp_apic_bit_clear_when_disabled", "bsp_apic_bit_back_when_enabled", "bit_clear_disabled_from_x2apic",
          "bit_back_after_x2apic_disable")  # fmt: skip
AP_CHECKS = ("ap_bit_unaffected_by_bsp", "ap_apic_bit_clear_when_disabled", "ap_apic_bit_back_when_enabled")


def assert_ok(r, names) -> None:  # type: ignore[no-untyped-def]
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, fails
    assert r.status == 1, r.stdout[-2000:] + r.stderr[-2000:]
    for name in names:
        assert re.search(rf"^ok {name}$", r.stdout, re.M), name


@pytest.mark.parametrize("vsm", ["--vsm", "--no-vsm"])
def test_cpuid_apic_bit_follows_apic_base(kvm, guest, vsmtrace, vsm: str) -> None:  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--smp", "2", vsm, "--timeout", "60", str(guest("cpuid_apic"))], timeout=120)
    assert_ok(r, CHECKS + AP_CHECKS)


def test_cpuid_apic_bit_reexecutes(kvm, guest, vsmtrace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Re-execution mirrors the recorded APIC_BASE writes too, so the guest's CPUID reads replay."""
    trace = tmp_path / "cpuid_apic.arrow"
    r = vsmtrace(["run", "--deterministic", "--record", str(trace), "--append", "cpus=1", "--timeout", "60",
                  str(guest("cpuid_apic"))], timeout=120)  # fmt: skip
    assert_ok(r, CHECKS)
    rep = vsmtrace(["replay", "--reexecute", str(trace)], timeout=180)
    assert rep.status == 0, rep.stdout + rep.stderr
