"""Unit tests of vmm/hyperv without KVM: a fake partition (bytearray RAM, dict registers,
manual clock) stands in for the VP interface."""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from vsmtrace.vmm.events import EventKind, ListSink
from vsmtrace.vmm.hyperv import GpFault, GuestCrash, GuestResetRequest, HyperV, HypervPolicy
from vsmtrace.vmm.hyperv.connections import (
    VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID,
    VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID,
    VSMTRACE_LOOPBACK_SINT,
    EventPort,
    MessagePort,
)
from vsmtrace.vmm.hyperv.cpuid import hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.facade import VSMTRACE_PARTITION_ID
from vsmtrace.vmm.hyperv.hvdef import (
    HV_MESSAGE_SIZE,
    HV_PAGE_SIZE,
    HV_PARTITION_ID_SELF,
    HvCpuidLeaf,
    HvCrashCtl,
    HvEnlightenmentInfo,
    HvFeatures,
    HvFlushFlags,
    HvGenericSetFormat,
    HvInputFlushVirtualAddressSpace,
    HvInputFlushVirtualAddressSpaceEx,
    HvInputGetVpIndexFromApicId,
    HvInputPostMessage,
    HvInputSendSyntheticClusterIpi,
    HvInputSendSyntheticClusterIpiEx,
    HvInputSignalEvent,
    HvInputVtl,
    HvMessage,
    HvMessageFlags,
    HvMessageHeader,
    HvMessageType,
    HvMsr,
    HvPartitionPrivilege,
    HvReferenceTscPage,
    HvSint,
    HvStatus,
    HvStimerConfig,
    HvTimerMessagePayload,
    HvVpSet,
    HypercallCode,
    HypercallControl,
    VsmCodePageOffsets,
    X86Exception,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallInput, HypercallResult, HypercallSpec
from vsmtrace.vmm.hyperv.hypercall_page import (
    HV_HYPERCALL_TRAP_PORT,
    HYPERCALL_OFFSET,
    VTL_CALL_OFFSET,
    VTL_CALL_OFFSET_32,
    VTL_RETURN_OFFSET,
    VTL_RETURN_OFFSET_32,
    HypercallPage,
)
from vsmtrace.vmm.hyperv.reference_time import ReferenceClock, TscPageParams, tsc_scale_for
from vsmtrace.vmm.timers import ManualTimerService
from vsmtrace.vmm.vp import Access, CpuMode, GuestMemoryError, VtlAccessDenied
from vsmtrace.vmm.vtl_array import VtlArray

from tests.fakes import FakeVp

RAM_SIZE = 1 << 20
HC_PAGE = 0x10000
IN_PAGE = 0x20000
OUT_PAGE = 0x21000
SIMP_PAGE = 0x30000
SIEFP_PAGE = 0x31000
TSC_PAGE = 0x32000
OS_ID = 0x8100_0000_0000_0001
SINT_VECTOR = 0x40
TSC_HZ = 2_500_000_000
S = HvStatus


# ---------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------


class FakePartition:
    def __init__(self, vp_count: int = 2, vtl_count: int = 1) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.vps = [FakeVp(i, vtl_count) for i in range(vp_count)]
        self.now = 0  # reference time, 100 ns units
        self.interrupts: list[tuple[int, int, int]] = []
        self.denied: set[tuple[int, int, Access]] = set()  # (vtl, page gpa, access)

    def vp(self, index: int) -> FakeVp:
        return self.vps[index]

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def _check(self, vtl: int, gpa: int, size: int, access: Access) -> None:
        if gpa < 0 or gpa + size > len(self.ram):
            raise GuestMemoryError(gpa, size)
        for page in range(gpa & ~0xFFF, gpa + max(size, 1), HV_PAGE_SIZE):
            if (vtl, page, access) in self.denied:
                raise VtlAccessDenied(vtl, page, access)

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        self._check(vtl, gpa, size, access)
        return bytes(self.ram[gpa : gpa + size])

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self._check(vtl, gpa, len(data), Access.WRITE)
        self.ram[gpa : gpa + len(data)] = data

    def reference_time(self) -> int:
        return self.now

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.interrupts.append((vp_index, vtl, vector))


class FakeApic:
    def __init__(self) -> None:
        self.eois: list[tuple[int, int]] = []
        self.icr: dict[tuple[int, int], int] = {}
        self.tpr: dict[tuple[int, int], int] = {}

    def eoi(self, vp: int, vtl: int) -> None:
        self.eois.append((vp, vtl))

    def read_icr(self, vp: int, vtl: int) -> int:
        return self.icr.get((vp, vtl), 0)

    def write_icr(self, vp: int, vtl: int, value: int) -> None:
        self.icr[(vp, vtl)] = value

    def read_tpr(self, vp: int, vtl: int) -> int:
        return self.tpr.get((vp, vtl), 0)

    def write_tpr(self, vp: int, vtl: int, value: int) -> None:
        self.tpr[(vp, vtl)] = value


class FakeTlb:
    def __init__(self) -> None:
        self.flushes: list[tuple[tuple[int, ...], int]] = []

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        self.flushes.append((tuple(vp_indices), vtl))


class Env:
    """A HyperV with its fakes."""

    def __init__(self, policy: HypervPolicy | None = None, vp_count: int = 2, vtl_count: int | None = None,
                 clock: ReferenceClock | None = None) -> None:  # fmt: skip
        policy = policy or HypervPolicy()
        self.part = FakePartition(vp_count, vtl_count or policy.vtl_count)
        self.timers = ManualTimerService()
        self.apic = FakeApic()
        self.tlb = FakeTlb()
        self.sink = ListSink()
        self.hv = HyperV(
            self.part, policy, timers=self.timers, apic=self.apic, tlb=self.tlb, sink=self.sink,
            tsc_page=clock.tsc_page_params if clock else None, tsc_frequency_hz=TSC_HZ,
            apic_frequency_hz=1_000_000_000, vtl_count=vtl_count,
        )  # fmt: skip

    # convenience
    def wr(self, msr: int, value: int, vp: int = 0, vtl: int = 0) -> None:
        self.hv.msr_write(vp, vtl, msr, value)

    def rd(self, msr: int, vp: int = 0, vtl: int = 0) -> int:
        return self.hv.msr_read(vp, vtl, msr)

    def enable_hypercalls(self, vtl: int = 0) -> None:
        self.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID, vtl=vtl)
        self.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE | 1, vtl=vtl)

    def enable_synic(self, vp: int = 0, vtl: int = 0, sints: Sequence[int] = (VSMTRACE_LOOPBACK_SINT,)) -> None:
        self.wr(HvMsr.HV_X64_MSR_SCONTROL, 1, vp, vtl)
        self.wr(HvMsr.HV_X64_MSR_SIMP, SIMP_PAGE | 1, vp, vtl)
        self.wr(HvMsr.HV_X64_MSR_SIEFP, SIEFP_PAGE | 1, vp, vtl)
        for sint in sints:
            self.wr(HvMsr.HV_X64_MSR_SINT0 + sint, SINT_VECTOR + sint, vp, vtl)

    def call(self, control: int, in_gpa: int = IN_PAGE, out_gpa: int = OUT_PAGE, vp: int = 0, vtl: int = 0,
             input: bytes = b"") -> tuple[int, int]:  # fmt: skip
        """Issue a hypercall; returns (status, reps completed) from RAX."""
        if input:
            self.part.ram[in_gpa : in_gpa + len(input)] = input
        regs = self.part.vps[vp].regs[vtl]
        regs.update(rcx=control, rdx=in_gpa, r8=out_gpa, rax=0xDEAD)
        outcome = self.hv.hypercall(vp, vtl)
        rax = int(regs["rax"])  # type: ignore[arg-type]
        if outcome.status is not None:
            assert rax & 0xFFFF == outcome.status
        return rax & 0xFFFF, (rax >> 32) & 0xFFF

    def fast(self, control: int, rdx: int, r8: int, xmm: Sequence[int] = (), vp: int = 0, vtl: int = 0):
        regs = self.part.vps[vp].regs[vtl]
        regs.update(rcx=control | HypercallControl.encode(0, fast=True), rdx=rdx, r8=r8, rax=0xDEAD)
        for i, v in enumerate(xmm):
            self.part.vps[vp].xmm[vtl][i] = v
        outcome = self.hv.hypercall(vp, vtl)
        return outcome, int(regs["rax"])  # type: ignore[arg-type]

    def slot(self, sint: int, page: int = SIMP_PAGE) -> HvMessage:
        return HvMessage.unpack(bytes(self.part.ram[page + sint * HV_MESSAGE_SIZE : page + (sint + 1) * HV_MESSAGE_SIZE]))

    def clear_slot(self, sint: int, page: int = SIMP_PAGE) -> None:
        self.part.ram[page + sint * HV_MESSAGE_SIZE : page + sint * HV_MESSAGE_SIZE + 4] = bytes(4)

    def events(self, kind: EventKind) -> list[dict]:
        return [fields for k, _vp, _vtl, _rip, fields in self.sink.events if k == kind]


