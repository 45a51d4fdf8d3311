"""The hypercall hot path reads registers, mode and CPL from kvm_run's sync-regs copy (issue 18).

``RegisterFile`` reads and writes GPRs as bytes of kvm_run and derives mode and CPL from
the exported special registers with one unpack. These tests hold that against what KVM
itself reports through KVM_GET_REGS / KVM_GET_SREGS ioctls: at every port-I/O exit of a
real guest that makes hypercalls, and for every mode/CPL combination laid into a kvm_run
image by hand.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from vsmtrace.vmm.builder import build_machine
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.cpu_state import CR0_PE, EFER_LMA, GPR_NAMES, RegisterFile, cpu_mode
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.kvm.system import ffi, lib
from vsmtrace.vmm.vp import CpuMode

GUEST_OK = 1


def kvm_view(vcpu) -> tuple[tuple[CpuMode, int], dict[str, int]]:  # type: ignore[no-untyped-def]
    """Mode, CPL and GPRs as KVM reports them through ioctls (no cache, no kvm_run copy)."""
    vcpu.flush_regs()
    s = ffi.new("struct kvm_sregs *")
    assert lib.ioctl(vcpu.fd, lib.KVM_GET_SREGS, s) == 0
    r = ffi.new("struct kvm_regs *")
    assert lib.ioctl(vcpu.fd, lib.KVM_GET_REGS, r) == 0
    mode = cpu_mode(s)
    return (mode, 0 if mode is CpuMode.REAL else int(s.cs.dpl)), {n: int(getattr(r, n)) for n in GPR_NAMES}


@pytest.mark.kvm
def test_sync_regs_reads_match_kvm_at_every_exit(guest) -> None:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    config = MachineConfig(kernel=guest("hv_hypercall"), hyperv=HypervPolicy(), timeout_s=120, serial_out=out)
    m = build_machine(config)
    vp = m.vps[0]
    assert vp.vcpu.sync_regs, "this test is about the sync-regs path"
    checked: list[tuple[CpuMode, int]] = []
    mismatches: list[str] = []
    handle_io = vp.exit_handlers[lib.KVM_EXIT_IO]

    def check_then_handle() -> None:
        regfile = vp.regfiles[vp.vtl]
        fast = regfile.mode_cpl()
        kvm_mode, gprs = kvm_view(vp.vcpu)
        if fast != kvm_mode:
            mismatches.append(f"mode/cpl {fast} != KVM's {kvm_mode}")
        for name, value in gprs.items():
            if regfile.get(name) != value:
                mismatches.append(f"{name} {regfile.get(name):#x} != KVM's {value:#x}")
        checked.append(fast)
        handle_io()

    vp.exit_handlers[lib.KVM_EXIT_IO] = check_then_handle
    try:
        m.boot()
        status = m.run()
    finally:
        m.close()
    text = out.getvalue().decode(errors="replace")
    assert status == GUEST_OK, text
    assert "FAIL" not in text, text
    assert not mismatches, mismatches[:10]
    assert (CpuMode.LONG, 0) in checked and len(checked) > 100  # every hypercall trap was one of them


def fake_vcpu(exported: bool) -> tuple[SimpleNamespace, object]:
    """A kvm_run image in host memory behind the attributes RegisterFile uses."""
    buf = bytearray(ffi.sizeof("struct kvm_run"))
    run = ffi.from_buffer("struct kvm_run *", buf)
    sregs = ffi.addressof(run.s.regs.sregs)
    vcpu = SimpleNamespace(run_view=memoryview(buf), sync_regs=1, sregs_exported=exported, sregs_writes=0,
                           get_sregs=lambda: sregs, get_regs=lambda: run.s.regs.regs, set_regs=lambda regs: None)  # fmt: skip
    return vcpu, run


@pytest.mark.parametrize("exported", [True, False])
def test_mode_and_cpl_from_the_sregs_bytes(exported: bool) -> None:
    vcpu, run = fake_vcpu(exported)
    regfile = RegisterFile(vcpu)  # type: ignore[arg-type]
    s = run.s.regs.sregs  # type: ignore[attr-defined]
    seen = set()
    for cr0 in (0, CR0_PE):
        for efer in (0, EFER_LMA):
            for long_cs in (0, 1):
                for dpl in range(4):
                    s.cr0, s.efer, s.cs.l, s.cs.dpl = cr0, efer, long_cs, dpl
                    vcpu.sregs_writes += 1  # what Vcpu.set_sregs does: derived values are stale
                    want_mode = cpu_mode(s)
                    want = (want_mode, 0 if want_mode is CpuMode.REAL else dpl)
                    assert regfile.mode_cpl() == want, (cr0, efer, long_cs, dpl)
                    seen.add(want_mode)
    assert seen == set(CpuMode)


def test_gpr_writes_land_in_kvm_run_and_mark_it_dirty() -> None:
    vcpu, run = fake_vcpu(True)
    regfile = RegisterFile(vcpu)  # type: ignore[arg-type]
    for i, name in enumerate(GPR_NAMES):
        regfile.set(name, 0x1111_0000_0000_0000 + i)
    assert run.kvm_dirty_regs & lib.KVM_SYNC_X86_REGS  # type: ignore[attr-defined]
    regs = run.s.regs.regs  # type: ignore[attr-defined]
    assert [int(getattr(regs, n)) for n in GPR_NAMES] == [0x1111_0000_0000_0000 + i for i in range(len(GPR_NAMES))]
    assert [regfile.get(n) for n in GPR_NAMES] == [0x1111_0000_0000_0000 + i for i in range(len(GPR_NAMES))]
    with pytest.raises(OverflowError):  # out of range: cffi's check, as before the byte path
        regfile.set("rax", 1 << 64)