def ctl(code: HypercallCode, **kw: int) -> int:
    return HypercallControl.encode(code, **kw)


@pytest.fixture
def env() -> Env:
    e = Env()
    e.enable_hypercalls()
    return e


# ---------------------------------------------------------------------------------------------
# CPUID and policy
# ---------------------------------------------------------------------------------------------


def _leaf(leaves, leaf):
    return next(entry for entry in leaves if entry[0] == leaf)


def test_cpuid_leaves_content() -> None:
    leaves = hyperv_cpuid_leaves(HypervPolicy(), vp_count=4)
    assert [entry[0] for entry in leaves] == list(range(0x40000000, 0x4000000B))
    _, _, eax, ebx, ecx, edx = _leaf(leaves, HvCpuidLeaf.VENDOR_AND_MAX)
    assert eax == 0x4000000A
    assert struct.pack("<III", ebx, ecx, edx) == b"Microsoft Hv"
    assert struct.pack("<I", _leaf(leaves, HvCpuidLeaf.INTERFACE)[2]) == b"Hv#1"
    _, _, eax, ebx, _, edx = _leaf(leaves, HvCpuidLeaf.FEATURES)
    privileges = eax | (ebx << 32)
    for bit in (
        HvPartitionPrivilege.ACCESS_HYPERCALL_MSRS,
        HvPartitionPrivilege.ACCESS_VP_INDEX,
        HvPartitionPrivilege.ACCESS_SYNIC_REGS,
        HvPartitionPrivilege.ACCESS_SYNTHETIC_TIMER_REGS,
        HvPartitionPrivilege.ACCESS_PARTITION_REFERENCE_TSC,
        HvPartitionPrivilege.POST_MESSAGES,
        HvPartitionPrivilege.SIGNAL_EVENTS,
    ):
        assert privileges & bit
    assert not privileges & HvPartitionPrivilege.ACCESS_VSM
    assert not privileges & HvPartitionPrivilege.CREATE_PARTITIONS
    assert edx & HvFeatures.XMM_HYPERCALL_INPUT and edx & HvFeatures.XMM_HYPERCALL_OUTPUT
    assert edx & HvFeatures.DIRECT_SYNTHETIC_TIMERS and edx & HvFeatures.GUEST_CRASH_MSRS
    recommendations = _leaf(leaves, HvCpuidLeaf.ENLIGHTENMENT_INFO)[2]
    assert recommendations & HvEnlightenmentInfo.USE_SYNTHETIC_CLUSTER_IPI
    assert recommendations & HvEnlightenmentInfo.USE_HYPERCALL_FOR_REMOTE_FLUSH
    assert _leaf(leaves, HvCpuidLeaf.IMPLEMENTATION_LIMITS)[2:4] == (4, 4)
    vsm = hyperv_cpuid_leaves(HypervPolicy().with_vsm(), 1)
    _, _, _, ebx, _, _ = _leaf(vsm, HvCpuidLeaf.FEATURES)
    assert ebx & (HvPartitionPrivilege.ACCESS_VSM >> 32) and ebx & (HvPartitionPrivilege.ACCESS_VP_REGISTERS >> 32)


def test_policy_switches() -> None:
    assert hyperv_cpuid_leaves(HypervPolicy.disabled(), 1) == []
    assert HypervPolicy.from_switches(["hyperv"]).enabled is False
    p = HypervPolicy.from_switches(["xmm-input", "pv_ipi", "synic"])
    assert not p.xmm_input and not p.pv_ipi
    assert not p.stimers and not p.post_messages  # synic off drops its dependants
    leaves = hyperv_cpuid_leaves(p, 1)
    assert not _leaf(leaves, HvCpuidLeaf.FEATURES)[5] & HvFeatures.XMM_HYPERCALL_INPUT
    assert not _leaf(leaves, HvCpuidLeaf.ENLIGHTENMENT_INFO)[2] & HvEnlightenmentInfo.USE_SYNTHETIC_CLUSTER_IPI
    with pytest.raises(ValueError, match="unknown Hyper-V switch"):
        HypervPolicy.from_switches(["warp-drive"])
    assert HypervPolicy().vtl_count == 1 and HypervPolicy().with_vsm().vtl_count == 2


def test_disabled_hyperv_handles_nothing() -> None:
    e = Env(HypervPolicy.disabled())
    assert e.hv.cpuid_leaves() == []
    assert not e.hv.handles_msr(HvMsr.HV_X64_MSR_GUEST_OS_ID)
    assert not e.hv.port_is_trap(HV_HYPERCALL_TRAP_PORT)


# ---------------------------------------------------------------------------------------------
# MSRs
# ---------------------------------------------------------------------------------------------


def test_hypercall_msr_needs_guest_os_id_and_writes_page() -> None:
    e = Env()
    assert e.hv.handles_msr(HvMsr.HV_X64_MSR_HYPERCALL) and not e.hv.handles_msr(0x1B)
    e.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    assert e.rd(HvMsr.HV_X64_MSR_HYPERCALL) == HC_PAGE  # enable stays 0 without an OS id
    assert e.part.ram[HC_PAGE : HC_PAGE + 3] == bytes(3)
    e.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
    assert e.rd(HvMsr.HV_X64_MSR_GUEST_OS_ID) == OS_ID
    e.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE | 1)
    assert e.rd(HvMsr.HV_X64_MSR_HYPERCALL) == HC_PAGE | 1
    assert bytes(e.part.ram[HC_PAGE : HC_PAGE + HV_PAGE_SIZE]) == HypercallPage.build()
    assert e.hv.hypercall_page_enabled(0)
    e.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, 0)  # zeroing the id disables the page
    assert not e.hv.hypercall_page_enabled(0)
    e.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
    e.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE | 3)  # locked
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE)
    with pytest.raises(GpFault):  # page beyond the GPA space
        _enable_at(RAM_SIZE + HV_PAGE_SIZE)


def _enable_at(gpa: int) -> None:
    e = Env()
    e.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
    e.wr(HvMsr.HV_X64_MSR_HYPERCALL, gpa | 1)


def test_hypercall_msr_lock_not_advertised() -> None:
    e = Env(HypervPolicy.from_switches(["hypercall-msr-lock"]))
    e.wr(HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE | 3)


def test_read_only_and_derived_msrs() -> None:
    e = Env()
    assert e.rd(HvMsr.HV_X64_MSR_VP_INDEX, vp=1) == 1
    e.part.now = 12345
    assert e.rd(HvMsr.HV_X64_MSR_TIME_REF_COUNT) == 12345
    assert e.rd(HvMsr.HV_X64_MSR_TSC_FREQUENCY) == TSC_HZ
    assert e.rd(HvMsr.HV_X64_MSR_APIC_FREQUENCY) == 1_000_000_000
    for msr in (HvMsr.HV_X64_MSR_VP_INDEX, HvMsr.HV_X64_MSR_TIME_REF_COUNT, HvMsr.HV_X64_MSR_TSC_FREQUENCY,
                HvMsr.HV_X64_MSR_APIC_FREQUENCY, HvMsr.HV_X64_MSR_SVERSION):  # fmt: skip
        with pytest.raises(GpFault):
            e.wr(msr, 1)
    assert e.rd(HvMsr.HV_X64_MSR_SVERSION) == 1
    assert e.rd(HvMsr.HV_X64_MSR_RESET) == 0
    with pytest.raises(GuestResetRequest):
        e.wr(HvMsr.HV_X64_MSR_RESET, 1)
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_RESET, 2)


def test_unadvertised_msrs_gp() -> None:
    e = Env(HypervPolicy.from_switches(["synic", "vp-index", "crash-msrs", "reference-tsc", "apic-msrs"]))
    for msr in (HvMsr.HV_X64_MSR_SCONTROL, HvMsr.HV_X64_MSR_SINT0, HvMsr.HV_X64_MSR_STIMER0_CONFIG,
                HvMsr.HV_X64_MSR_VP_INDEX, HvMsr.HV_X64_MSR_CRASH_CTL, HvMsr.HV_X64_MSR_REFERENCE_TSC,
                HvMsr.HV_X64_MSR_EOI, HvMsr.HV_X64_MSR_GUEST_IDLE, HvMsr.HV_X64_MSR_VP_RUNTIME, 0x400001F0):  # fmt: skip
        with pytest.raises(GpFault):
            e.rd(msr)
    faults = [f for f in e.events(EventKind.MSR) if f["fault"]]
    assert len(faults) == 10 and not faults[0]["is_write"]


def test_apic_msrs_forwarded() -> None:
    e = Env()
    e.wr(HvMsr.HV_X64_MSR_EOI, 0, vp=1)
    assert e.apic.eois == [(1, 0)]
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_EOI, 1 << 32)
    with pytest.raises(GpFault):
        e.rd(HvMsr.HV_X64_MSR_EOI)
    e.wr(HvMsr.HV_X64_MSR_ICR, 0x0000_0001_0000_40FE)
    assert e.rd(HvMsr.HV_X64_MSR_ICR) == 0x0000_0001_0000_40FE
    e.wr(HvMsr.HV_X64_MSR_TPR, 0x20)
    assert e.rd(HvMsr.HV_X64_MSR_TPR) == 0x20 and e.apic.tpr[(0, 0)] == 0x20
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_TPR, 0x100)


def test_vp_assist_and_msr_events() -> None:
    e = Env()
    assert e.hv.vp_assist_page_gpa(0, 0) is None
    e.wr(HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, 0x40000 | 1)
    assert e.rd(HvMsr.HV_X64_MSR_VP_ASSIST_PAGE) == 0x40001
    assert e.hv.vp_assist_page_gpa(0, 0) == 0x40000 and e.hv.vp_assist_page_gpa(1, 0) is None
    events = e.events(EventKind.MSR)
    assert events[-2] == {"msr": HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, "value": 0x40001, "is_write": True, "fault": False}
    assert events[-1]["is_write"] is False


def test_synic_msrs() -> None:
    e = Env()
    assert e.rd(HvMsr.HV_X64_MSR_SINT5) == HvSint.RESET_VALUE
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_SINT5, 0x0F)  # unmasked vector < 16
    e.wr(HvMsr.HV_X64_MSR_SINT5, HvSint.MASKED | 0x0F)  # masked: allowed
    e.wr(HvMsr.HV_X64_MSR_SINT5, 0x55 | HvSint.AUTO_EOI)
    assert e.hv.is_auto_eoi(0, 0, 0x55) and not e.hv.is_auto_eoi(0, 0, 0x56) and not e.hv.is_auto_eoi(1, 0, 0x55)
    e.part.ram[SIMP_PAGE : SIMP_PAGE + 8] = b"garbage!"
    e.wr(HvMsr.HV_X64_MSR_SIMP, SIMP_PAGE | 1)
    assert e.part.ram[SIMP_PAGE : SIMP_PAGE + 8] == bytes(8)  # enabling clears the page
    assert e.rd(HvMsr.HV_X64_MSR_SIMP) == SIMP_PAGE | 1 and e.rd(HvMsr.HV_X64_MSR_EOM) == 0


def test_crash_msrs() -> None:
    e = Env()
    assert e.rd(HvMsr.HV_X64_MSR_CRASH_CTL) == HvCrashCtl.CRASH_NOTIFY | HvCrashCtl.CRASH_MESSAGE
    msg = b"kernel panic: test"
    e.part.ram[0x50000 : 0x50000 + len(msg)] = msg
    for i, value in enumerate((0xDEAD, 1, 2, 0x50000, len(msg))):
        e.wr(HvMsr.HV_X64_MSR_CRASH_P0 + i, value)
    assert e.rd(HvMsr.HV_X64_MSR_CRASH_P0, vp=1) == 0xDEAD  # partition-wide
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_CRASH_CTL, 1)
    e.wr(HvMsr.HV_X64_MSR_CRASH_CTL, 0)  # no notify: nothing happens
    with pytest.raises(GuestCrash) as info:
        e.wr(HvMsr.HV_X64_MSR_CRASH_CTL, HvCrashCtl.CRASH_NOTIFY | HvCrashCtl.CRASH_MESSAGE)
    report = info.value.report
    assert report.parameters == (0xDEAD, 1, 2, 0x50000, len(msg)) and report.message == msg
    assert "kernel panic" in report.describe()


# ---------------------------------------------------------------------------------------------
# Hypercall page
# ---------------------------------------------------------------------------------------------


def _disasm(code: bytes, bitness: int) -> list[str]:
    iced_x86 = pytest.importorskip("iced_x86")
    decoder = iced_x86.Decoder(bitness, code)
    formatter = iced_x86.Formatter(iced_x86.FormatterSyntax.INTEL)
    out = []
    for insn in decoder:
        out.append(formatter.format(insn))
        if insn.mnemonic == iced_x86.Mnemonic.RET:
            break
    return out


def test_hypercall_page_disassembles() -> None:
    page = HypercallPage.build()
    assert len(page) == HV_PAGE_SIZE
    port = f"{HV_HYPERCALL_TRAP_PORT:X}h"
    assert _disasm(page[HYPERCALL_OFFSET:], 64) == [f"out {port},al", "ret"]
    assert _disasm(page[HYPERCALL_OFFSET:], 32) == [f"out {port},al", "ret"]
    assert _disasm(page[VTL_CALL_OFFSET:], 64) == ["mov rax,rcx", "mov ecx,11h", f"out {port},al", "ret"]
    assert _disasm(page[VTL_RETURN_OFFSET:], 64) == ["mov rax,rcx", "mov ecx,12h", f"out {port},al", "ret"]
    assert _disasm(page[VTL_CALL_OFFSET_32:], 32) == ["mov ecx,eax", "mov eax,11h", f"out {port},al", "ret"]
    assert _disasm(page[VTL_RETURN_OFFSET_32:], 32) == ["mov ecx,eax", "mov eax,12h", f"out {port},al", "ret"]
    offsets = HypercallPage.vsm_code_page_offsets()
    assert offsets & VsmCodePageOffsets.CALL_MASK == VTL_CALL_OFFSET
    assert offsets >> VsmCodePageOffsets.RETURN_SHIFT == VTL_RETURN_OFFSET
    assert page[0x50:0x60] == b"\xcc" * 16


# ---------------------------------------------------------------------------------------------
# Dispatcher: control word, modes, memory, fast, rep
# ---------------------------------------------------------------------------------------------


def test_mode_checks_inject_ud() -> None:
    e = Env()
    e.call(ctl(HypercallCode.HvCallGetPartitionId))  # page not enabled
    assert e.part.vps[0].exceptions == [(0, X86Exception.UD, None)]
    e.enable_hypercalls()
    e.part.vps[0].cpls[0] = 3
    e.call(ctl(HypercallCode.HvCallGetPartitionId))
    e.part.vps[0].cpls[0] = 0
    e.part.vps[0].modes[0] = CpuMode.REAL
    e.call(ctl(HypercallCode.HvCallGetPartitionId))
    assert len(e.part.vps[0].exceptions) == 3
    assert e.part.vps[0].regs[0]["rax"] == 0xDEAD  # no result written
    assert all(ev["status"] is None for ev in e.events(EventKind.HYPERCALL))  # no result value was written


@pytest.mark.parametrize(
    ("control", "status"),
    [
        (0x7FFF, S.HV_STATUS_INVALID_HYPERCALL_CODE),
        (HypercallCode.HvCallCreatePartition, S.HV_STATUS_INVALID_HYPERCALL_CODE),  # known, not implemented
        (ctl(HypercallCode.HvCallGetPartitionId) | (1 << 27), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId) | (1 << 31), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId) | (1 << 44), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId) | (1 << 60), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId, rep_count=1), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId, rep_start=1), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetPartitionId, var_header_qwords=1), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetVpIndexFromApicId), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=2, rep_start=2), S.HV_STATUS_INVALID_HYPERCALL_INPUT),
        (ctl(HypercallCode.HvCallVtlCall), S.HV_STATUS_INVALID_HYPERCALL_CODE),  # no VSM hook
    ],
)
def test_control_word_validation(env: Env, control: int, status: HvStatus) -> None:
    assert env.call(control) == (status, 0)


def test_unadvertised_call_and_missing_privilege() -> None:
    e = Env(HypervPolicy.from_switches(["pv-ipi", "partition-id"]))
    e.enable_hypercalls()
    ipi = HvInputSendSyntheticClusterIpi(vector=0x30, processor_mask=1).pack()
    assert e.call(ctl(HypercallCode.HvCallSendSyntheticClusterIpi), input=ipi)[0] == S.HV_STATUS_INVALID_HYPERCALL_CODE
    assert e.call(ctl(HypercallCode.HvCallGetPartitionId))[0] == S.HV_STATUS_ACCESS_DENIED


@pytest.mark.parametrize(
    ("in_gpa", "out_gpa", "status"),
    [
        (IN_PAGE + 4, OUT_PAGE, S.HV_STATUS_INVALID_ALIGNMENT),  # misaligned input
        (IN_PAGE, OUT_PAGE + 4, S.HV_STATUS_INVALID_ALIGNMENT),  # misaligned output
        (IN_PAGE + HV_PAGE_SIZE - 16, OUT_PAGE, S.HV_STATUS_INVALID_ALIGNMENT),  # input crosses a page
        (IN_PAGE, OUT_PAGE + HV_PAGE_SIZE - 8, S.HV_STATUS_INVALID_ALIGNMENT),  # output crosses a page
        (IN_PAGE, IN_PAGE + 8, S.HV_STATUS_INVALID_ALIGNMENT),  # overlap
        (RAM_SIZE + HV_PAGE_SIZE, OUT_PAGE, S.HV_STATUS_INVALID_ALIGNMENT),  # outside RAM
        (IN_PAGE, OUT_PAGE, S.HV_STATUS_SUCCESS),
        (IN_PAGE, IN_PAGE + 0x20, S.HV_STATUS_SUCCESS),  # adjacent, same page
    ],
)
def test_memory_input_output_checks(env: Env, in_gpa: int, out_gpa: int, status: HvStatus) -> None:
    # 28 bytes in (16-byte header + 3 APIC IDs), 12 bytes out
    header = HvInputGetVpIndexFromApicId(HV_PARTITION_ID_SELF, 0).pack() + struct.pack("<3I", 1, 0, 1)
    env.part.ram[in_gpa % RAM_SIZE : in_gpa % RAM_SIZE + len(header)] = header
    result = env.call(ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=3), in_gpa, out_gpa)
    assert result == (status, 3 if status == S.HV_STATUS_SUCCESS else 0)


def test_vtl_protection_maps_to_access_denied(env: Env) -> None:
    header = HvInputGetVpIndexFromApicId(HV_PARTITION_ID_SELF, 0).pack() + struct.pack("<I", 1)
    c = ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=1)
    env.part.denied.add((0, IN_PAGE, Access.READ))
    assert env.call(c, input=header)[0] == S.HV_STATUS_ACCESS_DENIED
    env.part.denied = {(0, OUT_PAGE, Access.WRITE)}
    env.part.ram[OUT_PAGE : OUT_PAGE + 4] = b"\xaa" * 4
    assert env.call(c, input=header)[0] == S.HV_STATUS_ACCESS_DENIED
    assert env.part.ram[OUT_PAGE : OUT_PAGE + 4] == b"\xaa" * 4  # nothing written


def test_get_partition_id_and_event_fields(env: Env) -> None:
    assert env.call(ctl(HypercallCode.HvCallGetPartitionId)) == (S.HV_STATUS_SUCCESS, 0)
    assert struct.unpack_from("<Q", env.part.ram, OUT_PAGE)[0] == VSMTRACE_PARTITION_ID
    ev = env.events(EventKind.HYPERCALL)[-1]
    assert ev["name"] == "HvCallGetPartitionId" and ev["status_name"] == "HV_STATUS_SUCCESS"
    assert ev["output"] == struct.pack("<Q", VSMTRACE_PARTITION_ID) and ev["fast"] is False
    assert set(ev) == {"code", "name", "control", "fast", "rep_count", "rep_start", "reps_done", "status",
                       "status_name", "input", "output", "regs_in", "regs_out", "duration_ns"}  # fmt: skip
    assert ev["regs_out"] == hypercall_rax(S.HV_STATUS_SUCCESS).to_bytes(8, "little")


def hypercall_rax(status: int, reps: int = 0) -> int:
    return status | (reps << 32)


def test_rep_continuation_from_nonzero_start(env: Env) -> None:
    ids = [1, 0, 1, 0]
    data = HvInputGetVpIndexFromApicId(HV_PARTITION_ID_SELF, 0).pack() + struct.pack("<4I", *ids)
    env.part.ram[OUT_PAGE : OUT_PAGE + 16] = b"\xee" * 16
    status, reps = env.call(ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=4, rep_start=2), input=data)
    assert (status, reps) == (S.HV_STATUS_SUCCESS, 4)
    assert env.part.ram[OUT_PAGE : OUT_PAGE + 8] == b"\xee" * 8  # elements 0,1 untouched
    assert struct.unpack_from("<2I", env.part.ram, OUT_PAGE + 8) == (1, 0)


def test_rep_handler_stops_on_error(env: Env) -> None:
    data = HvInputGetVpIndexFromApicId(HV_PARTITION_ID_SELF, 0).pack() + struct.pack("<3I", 1, 0, 77)
    assert env.call(ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=3), input=data) == (
        S.HV_STATUS_INVALID_PARAMETER,
        2,
    )
    assert struct.unpack_from("<2I", env.part.ram, OUT_PAGE) == (1, 0)


def test_rep_partial_progress_retries(env: Env) -> None:
    seen: list[tuple[int, int]] = []

    def one_at_a_time(inp: HypercallInput) -> HypercallResult:
        seen.append((inp.rep_start, len(inp.rep_elements)))
        return HypercallResult(rep_outputs=[inp.rep_elements[0][::-1]], reps_done=inp.rep_start + 1)

    env.hv.dispatcher.register(
        HypercallSpec(HypercallCode.HvCallFlushGuestPhysicalAddressList, one_at_a_time, rep=True, rep_input_size=8,
                      rep_output_size=8)  # fmt: skip
    )
    control = ctl(HypercallCode.HvCallFlushGuestPhysicalAddressList, rep_count=3)
    env.part.ram[IN_PAGE : IN_PAGE + 24] = bytes(range(24))
    regs = env.part.vps[0].regs[0]
    regs.update(rcx=control, rdx=IN_PAGE, r8=OUT_PAGE, rax=0xDEAD)
    for expected_start in (0, 1, 2):
        outcome = env.hv.hypercall(0, 0)
        assert seen[-1] == (expected_start, 3 - expected_start)
        if expected_start < 2:
            assert outcome.retry and regs["rax"] == 0xDEAD
            assert HypercallControl.decode(int(regs["rcx"])).rep_start == expected_start + 1
    assert not outcome.retry and regs["rax"] == hypercall_rax(0, 3)
    assert bytes(env.part.ram[OUT_PAGE : OUT_PAGE + 24]) == b"".join(bytes(range(i, i + 8))[::-1] for i in (0, 8, 16))


def test_fast_register_input(env: Env) -> None:
    env.enable_synic()
    ev_in = HvInputSignalEvent(VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID, 3).pack()
    outcome, rax = env.fast(ctl(HypercallCode.HvCallSignalEvent), struct.unpack("<Q", ev_in)[0], 0)
    assert rax == 0 and outcome.status == S.HV_STATUS_SUCCESS
    assert env.part.ram[SIEFP_PAGE + VSMTRACE_LOOPBACK_SINT * 256] == 1 << 3
    ev = env.events(EventKind.HYPERCALL)[-1]
    assert ev["fast"] is True and ev["input"] == ev_in


def test_xmm_fast_input_and_output(env: Env) -> None:
    # SendSyntheticClusterIpiEx fast: 24-byte header + 1 bank = 32 bytes -> RDX:R8 + XMM0.
    hdr = HvInputSendSyntheticClusterIpiEx(vector=0x31, vp_set_format=HvGenericSetFormat.SPARSE_4K,
                                           valid_banks_mask=1).pack() + struct.pack("<Q", 0b10)  # fmt: skip
    rdx, r8, x_lo, x_hi = struct.unpack("<4Q", hdr)
    outcome, rax = env.fast(ctl(HypercallCode.HvCallSendSyntheticClusterIpiEx, var_header_qwords=1), rdx, r8,
                            [x_lo | (x_hi << 64)])  # fmt: skip
    assert rax == 0 and env.part.interrupts == [(1, 0, 0x31)]
    # GetVpIndexFromApicId fast: 16-byte header + 2 x u32 ids (pair 1 = XMM0); output in pair 2 = XMM1.
    outcome, rax = env.fast(ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=2), HV_PARTITION_ID_SELF, 0,
                            [1 | (0 << 32), 0x5555])  # fmt: skip
    assert rax == hypercall_rax(0, 2)
    assert env.part.vps[0].xmm[0][1] & 0xFFFF_FFFF_FFFF_FFFF == 1  # VP indices (1, 0)
    ev = env.events(EventKind.HYPERCALL)[-1]
    assert ev["regs_out"][:16] == (1).to_bytes(16, "little")


def test_xmm_not_advertised_is_ud() -> None:
    e = Env(HypervPolicy.from_switches(["xmm-input", "xmm-output"]))
    e.enable_hypercalls()
    hdr = HvInputSendSyntheticClusterIpiEx(vector=0x31, valid_banks_mask=1).pack()
    rdx, r8, _ = struct.unpack("<3Q", hdr)
    e.fast(ctl(HypercallCode.HvCallSendSyntheticClusterIpiEx), rdx, r8)
    assert e.part.vps[0].exceptions == [(0, X86Exception.UD, None)]
    e.fast(ctl(HypercallCode.HvCallGetPartitionId), 0, 0)  # needs fast output
    assert len(e.part.vps[0].exceptions) == 2


def test_fast_input_too_large(env: Env) -> None:
    _, rax = env.fast(ctl(HypercallCode.HvCallSendSyntheticClusterIpiEx, var_header_qwords=12), 0, 0)
    assert rax == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    _, rax = env.fast(ctl(HypercallCode.HvCallPostMessage), 0, 0)  # 256 bytes cannot be fast
    assert rax == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_32bit_caller_convention(env: Env) -> None:
    vp = env.part.vps[0]
    vp.modes[0] = CpuMode.PROTECTED
    vp.regs[0].update(rdx=0, rax=ctl(HypercallCode.HvCallGetPartitionId), rbx=0, rcx=0, rdi=0, rsi=OUT_PAGE)
    outcome = env.hv.hypercall(0, 0)
    assert outcome.status == S.HV_STATUS_SUCCESS and vp.regs[0]["rax"] == 0 and vp.regs[0]["rdx"] == 0
    assert struct.unpack_from("<Q", env.part.ram, OUT_PAGE)[0] == VSMTRACE_PARTITION_ID
    vp.regs[0].update(rdx=1, rax=ctl(HypercallCode.HvCallGetVpIndexFromApicId))  # rep count 1 in EDX
    env.part.ram[IN_PAGE : IN_PAGE + 20] = HvInputGetVpIndexFromApicId(HV_PARTITION_ID_SELF).pack() + b"\1\0\0\0"
    vp.regs[0].update(rbx=0, rcx=IN_PAGE)
    env.hv.hypercall(0, 0)
    assert (vp.regs[0]["rdx"], vp.regs[0]["rax"]) == (1, 0)  # EDX:EAX = reps 1, SUCCESS


def test_vtl_hook_gets_vtl_calls(env: Env) -> None:
    from vsmtrace.vmm.hyperv.hypercall import HypercallOutcome

    requests = []
    env.hv.dispatcher.set_vtl_hook(lambda req: requests.append(req) or HypercallOutcome(req.code, vtl_action="switch"))
    vp = env.part.vps[0]
    vp.regs[0].update(rcx=HypercallCode.HvCallVtlCall, rax=0)
    outcome = env.hv.hypercall(0, 0)
    assert outcome.vtl_action == "switch" and requests[0].vtl_input == 0 and requests[0].code == HypercallCode.HvCallVtlCall
    assert vp.regs[0]["rax"] == 0  # nothing written by the dispatcher


# ---------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------


def test_notify_long_spin_wait(env: Env) -> None:
    spins = []
    env.hv.on_long_spin_wait = lambda vp, count: spins.append((vp, count))
    _, rax = env.fast(ctl(HypercallCode.HvCallNotifyLongSpinWait), 0x1000, 0)
    assert rax == 0 and spins == [(0, 0x1000)]


def test_flush_virtual_address_space_forms(env: Env) -> None:
    c = ctl(HypercallCode.HvCallFlushVirtualAddressSpace)
    assert env.call(c, input=HvInputFlushVirtualAddressSpace(0, 0, 0b10).pack())[0] == S.HV_STATUS_SUCCESS
    assert env.call(c, input=HvInputFlushVirtualAddressSpace(0, HvFlushFlags.ALL_PROCESSORS, 0).pack())[0] == 0
    assert env.tlb.flushes == [((1,), 0), ((0, 1), 0)]
    # undefined flag bits are ignored (KVM does; guests send uninitialised structs): a flush of VP 0
    assert env.call(c, input=HvInputFlushVirtualAddressSpace(0, (0xDEAD << 32) | 1 << 20, 1).pack())[0] == 0
    assert env.tlb.flushes[-1] == ((0,), 0)
    bad_vtl = HvFlushFlags.USE_TARGET_VTL | HvFlushFlags.TARGET_VTL1
    assert env.call(c, input=HvInputFlushVirtualAddressSpace(0, bad_vtl, 1).pack())[0] == S.HV_STATUS_ACCESS_DENIED
    lst = ctl(HypercallCode.HvCallFlushVirtualAddressList, rep_count=2)
    hdr = HvInputFlushVirtualAddressSpace(0, 0, 0b11).pack() + struct.pack("<2Q", 0x1000, 0x5003)
    assert env.call(lst, input=hdr) == (S.HV_STATUS_SUCCESS, 2)
    assert env.tlb.flushes[-1] == ((0, 1), 0)
    hdr = HvInputFlushVirtualAddressSpace(0, HvFlushFlags.NON_GLOBAL_MAPPINGS_ONLY, 1).pack() + bytes(16)
    assert env.call(lst, input=hdr)[0] == S.HV_STATUS_INVALID_PARAMETER
    ex = ctl(HypercallCode.HvCallFlushVirtualAddressSpaceEx, var_header_qwords=1)
    hdr = HvInputFlushVirtualAddressSpaceEx(0, 0, HvGenericSetFormat.SPARSE_4K, 1).pack() + struct.pack("<Q", 0b01)
    assert env.call(ex, input=hdr)[0] == S.HV_STATUS_SUCCESS and env.tlb.flushes[-1] == ((0,), 0)
    hdr = HvInputFlushVirtualAddressSpaceEx(0, 0, 7, 1).pack() + bytes(8)
    assert env.call(ex, input=hdr)[0] == S.HV_STATUS_INVALID_PARAMETER
    hdr = HvInputFlushVirtualAddressSpaceEx(0, 0, HvGenericSetFormat.SPARSE_4K, 0b11).pack() + bytes(8)
    assert env.call(ex, input=hdr)[0] == S.HV_STATUS_INVALID_HYPERCALL_INPUT  # two banks, one given
    lex = ctl(HypercallCode.HvCallFlushVirtualAddressListEx, var_header_qwords=0, rep_count=1)
    hdr = HvInputFlushVirtualAddressSpaceEx(0, 0, HvGenericSetFormat.ALL, 0).pack() + struct.pack("<Q", 0x7000)
    assert env.call(lex, input=hdr) == (S.HV_STATUS_SUCCESS, 1) and env.tlb.flushes[-1] == ((0, 1), 0)


def test_send_synthetic_cluster_ipi(env: Env) -> None:
    c = ctl(HypercallCode.HvCallSendSyntheticClusterIpi)
    assert env.call(c, input=HvInputSendSyntheticClusterIpi(vector=0x30, processor_mask=0b111).pack())[0] == 0
    assert env.part.interrupts == [(0, 0, 0x30), (1, 0, 0x30)]  # VP 2 does not exist: ignored
    for vector in (0x0F, 0x100):
        assert env.call(c, input=HvInputSendSyntheticClusterIpi(vector=vector, processor_mask=1).pack())[0] == (
            S.HV_STATUS_INVALID_HYPERCALL_INPUT
        )
    up = HvInputVtl(1, True).encode()
    # a VTL above the caller is allowed (seed), but this partition has one VTL
    assert env.call(c, input=HvInputSendSyntheticClusterIpi(0x30, up, 0, 0, 1).pack())[0] == S.HV_STATUS_INVALID_PARAMETER
    assert env.call(c, input=HvInputSendSyntheticClusterIpi(0x30, 0xE0, 0, 0, 1).pack())[0] == (
        S.HV_STATUS_INVALID_PARAMETER
    )
    ex = ctl(HypercallCode.HvCallSendSyntheticClusterIpiEx, var_header_qwords=0)
    hdr = HvInputSendSyntheticClusterIpiEx(vector=0x44, vp_set_format=HvGenericSetFormat.ALL).pack()
    env.part.interrupts.clear()
    assert env.call(ex, input=hdr)[0] == 0 and env.part.interrupts == [(0, 0, 0x44), (1, 0, 0x44)]


def test_get_vp_index_from_apic_id_statuses(env: Env) -> None:
    c = ctl(HypercallCode.HvCallGetVpIndexFromApicId, rep_count=1)
    assert env.call(c, input=HvInputGetVpIndexFromApicId(42, 0).pack() + bytes(4))[0] == (
        S.HV_STATUS_INVALID_PARTITION_ID
    )
    ok = HvInputGetVpIndexFromApicId(VSMTRACE_PARTITION_ID, 0).pack() + struct.pack("<I", 1)
    assert env.call(c, input=ok) == (S.HV_STATUS_SUCCESS, 1)


def test_post_message_loopback_and_statuses(env: Env) -> None:
    c = ctl(HypercallCode.HvCallPostMessage)

    def post(conn: int = VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID, mtype: int = 0x42, payload: bytes = b"hello",
             size: int | None = None) -> int:  # fmt: skip
        req = HvInputPostMessage(conn, 0, mtype, len(payload) if size is None else size, payload.ljust(240, b"\0"))
        return env.call(c, input=req.pack())[0]

    assert post() == S.HV_STATUS_INVALID_SYNIC_STATE  # SynIC not enabled yet
    env.enable_synic()
    assert post() == S.HV_STATUS_SUCCESS
    msg = env.slot(VSMTRACE_LOOPBACK_SINT)
    assert (msg.header.message_type, msg.payload, msg.header.origination_id) == (
        0x42,
        b"hello",
        VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID,
    )
    assert env.part.interrupts[-1] == (0, 0, SINT_VECTOR + VSMTRACE_LOOPBACK_SINT)
    syn = env.events(EventKind.SYNIC_MESSAGE)[-1]
    assert syn["sint"] == VSMTRACE_LOOPBACK_SINT and syn["message_type"] == 0x42 and len(syn["message"]) == 256
    assert post(conn=0x1234) == S.HV_STATUS_INVALID_CONNECTION_ID
    assert post(conn=VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID) == S.HV_STATUS_INVALID_PORT_ID
    assert post(mtype=0) == S.HV_STATUS_INVALID_PARAMETER
    assert post(mtype=0x8000_0001) == S.HV_STATUS_INVALID_PARAMETER
    assert post(size=241) == S.HV_STATUS_INVALID_PARAMETER
    env.hv.connections.add(7, MessagePort(sint=3, vp=5))
    assert post(conn=7) == S.HV_STATUS_INVALID_VP_INDEX
    # slot busy: 16 more queue (16 buffers per port), the 17th does not fit
    for _ in range(16):
        assert post() == S.HV_STATUS_SUCCESS
    assert post() == S.HV_STATUS_INSUFFICIENT_BUFFERS


def test_signal_event_statuses(env: Env) -> None:
    c = ctl(HypercallCode.HvCallSignalEvent)

    def signal(conn: int = VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID, flag: int = 0, rsvd: int = 0) -> int:
        return env.call(c, input=HvInputSignalEvent(conn, flag, rsvd).pack())[0]

    assert signal() == S.HV_STATUS_INVALID_SYNIC_STATE
    env.enable_synic()
    assert signal(flag=9) == S.HV_STATUS_SUCCESS
    assert env.part.ram[SIEFP_PAGE + VSMTRACE_LOOPBACK_SINT * 256 + 1] == 0b10
    assert len(env.part.interrupts) == 1
    assert signal(flag=9) == S.HV_STATUS_SUCCESS and len(env.part.interrupts) == 1  # already set: no interrupt
    assert signal(rsvd=1) == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    assert signal(conn=99) == S.HV_STATUS_INVALID_CONNECTION_ID
    assert signal(conn=VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID) == S.HV_STATUS_INVALID_PORT_ID
    env.hv.connections.add(8, EventPort(sint=4, vp=1, flag_count=4))
    assert signal(conn=8, flag=4) == S.HV_STATUS_INVALID_PARAMETER
    assert signal(conn=8, flag=1) == S.HV_STATUS_INVALID_SYNIC_STATE  # VP1's SynIC is off
    env.enable_synic(vp=1, sints=())  # SINT4 left masked
    assert signal(conn=8, flag=1) == S.HV_STATUS_INVALID_SYNIC_STATE


# ---------------------------------------------------------------------------------------------
# SynIC
# ---------------------------------------------------------------------------------------------


def test_synic_queue_pending_flag_and_eom_redelivery() -> None:
    e = Env()
    e.enable_synic(sints=(1,))
    synic = e.hv.synic(0, 0)
    for n in (1, 2, 3):
        assert synic.post(1, HvMessage.build(0x100 + n, bytes([n]))) == S.HV_STATUS_SUCCESS
    assert e.slot(1).header.message_type == 0x101
    assert e.slot(1).header.message_flags & HvMessageFlags.MESSAGE_PENDING
    assert len(e.part.interrupts) == 1
    e.wr(HvMsr.HV_X64_MSR_EOM, 0)  # slot still full: nothing moves
    assert e.slot(1).header.message_type == 0x101
    e.clear_slot(1)
    e.wr(HvMsr.HV_X64_MSR_EOM, 0)
    assert e.slot(1).header.message_type == 0x102 and e.slot(1).payload == b"\x02"
    assert e.slot(1).header.message_flags & HvMessageFlags.MESSAGE_PENDING  # one more behind it
    e.clear_slot(1)
    e.wr(HvMsr.HV_X64_MSR_EOI, 0)  # an APIC EOI also rescans
    assert e.slot(1).header.message_type == 0x103
    assert not e.slot(1).header.message_flags & HvMessageFlags.MESSAGE_PENDING
    assert len(e.part.interrupts) == 3


def test_synic_masked_and_polling_sints_do_not_interrupt() -> None:
    e = Env()
    e.enable_synic(sints=())
    e.wr(HvMsr.HV_X64_MSR_SINT3, HvSint.MASKED | 0x50)
    e.hv.synic(0, 0).post(3, HvMessage.build(0x1, b""))
    e.wr(HvMsr.HV_X64_MSR_SINT4, HvSint.POLLING | 0x51)
    e.hv.synic(0, 0).post(4, HvMessage.build(0x2, b""))
    assert e.slot(3).header.message_type == 1 and e.slot(4).header.message_type == 2
    assert e.part.interrupts == []


def test_synic_hypervisor_message_waits_for_page() -> None:
    e = Env()
    assert e.hv.post_intercept(0, 0, HvMessage.build(HvMessageType.HvMessageTypeGpaIntercept, b"x")) == 0
    e.enable_synic(sints=(0,))
    assert e.slot(0).header.message_type == HvMessageType.HvMessageTypeGpaIntercept


def test_message_header_layout() -> None:
    raw = HvMessage(HvMessageHeader(0x80000010, 24, 1, 0, 7), b"\x01" * 24).pack()
    assert len(raw) == 256 and raw[:16] == struct.pack("<IBBHQ", 0x80000010, 24, 1, 0, 7)
    assert HvVpSet.sparse([0, 5, 130]).pack() == struct.pack("<4Q", 0, 0b101, 0x21, 0x4)  # TLFS example
    assert HvVpSet.sparse([0, 5, 130]).vp_indices(200) == [0, 5, 130]


# ---------------------------------------------------------------------------------------------
# Synthetic timers
# ---------------------------------------------------------------------------------------------


def _timer_msg(e: Env, sint: int) -> HvTimerMessagePayload:
    msg = e.slot(sint)
    assert msg.header.message_type == HvMessageType.HvMessageTypeTimerExpired
    return HvTimerMessagePayload.unpack(msg.payload)


def _advance(e: Env, ticks: int) -> None:
    e.part.now += ticks
    e.timers.advance_to(e.part.now * 100)


def test_stimer_one_shot_message() -> None:
    e = Env()
    e.enable_synic(sints=(2,))
    e.wr(HvMsr.HV_X64_MSR_STIMER1_COUNT, 5000)
    e.wr(HvMsr.HV_X64_MSR_STIMER1_CONFIG, HvStimerConfig.ENABLE | (2 << HvStimerConfig.SINT_SHIFT))
    assert e.timers.next_deadline() == 5000 * 100
    _advance(e, 4999)
    assert e.slot(2).header.message_type == 0
    _advance(e, 3)
    payload = _timer_msg(e, 2)
    assert (payload.timer_index, payload.expiration_time, payload.delivery_time) == (1, 5000, 5002)
    assert e.part.interrupts == [(0, 0, SINT_VECTOR + 2)]
    assert not e.rd(HvMsr.HV_X64_MSR_STIMER1_CONFIG) & HvStimerConfig.ENABLE  # one-shot disables itself
    assert e.events(EventKind.TIMER) == [{"timer": "stimer1", "deadline_ns": 500_000}]


def test_stimer_periodic_and_missed_message() -> None:
    e = Env()
    e.enable_synic(sints=(3,))
    e.part.now = 100
    e.wr(HvMsr.HV_X64_MSR_STIMER0_CONFIG, HvStimerConfig.PERIODIC | HvStimerConfig.AUTO_ENABLE | (3 << 16))
    e.wr(HvMsr.HV_X64_MSR_STIMER0_COUNT, 1000)  # auto-enable on count write
    assert e.rd(HvMsr.HV_X64_MSR_STIMER0_CONFIG) & HvStimerConfig.ENABLE
    _advance(e, 1000)
    assert _timer_msg(e, 3).expiration_time == 1100
    _advance(e, 1000)  # slot still full: expiry 2100 queues behind it
    e.clear_slot(3)
    e.wr(HvMsr.HV_X64_MSR_EOM, 0)
    assert _timer_msg(e, 3).expiration_time == 2100
    e.clear_slot(3)
    _advance(e, 5500)  # far behind: missed periods are skipped
    assert _timer_msg(e, 3).expiration_time == 3100
    assert e.timers.next_deadline() == (7600 + 1000) * 100


def test_stimer_direct_mode_and_config_rules() -> None:
    e = Env()
    direct = HvStimerConfig.ENABLE | HvStimerConfig.DIRECT_MODE | (0x77 << HvStimerConfig.APIC_VECTOR_SHIFT)
    e.wr(HvMsr.HV_X64_MSR_STIMER2_COUNT, 10)
    e.wr(HvMsr.HV_X64_MSR_STIMER2_CONFIG, direct)
    _advance(e, 10)
    assert e.part.interrupts == [(0, 0, 0x77)]
    e.wr(HvMsr.HV_X64_MSR_STIMER3_CONFIG, HvStimerConfig.ENABLE)  # SINT 0, message mode -> disabled
    assert e.rd(HvMsr.HV_X64_MSR_STIMER3_CONFIG) == 0
    with pytest.raises(GpFault):
        e.wr(HvMsr.HV_X64_MSR_STIMER3_CONFIG, 1 << 13)
    e.wr(HvMsr.HV_X64_MSR_STIMER3_CONFIG, HvStimerConfig.ENABLE | (1 << 16))
    e.wr(HvMsr.HV_X64_MSR_STIMER3_COUNT, 99)
    assert e.timers.armed == 1
    e.wr(HvMsr.HV_X64_MSR_STIMER3_COUNT, 0)  # zero count stops the timer
    assert e.timers.armed == 0 and not e.rd(HvMsr.HV_X64_MSR_STIMER3_CONFIG) & HvStimerConfig.ENABLE
    no_direct = Env(HypervPolicy.from_switches(["stimer-direct"]))
    with pytest.raises(GpFault):
        no_direct.wr(HvMsr.HV_X64_MSR_STIMER0_CONFIG, HvStimerConfig.DIRECT_MODE)


# ---------------------------------------------------------------------------------------------
# Reference time and TSC page
# ---------------------------------------------------------------------------------------------


def test_reference_clock_matches_tsc_page_formula() -> None:
    tsc = [10**12]
    clock = ReferenceClock.from_guest_tsc(lambda: tsc[0], TSC_HZ)
    assert clock.reference_time() == 0
    params = clock.tsc_page_params()
    assert params is not None and params.scale == tsc_scale_for(TSC_HZ)
    for delta in (1, TSC_HZ // 10_000_000, TSC_HZ, 7 * TSC_HZ + 12345, 3600 * TSC_HZ):
        tsc[0] = 10**12 + delta
        ref = clock.reference_time()
        assert ref == params.reference_time(tsc[0])
        assert abs(ref - delta * 10_000_000 // TSC_HZ) <= 1
    mono = [5_000]
    m = ReferenceClock.from_monotonic(lambda: mono[0])
    mono[0] += 1_000_000
    assert m.reference_time() == 10_000 and m.tsc_page_params() is None
    mono[0] -= 500  # never goes backwards
    assert m.reference_time() == 10_000


def test_tsc_page_written_and_consistent_with_msr() -> None:
    tsc = [123_456_789]
    clock = ReferenceClock.from_guest_tsc(lambda: tsc[0], TSC_HZ)
    e = Env(clock=clock)
    e.part.reference_time = clock.reference_time  # the machine implements it from the clock
    e.wr(HvMsr.HV_X64_MSR_REFERENCE_TSC, TSC_PAGE | 1)
    assert e.rd(HvMsr.HV_X64_MSR_REFERENCE_TSC) == TSC_PAGE | 1
    page = HvReferenceTscPage.unpack(bytes(e.part.ram[TSC_PAGE : TSC_PAGE + HvReferenceTscPage.SIZE]))
    assert page.tsc_sequence == 1
    guest = TscPageParams(page.tsc_scale, page.tsc_offset)
    tsc[0] += 3 * TSC_HZ
    assert guest.reference_time(tsc[0]) == e.rd(HvMsr.HV_X64_MSR_TIME_REF_COUNT) == 30_000_000
    e.wr(HvMsr.HV_X64_MSR_REFERENCE_TSC, TSC_PAGE | 1)
    assert HvReferenceTscPage.unpack(bytes(e.part.ram[TSC_PAGE : TSC_PAGE + 24])).tsc_sequence == 2
    invalid = Env()  # no TSC-based clock: page reads invalid (sequence 0)
    invalid.part.ram[TSC_PAGE : TSC_PAGE + 4] = b"\xff" * 4
    invalid.wr(HvMsr.HV_X64_MSR_REFERENCE_TSC, TSC_PAGE | 1)
    assert HvReferenceTscPage.unpack(bytes(invalid.part.ram[TSC_PAGE : TSC_PAGE + 24])).tsc_sequence == 0


# ---------------------------------------------------------------------------------------------
# Per-VTL state
# ---------------------------------------------------------------------------------------------


def test_vtl_array() -> None:
    arr = VtlArray(2, lambda vtl: [vtl])
    assert len(arr) == 2 and arr[1] == [1] and list(arr) == [[0], [1]]
    with pytest.raises(IndexError):
        arr[2]
    with pytest.raises(ValueError):
        VtlArray(0, lambda vtl: vtl)


def test_state_is_private_per_vtl() -> None:
    e = Env(HypervPolicy().with_vsm())
    assert e.hv.vtl_count == 2
    e.enable_hypercalls(vtl=0)
    assert e.hv.hypercall_page_enabled(0) and not e.hv.hypercall_page_enabled(1)
    assert e.rd(HvMsr.HV_X64_MSR_GUEST_OS_ID, vtl=1) == 0
    e.enable_synic(vtl=1, sints=(0,))
    assert e.rd(HvMsr.HV_X64_MSR_SCONTROL, vtl=0) == 0 and e.rd(HvMsr.HV_X64_MSR_SCONTROL, vtl=1) == 1
    e.hv.post_intercept(0, 1, HvMessage.build(HvMessageType.HvMessageTypeGpaIntercept, b""))
    assert e.part.interrupts == [(0, 1, SINT_VECTOR)]
    assert e.hv.synic(0, 1) is not e.hv.synic(0, 0) and e.hv.stimers(1, 1) is not e.hv.stimers(1, 0)
    # a VTL1 caller may target VTL0 with an IPI; a VTL0 caller may not target VTL1
    e.enable_hypercalls(vtl=1)
    down = HvInputSendSyntheticClusterIpi(0x30, HvInputVtl(0, True).encode(), 0, 0, 1).pack()
    assert e.call(ctl(HypercallCode.HvCallSendSyntheticClusterIpi), vtl=1, input=down)[0] == 0
    assert e.part.interrupts[-1] == (0, 0, 0x30)
