"""Unit tests of vmm/vsm without KVM.

A fake partition (bytearray RAM, dict registers per (VP, VTL)) whose ``read_gpa`` /
``write_gpa`` consult the protections the fake services were told to apply, exactly as the
real machine's per-VTL views will; the real HyperV layer and dispatcher run on top.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from vsmtrace.vmm.events import EventKind, ListSink
from vsmtrace.vmm.hyperv import HyperV, HypervPolicy
from vsmtrace.vmm.hyperv.hvdef import (
    HV_ANY_VP,
    HV_MESSAGE_SIZE,
    HV_PAGE_SIZE,
    HV_PARTITION_ID_SELF,
    HV_VP_INDEX_SELF,
    HvFlushFlags,
    HvInitialVpContext,
    HvInputEnablePartitionVtl,
    HvInputEnableVpVtl,
    HvInputFlushVirtualAddressSpace,
    HvInputGetSetVpRegisters,
    HvInputModifyVtlProtectionMask,
    HvInputStartVirtualProcessor,
    HvInputTranslateVirtualAddress,
    HvInputVtl,
    HvMessage,
    HvMessageType,
    HvMsr,
    HvRegisterAssoc,
    HvRegisterName,
    HvStatus,
    HvTranslateGvaControlFlags,
    HvTranslateGvaResultCode,
    HvVpVtlControl,
    HvX64SegmentRegister,
    HvX64TableRegister,
    HypercallCode,
    HypercallControl,
    VsmCapabilities,
    VsmPartitionConfig,
    VsmVina,
    VsmVpSecureConfig,
    X86Exception,
)
from vsmtrace.vmm.hyperv.hypercall_page import HypercallPage
from vsmtrace.vmm.timers import ManualTimerService
from vsmtrace.vmm.vp import Access, CpuMode, GuestMemoryError, Segment, Table, VtlAccessDenied
from vsmtrace.vmm.vsm import Vsm, coalesce, valid_mask
from vsmtrace.vmm.vsm.intercept_message import build_intercept
from vsmtrace.vmm.vsm.services import EntryReason, InitialVpContext, PageProtection, SwitchReason, VtlTransition

from tests.fakes import FakeVp

RAM_SIZE = 4 << 20
RAM_PAGES = RAM_SIZE // HV_PAGE_SIZE
HC_PAGE = [0x10000, 0x11000]
ASSIST = [0x12000, 0x13000]
IN_PAGE = 0x20000
OUT_PAGE = 0x21000
OS_ID = 0x8100_0000_0000_0001
S = HvStatus
R = HvRegisterName
ALL = Access.READ | Access.WRITE | Access.EXECUTE
SELF_VTL = 0x00  # HV_INPUT_VTL: UseTargetVtl = 0
VTL0 = HvInputVtl(0, True).encode()
VTL1 = HvInputVtl(1, True).encode()


# ---------------------------------------------------------------------------------------------
# Fakes
# ---------------------------------------------------------------------------------------------


class FakeServices:
    """Records every VsmServices call; holds the protections the fake memory enforces."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.views: dict[int, dict[int, Access]] = {}
        self.started: set[int] = {0}

    def create_vtl(self, vtl: int) -> None:
        self.calls.append(("create_vtl", vtl))

    def load_vp_context(self, vp: int, vtl: int, context: InitialVpContext) -> None:
        self.calls.append(("load_vp_context", vp, vtl, context))

    def software_enable_apic(self, vp: int, vtl: int) -> None:
        self.calls.append(("software_enable_apic", vp, vtl))

    def start_vp(self, vp: int, vtl: int) -> None:
        self.calls.append(("start_vp", vp, vtl))
        self.started.add(vp)

    def vp_started(self, vp: int) -> bool:
        return vp in self.started

    def request_transition(self, transition: VtlTransition) -> None:
        self.calls.append(("request_transition", transition))

    def set_protections(self, target_vtl: int, protections: Sequence[PageProtection]) -> None:
        self.calls.append(("set_protections", target_vtl, list(protections)))
        view = self.views.setdefault(target_vtl, {})
        for p in protections:
            for page in range(p.first_page, p.first_page + p.count):
                view[page] = p.allowed

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        self.calls.append(("flush_vps", tuple(vp_indices), vtl))

    def named(self, name: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == name]


class FakePartition:
    def __init__(self, services: FakeServices, vp_count: int = 2, vtl_count: int = 2) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.vps = [FakeVp(i, vtl_count) for i in range(vp_count)]
        self.services = services
        self.interrupts: list[tuple[int, int, int]] = []

    def vp(self, index: int) -> FakeVp:
        return self.vps[index]

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def _check(self, vtl: int, gpa: int, size: int, access: Access) -> None:
        if gpa < 0 or gpa + size > len(self.ram):
            raise GuestMemoryError(gpa, size)
        view = self.services.views.get(vtl, {})
        for page in range(gpa >> 12, ((gpa + max(size, 1) - 1) >> 12) + 1):
            if access & ~view.get(page, ALL):
                raise VtlAccessDenied(vtl, page << 12, access)

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        self._check(vtl, gpa, size, access)
        return bytes(self.ram[gpa : gpa + size])

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        self._check(vtl, gpa, len(data), Access.WRITE)
        self.ram[gpa : gpa + len(data)] = data

    def reference_time(self) -> int:
        return 0

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.interrupts.append((vp_index, vtl, vector))


class FakeApic:
    def eoi(self, vp: int, vtl: int) -> None: ...

    def read_icr(self, vp: int, vtl: int) -> int:
        return 0

    def write_icr(self, vp: int, vtl: int, value: int) -> None: ...

    def read_tpr(self, vp: int, vtl: int) -> int:
        return 0

    def write_tpr(self, vp: int, vtl: int, value: int) -> None: ...


class Env:
    def __init__(self, vp_count: int = 2, policy: HypervPolicy | None = None) -> None:
        self.services = FakeServices()
        self.part = FakePartition(self.services, vp_count)
        self.sink = ListSink()
        self.hv = HyperV(self.part, policy or HypervPolicy().with_vsm(), timers=ManualTimerService(), apic=FakeApic(),
                         tlb=self.services, sink=self.sink, vtl_count=2)  # fmt: skip
        self.vsm = Vsm(self.hv, self.part, self.services, sink=self.sink, ram_ranges=[(0, RAM_SIZE)])
        for vtl in (0, 1):
            self.hv.msr_write(0, vtl, HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
            self.hv.msr_write(0, vtl, HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE[vtl] | 1)

    # -- hypercalls ----------------------------------------------------------------------------

    def call(self, code: HypercallCode, data: bytes = b"", *, vp: int = 0, vtl: int = 0, rep: int = 0,
             rep_start: int = 0, var: int = 0, out_gpa: int = OUT_PAGE) -> tuple[int, int]:  # fmt: skip
        """Memory-form hypercall; returns (status, reps done)."""
        self.part.ram[IN_PAGE : IN_PAGE + len(data)] = data
        regs = self.part.vps[vp].regs[vtl]
        regs.update(rcx=HypercallControl.encode(code, rep_count=rep, rep_start=rep_start, var_header_qwords=var),
                    rdx=IN_PAGE, r8=out_gpa, rax=0xDEAD)  # fmt: skip
        outcome = self.hv.hypercall(vp, vtl)
        assert outcome.status is not None, outcome
        rax = int(regs["rax"])  # type: ignore[arg-type]
        return rax & 0xFFFF, (rax >> 32) & 0xFFF

    def fast(self, code: HypercallCode, data: bytes, *, vp: int = 0, vtl: int = 0, rep: int = 0) -> tuple[int, int]:
        """Fast (XMM) form: ``data`` laid over RDX:R8, XMM0..."""
        data = data.ljust(-(-len(data) // 16) * 16, b"\0")
        rdx, r8 = struct.unpack_from("<QQ", data)
        vpo = self.part.vps[vp]
        for i in range(1, len(data) // 16):
            vpo.xmm[vtl][i - 1] = int.from_bytes(data[i * 16 : (i + 1) * 16], "little")
        vpo.regs[vtl].update(rcx=HypercallControl.encode(code, fast=True, rep_count=rep), rdx=rdx, r8=r8, rax=0xDEAD)
        self.hv.hypercall(vp, vtl)
        rax = int(vpo.regs[vtl]["rax"])  # type: ignore[arg-type]
        return rax & 0xFFFF, (rax >> 32) & 0xFFF

    def vtl_trap(self, code: HypercallCode, vtl_input: int, *, vp: int = 0, vtl: int = 0, control: int | None = None):
        """What the VTL call/return stub leaves at the trap: RCX = code, RAX = control input."""
        regs = self.part.vps[vp].regs[vtl]
        regs.update(rcx=int(code) if control is None else control, rax=vtl_input)
        return self.hv.hypercall(vp, vtl)

    # -- common sequences ----------------------------------------------------------------------

    def enable_partition(self, vtl: int = 1, caller_vtl: int = 0) -> int:
        return self.call(HypercallCode.HvCallEnablePartitionVtl,
                         HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, vtl, 0).pack(), vtl=caller_vtl)[0]  # fmt: skip

    def enable_vp(self, vp: int = 0, vtl: int = 1, caller_vtl: int = 0, caller_vp: int = 0,
                  context: bytes | None = None) -> int:  # fmt: skip
        ctx = context if context is not None else sample_context()
        data = HvInputEnableVpVtl(HV_PARTITION_ID_SELF, vp, vtl, ctx).pack()
        return self.call(HypercallCode.HvCallEnableVpVtl, data, vp=caller_vp, vtl=caller_vtl)[0]

    def boot_vtl1(self) -> None:
        """VTL0 enables VTL1 for the partition and VP0; VTL1 gets a VP assist page."""
        assert self.enable_partition() == S.HV_STATUS_SUCCESS
        assert self.enable_vp() == S.HV_STATUS_SUCCESS
        self.hv.msr_write(0, 1, HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, ASSIST[1] | 1)

    def get(self, names: Sequence[int], *, vp: int = HV_VP_INDEX_SELF, target: int = SELF_VTL, caller_vtl: int = 1,
            caller_vp: int = 0, partition: int = HV_PARTITION_ID_SELF) -> tuple[int, int, list[bytes]]:  # fmt: skip
        data = HvInputGetSetVpRegisters(partition, vp, target).pack() + b"".join(struct.pack("<I", n) for n in names)
        status, reps = self.call(HypercallCode.HvCallGetVpRegisters, data, vp=caller_vp, vtl=caller_vtl,
                                 rep=len(names))  # fmt: skip
        values = [bytes(self.part.ram[OUT_PAGE + 16 * i : OUT_PAGE + 16 * (i + 1)]) for i in range(reps)]
        return status, reps, values

    def set(self, pairs: Sequence[tuple[int, bytes]], *, vp: int = HV_VP_INDEX_SELF, target: int = SELF_VTL,
            caller_vtl: int = 1, caller_vp: int = 0) -> tuple[int, int]:  # fmt: skip
        data = HvInputGetSetVpRegisters(HV_PARTITION_ID_SELF, vp, target).pack()
        data += b"".join(HvRegisterAssoc(name, value.ljust(16, b"\0")).pack() for name, value in pairs)
        return self.call(HypercallCode.HvCallSetVpRegisters, data, vp=caller_vp, vtl=caller_vtl, rep=len(pairs))

    def enable_protections(self, mask: int = 0xF, caller_vtl: int = 1) -> int:
        value = int(VsmPartitionConfig.ENABLE_VTL_PROTECTION) | (mask << 1)
        return self.set([(R.HvRegisterVsmPartitionConfig, q(value))], caller_vtl=caller_vtl)[0]

    def protect(self, pages: Sequence[int], flags: int, target: int = SELF_VTL, caller_vtl: int = 1,
                rep_start: int = 0) -> tuple[int, int]:  # fmt: skip
        data = HvInputModifyVtlProtectionMask(HV_PARTITION_ID_SELF, flags, target).pack()
        data += b"".join(struct.pack("<Q", p) for p in pages)
        return self.call(HypercallCode.HvCallModifyVtlProtectionMask, data, vtl=caller_vtl, rep=len(pages),
                         rep_start=rep_start)  # fmt: skip

    def events(self, kind: EventKind) -> list[dict]:
        return [fields for k, _vp, _vtl, _rip, fields in self.sink.events if k == kind]


def q(value: int) -> bytes:
    return struct.pack("<QQ", value & ((1 << 64) - 1), 0)


def low(value: bytes) -> int:
    return struct.unpack_from("<Q", value)[0]


def sample_context() -> bytes:
    seg = HvX64SegmentRegister(0, 0xFFFFFFFF, 0x8, 0xA09B).pack()
    data = HvX64SegmentRegister(0, 0xFFFFFFFF, 0x10, 0xC093).pack()
    return HvInitialVpContext(
        rip=0x1000, rsp=0x8000, rflags=2, cs=seg, ds=data, es=data, fs=data, gs=data, ss=data,
        tr=HvX64SegmentRegister(0x5000, 0x67, 0x18, 0x8B).pack(), ldtr=HvX64SegmentRegister(0, 0, 0, 0x82).pack(),
        idtr=HvX64TableRegister(0xFFF, 0x6000).pack(), gdtr=HvX64TableRegister(0x27, 0x7000).pack(),
        efer=0x500, cr0=0x80000011, cr3=0x9000, cr4=0x20, msr_cr_pat=0x0007040600070406,
    ).pack()  # fmt: skip


@pytest.fixture
def env() -> Env:
    return Env()


@pytest.fixture
def vtl1() -> Env:
    e = Env()
    e.boot_vtl1()
    return e


# ---------------------------------------------------------------------------------------------
# Enablement
# ---------------------------------------------------------------------------------------------


def test_enable_sequence(env: Env) -> None:
    assert not env.vsm.partition_vtl_enabled(1)
    assert env.enable_partition() == S.HV_STATUS_SUCCESS
    assert env.services.named("create_vtl") == [("create_vtl", 1)]
    assert env.vsm.partition_vtl_enabled(1) and not env.vsm.vtl_enabled(0, 1)
    assert env.enable_vp() == S.HV_STATUS_SUCCESS
    (_, vp, vtl, ctx), = env.services.named("load_vp_context")
    assert (vp, vtl) == (0, 1)
    r = ctx.registers
    assert r["rip"] == 0x1000 and r["rsp"] == 0x8000 and r["rflags"] == 2
    assert r["cs"] == Segment(0, 0xFFFFFFFF, 0x8, 0xA09B) and r["tr"] == Segment(0x5000, 0x67, 0x18, 0x8B)
    assert r["idtr"] == Table(0x6000, 0xFFF) and r["gdtr"] == Table(0x7000, 0x27)
    assert (r["efer"], r["cr0"], r["cr3"], r["cr4"], r["pat"]) == (0x500, 0x80000011, 0x9000, 0x20, 0x0007040600070406)
    assert set(r) == {"rip", "rsp", "rflags", "cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr", "idtr", "gdtr",
                      "efer", "cr0", "cr3", "cr4", "pat"}  # fmt: skip
    assert env.vsm.vtl_enabled(0, 1) and env.vsm.highest_enabled_vtl(0) == 1 and env.vsm.highest_enabled_vtl(1) == 0
    assert env.part.vps[0].active_vtl == 0  # EnableVpVtl does not switch
    assert not env.services.named("request_transition")
    assert env.events(EventKind.VTL_ENABLE) == [{"target_vtl": 1, "target_vp": None}, {"target_vtl": 1, "target_vp": 0}]


def test_enable_partition_vtl_negative(env: Env) -> None:
    code = HypercallCode.HvCallEnablePartitionVtl
    assert env.call(code, HvInputEnablePartitionVtl(0x1234, 1, 0).pack())[0] == S.HV_STATUS_INVALID_PARTITION_ID
    assert env.call(code, HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, 1, 1).pack())[0] == S.HV_STATUS_INVALID_PARAMETER
    assert env.call(code, HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, 1, 0x80).pack())[0] == S.HV_STATUS_INVALID_PARAMETER
    assert env.enable_partition(vtl=2) == S.HV_STATUS_INVALID_PARAMETER
    assert env.enable_partition(vtl=0) == S.HV_STATUS_INVALID_PARAMETER
    good = HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, 1, 0).pack()
    for offset in range(10, 16):  # RsvdZ[6]
        bad = bytearray(good)
        bad[offset] = 1
        assert env.call(code, bytes(bad))[0] == S.HV_STATUS_INVALID_PARAMETER, offset
        assert env.fast(code, bytes(bad))[0] == S.HV_STATUS_INVALID_PARAMETER, offset  # R8 bits 63:16
    assert not env.services.named("create_vtl")
    # fast form: RDX = partition id, R8 = vtl | flags << 8
    assert env.fast(code, HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, 1, 0).pack()) == (S.HV_STATUS_SUCCESS, 0)
    assert env.enable_partition() == S.HV_STATUS_INVALID_PARAMETER
    assert env.services.named("create_vtl") == [("create_vtl", 1)]


def test_vsm_calls_need_the_policy() -> None:
    env = Env(policy=HypervPolicy())
    assert env.enable_partition() == S.HV_STATUS_INVALID_HYPERCALL_CODE
    outcome = env.vtl_trap(HypercallCode.HvCallVtlCall, 0)
    assert outcome.exception == X86Exception.UD


def test_enable_vp_vtl_negative(env: Env) -> None:
    assert env.enable_vp() == S.HV_STATUS_INVALID_VTL_STATE  # partition VTL not enabled yet
    env.enable_partition()
    data = HvInputEnableVpVtl(7, 0, 1, sample_context()).pack()
    assert env.call(HypercallCode.HvCallEnableVpVtl, data)[0] == S.HV_STATUS_INVALID_PARTITION_ID
    assert env.enable_vp(vp=5) == S.HV_STATUS_INVALID_VP_INDEX
    assert env.enable_vp(vtl=2) == S.HV_STATUS_INVALID_PARAMETER
    assert env.enable_vp(vp=HV_VP_INDEX_SELF) == S.HV_STATUS_SUCCESS  # VP0 itself
    assert env.enable_vp() == S.HV_STATUS_INVALID_PARAMETER
    # once VTL1 runs somewhere, only VTL1 may enable it on other VPs
    assert env.enable_vp(vp=1) == S.HV_STATUS_ACCESS_DENIED
    assert env.enable_vp(vp=1, caller_vtl=1) == S.HV_STATUS_SUCCESS
    assert env.services.named("load_vp_context")[-1][1:3] == (1, 1)
    # 240 bytes cannot be a fast call
    status, _ = env.fast(HypercallCode.HvCallEnableVpVtl, HvInputEnableVpVtl(HV_PARTITION_ID_SELF, 1, 1).pack()[:112])
    assert status == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_start_virtual_processor(vtl1: Env) -> None:
    code = HypercallCode.HvCallStartVirtualProcessor
    ctx = sample_context()

    def start(vp: int, vtl: int, caller_vtl: int = 0, partition: int = HV_PARTITION_ID_SELF) -> int:
        data = HvInputStartVirtualProcessor(partition, vp, vtl, 0, ctx).pack()
        return vtl1.call(code, data, vtl=caller_vtl)[0]

    assert start(1, 0, partition=3) == S.HV_STATUS_INVALID_PARTITION_ID
    assert start(9, 0) == S.HV_STATUS_INVALID_VP_INDEX
    assert start(1, 1) == S.HV_STATUS_ACCESS_DENIED  # VTL0 cannot start VTL1
    assert start(1, 1, caller_vtl=1) == S.HV_STATUS_INVALID_VTL_STATE  # VTL1 not enabled on VP1
    assert start(0, 0) == S.HV_STATUS_INVALID_VP_STATE  # VP0 runs
    # DenyLowerVtlStartup set by VTL1 stops VTL0's start
    assert vtl1.set([(R.HvRegisterVsmPartitionConfig, q(VsmPartitionConfig.DENY_LOWER_VTL_STARTUP))])[0] == 0
    assert start(1, 0) == S.HV_STATUS_ACCESS_DENIED
    assert vtl1.set([(R.HvRegisterVsmPartitionConfig, q(0))])[0] == 0
    assert start(1, 0) == S.HV_STATUS_SUCCESS
    (_, vp, vtl, context), = vtl1.services.named("load_vp_context")[-1:]
    assert (vp, vtl) == (1, 0) and context.registers["efer"] == 0x500  # LMA forced (LME + PG)
    assert vtl1.services.named("start_vp") == [("start_vp", 1, 0)]
    assert start(1, 0) == S.HV_STATUS_INVALID_VP_STATE  # already started


def test_get_vp_index_from_apic_id_is_vtl_aware(vtl1: Env) -> None:
    data = struct.pack("<QB7x", HV_PARTITION_ID_SELF, VTL1) + struct.pack("<I", 1)
    assert vtl1.call(HypercallCode.HvCallGetVpIndexFromApicId, data, rep=1)[0] == S.HV_STATUS_ACCESS_DENIED
    status, reps = vtl1.call(HypercallCode.HvCallGetVpIndexFromApicId, data, vtl=1, rep=1)
    assert (status, reps) == (S.HV_STATUS_SUCCESS, 1) and vtl1.part.ram[OUT_PAGE] == 1


# ---------------------------------------------------------------------------------------------
# VTL call / return and entry
# ---------------------------------------------------------------------------------------------


def test_vtl_call_needs_a_higher_vtl(env: Env) -> None:
    outcome = env.vtl_trap(HypercallCode.HvCallVtlCall, 0)
    assert outcome.exception == X86Exception.UD and outcome.status is None
    assert env.part.vps[0].exceptions == [(0, X86Exception.UD, None)]
    env.enable_partition()  # partition-wide is not enough: the VP needs it
    assert env.vtl_trap(HypercallCode.HvCallVtlCall, 0).exception == X86Exception.UD
    assert not env.services.named("request_transition")


def test_vtl_call_and_return(vtl1: Env) -> None:
    outcome = vtl1.vtl_trap(HypercallCode.HvCallVtlCall, 0)
    assert outcome.exception is None and outcome.status is None and not outcome.retry
    call = VtlTransition(0, 0, 1, SwitchReason.CALL)
    assert outcome.vtl_action == call
    assert vtl1.services.named("request_transition") == [("request_transition", call)]
    assert vtl1.part.vps[0].regs[0]["rax"] == 0  # no result written into shared RAX
    # VTL1 fills the return registers, then returns (non-fast)
    control = HvVpVtlControl(entry_reason=1, vtl_return_rax=0x1111, vtl_return_rcx=0x2222)
    vtl1.part.ram[ASSIST[1] + 8 : ASSIST[1] + 32] = control.pack()
    outcome = vtl1.vtl_trap(HypercallCode.HvCallVtlReturn, 0, vtl=1)
    assert outcome.vtl_action == VtlTransition(0, 1, 0, SwitchReason.RETURN, (0x1111, 0x2222))
    # fast return: registers stay
    outcome = vtl1.vtl_trap(HypercallCode.HvCallVtlReturn, 1, vtl=1)
    assert outcome.vtl_action == VtlTransition(0, 1, 0, SwitchReason.RETURN, None)


def test_vtl_return_32bit_and_without_assist_page(vtl1: Env) -> None:
    vtl1.part.vps[0].modes[1] = CpuMode.PROTECTED
    control = HvVpVtlControl(vtl_return_rax=0x2222_0000_1111, vtl_return_rcx=0x3333)
    vtl1.part.ram[ASSIST[1] + 8 : ASSIST[1] + 32] = control.pack()
    vtl1.part.vps[0].regs[1].update(rdx=0, rcx=int(HypercallCode.HvCallVtlReturn), rax=0)
    # 32-bit: input value in EDX:EAX; the stub put the call code in EAX and the control in ECX
    vtl1.part.vps[0].regs[1].update(rax=int(HypercallCode.HvCallVtlReturn), rcx=0, rdx=0)
    outcome = vtl1.hv.hypercall(0, 1)
    assert outcome.vtl_action.return_rax_rcx == (0x1111, 0x2222)
    vtl1.part.vps[0].modes[1] = CpuMode.LONG
    vtl1.hv.msr_write(0, 1, HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, 0)
    assert vtl1.vtl_trap(HypercallCode.HvCallVtlReturn, 0, vtl=1).vtl_action.return_rax_rcx is None


@pytest.mark.parametrize(
    ("code", "vtl_input", "vtl", "control"),
    [
        (HypercallCode.HvCallVtlCall, 1, 0, None),  # VTL call input is all reserved
        (HypercallCode.HvCallVtlCall, 0, 0, HypercallControl.encode(HypercallCode.HvCallVtlCall, fast=True)),
        (HypercallCode.HvCallVtlCall, 0, 0, HypercallControl.encode(HypercallCode.HvCallVtlCall, rep_count=1)),
        (HypercallCode.HvCallVtlCall, 0, 1, None),  # no VTL2
        (HypercallCode.HvCallVtlReturn, 0, 0, None),  # return from VTL0
        (HypercallCode.HvCallVtlReturn, 2, 1, None),  # reserved return input bits
    ],
)
def test_vtl_call_return_ud(vtl1: Env, code: HypercallCode, vtl_input: int, vtl: int, control: int | None) -> None:
    outcome = vtl1.vtl_trap(code, vtl_input, vtl=vtl, control=control)
    assert outcome.exception == X86Exception.UD and outcome.vtl_action is None
    assert vtl1.part.vps[0].exceptions == [(vtl, X86Exception.UD, None)]
    assert not vtl1.services.named("request_transition")


def test_vtl_call_from_user_mode_is_ud(vtl1: Env) -> None:
    vtl1.part.vps[0].cpls[0] = 3
    assert vtl1.vtl_trap(HypercallCode.HvCallVtlCall, 0).exception == X86Exception.UD
    vtl1.part.vps[0].cpls[0] = 0
    vtl1.part.vps[0].modes[0] = CpuMode.REAL
    assert vtl1.vtl_trap(HypercallCode.HvCallVtlCall, 0).exception == X86Exception.UD
    assert not vtl1.services.named("request_transition")


def test_entry_reason_and_saved_registers(vtl1: Env) -> None:
    vp = vtl1.part.vps[0]
    vp.regs[1].update(rax=0xAAAA, rcx=0xCCCC)
    vtl1.part.ram[ASSIST[1] + 0x0C] = 1  # VinaAsserted set, no AutoReset: kept
    vtl1.vsm.on_vtl_entry(0, 1, EntryReason.VTL_CALL, 0)
    control = HvVpVtlControl.unpack(bytes(vtl1.part.ram[ASSIST[1] + 8 : ASSIST[1] + 32]))
    assert (control.entry_reason, control.vina_status) == (1, 1)
    assert (control.vtl_return_rax, control.vtl_return_rcx) == (0xAAAA, 0xCCCC)
    # AutoReset VINA clears the asserted state on entry
    assert vtl1.set([(R.HvRegisterVsmVina, q(0x30 | VsmVina.ENABLED | VsmVina.AUTO_RESET))])[0] == 0
    vtl1.vsm.on_vtl_entry(0, 1, EntryReason.INTERRUPT, 0)
    control = HvVpVtlControl.unpack(bytes(vtl1.part.ram[ASSIST[1] + 8 : ASSIST[1] + 32]))
    assert (control.entry_reason, control.vina_status) == (2, 0)
    # no assist page: nothing written, no error
    vtl1.vsm.on_vtl_entry(1, 1, EntryReason.INTERRUPT, 0)


def test_vina_notification_and_reset_on_return(vtl1: Env) -> None:
    assert not vtl1.vsm.notify_lower_vtl_interrupt(0, 1)  # not enabled
    assert vtl1.set([(R.HvRegisterVsmVina, q(0x30 | VsmVina.ENABLED | VsmVina.AUTO_RESET))])[0] == 0
    assert vtl1.vsm.notify_lower_vtl_interrupt(0, 1)
    assert vtl1.part.interrupts == [(0, 1, 0x30)]
    assert not vtl1.vsm.notify_lower_vtl_interrupt(0, 1)  # asserted: no flood
    vtl1.vtl_trap(HypercallCode.HvCallVtlReturn, 1, vtl=1)
    assert vtl1.part.ram[ASSIST[1] + 0x0C] == 0
    assert vtl1.set([(R.HvRegisterVsmVina, q(0x05 | VsmVina.ENABLED))])[0] == S.HV_STATUS_INVALID_REGISTER_VALUE


# ---------------------------------------------------------------------------------------------
# Get / SetVpRegisters
# ---------------------------------------------------------------------------------------------

ARCH_VALUES = {
    R.HvX64RegisterRax: 1, R.HvX64RegisterRcx: 2, R.HvX64RegisterRdx: 3, R.HvX64RegisterRbx: 4,
    R.HvX64RegisterRsp: 5, R.HvX64RegisterRbp: 6, R.HvX64RegisterRsi: 7, R.HvX64RegisterRdi: 8,
    R.HvX64RegisterR8: 9, R.HvX64RegisterR9: 10, R.HvX64RegisterR10: 11, R.HvX64RegisterR11: 12,
    R.HvX64RegisterR12: 13, R.HvX64RegisterR13: 14, R.HvX64RegisterR14: 15, R.HvX64RegisterR15: 16,
    R.HvX64RegisterRip: 0xFFFF_8000_0000_1000, R.HvX64RegisterRflags: 0x202,
    R.HvX64RegisterCr0: 0x80050033, R.HvX64RegisterCr2: 0x1234, R.HvX64RegisterCr3: 0x5000, R.HvX64RegisterCr4: 0x6F0,
    R.HvX64RegisterCr8: 2, R.HvX64RegisterDr0: 0x10, R.HvX64RegisterDr1: 0x20, R.HvX64RegisterDr2: 0x30,
    R.HvX64RegisterDr3: 0x40, R.HvX64RegisterDr6: 0xFFFF0FF0, R.HvX64RegisterDr7: 0x400,
    R.HvX64RegisterEfer: 0xD01, R.HvX64RegisterKernelGsBase: 0x77, R.HvX64RegisterApicBase: 0xFEE00900,
    R.HvX64RegisterPat: 0x0007040600070406, R.HvX64RegisterSysenterCs: 0x10, R.HvX64RegisterSysenterEip: 0x11,
    R.HvX64RegisterSysenterEsp: 0x12, R.HvX64RegisterStar: 0x13, R.HvX64RegisterLstar: 0x14,
    R.HvX64RegisterCstar: 0x15, R.HvX64RegisterSfmask: 0x16, R.HvX64RegisterTscAux: 0x17,
}  # fmt: skip


def test_architectural_registers_round_trip(vtl1: Env) -> None:
    names = list(ARCH_VALUES)
    for i in range(0, len(names), 8):  # rep calls of 8 elements
        chunk = names[i : i + 8]
        assert vtl1.set([(n, q(ARCH_VALUES[n])) for n in chunk], target=VTL0) == (S.HV_STATUS_SUCCESS, len(chunk))
    regs = vtl1.part.vps[0].regs[0]
    assert regs["lstar"] == 0x14 and regs["cr3"] == 0x5000 and regs["apic_base"] == 0xFEE00900
    assert "lstar" not in vtl1.part.vps[0].regs[1]  # VTL1's own file untouched
    status, reps, values = vtl1.get(names, target=VTL0)
    assert (status, reps) == (S.HV_STATUS_SUCCESS, len(names))
    assert [low(v) for v in values] == [ARCH_VALUES[n] for n in names]
    assert all(v[8:] == bytes(8) for v in values)


def test_segment_and_table_registers(vtl1: Env) -> None:
    seg = HvX64SegmentRegister(0xFFFF_8000_0000_0000, 0xFFFFF, 0x2B, 0xA0F3).pack()
    table = HvX64TableRegister(0x0FFF, 0xFFFF_F000_0000_1000).pack()
    assert vtl1.set([(R.HvX64RegisterGs, seg), (R.HvX64RegisterIdtr, table)], target=VTL0)[0] == 0
    assert vtl1.part.vps[0].regs[0]["gs"] == Segment(0xFFFF_8000_0000_0000, 0xFFFFF, 0x2B, 0xA0F3)
    assert vtl1.part.vps[0].regs[0]["idtr"] == Table(0xFFFF_F000_0000_1000, 0x0FFF)
    names = [R.HvX64RegisterGs, R.HvX64RegisterIdtr, R.HvX64RegisterEs, R.HvX64RegisterCs, R.HvX64RegisterSs,
             R.HvX64RegisterDs, R.HvX64RegisterFs, R.HvX64RegisterLdtr, R.HvX64RegisterTr, R.HvX64RegisterGdtr]  # fmt: skip
    status, _, values = vtl1.get(names, target=VTL0)
    assert status == 0 and values[0] == seg and values[1] == table


def test_synthetic_registers(vtl1: Env) -> None:
    pairs = [
        (R.HvRegisterVpAssistPage, q(ASSIST[0] | 1)),
        (R.HvRegisterSint0, q(0x50)),
        (R.HvRegisterScontrol, q(1)),
        (R.HvRegisterSipp, q(0x30000 | 1)),
        (R.HvRegisterSifp, q(0x31000 | 1)),
    ]
    assert vtl1.set(pairs, target=VTL0) == (S.HV_STATUS_SUCCESS, len(pairs))
    assert vtl1.hv.vp_assist_page_gpa(0, 0) == ASSIST[0]
    assert vtl1.hv.synic(0, 0).sint_vector(0) == 0x50
    names = [n for n, _ in pairs] + [R.HvRegisterGuestOsId, R.HvX64RegisterHypercall, R.HvRegisterVpIndex]
    status, _, values = vtl1.get(names, target=VTL0)
    assert status == 0
    assert [low(v) for v in values] == [ASSIST[0] | 1, 0x50, 1, 0x30001, 0x31001, OS_ID, HC_PAGE[0] | 1, 0]
    # private per VTL: VTL1's own assist page is different
    assert low(vtl1.get([R.HvRegisterVpAssistPage])[2][0]) == ASSIST[1] | 1
    assert vtl1.set([(R.HvRegisterVpIndex, q(3))])[0] == S.HV_STATUS_INVALID_PARAMETER  # read-only
    assert vtl1.set([(R.HvRegisterSint0, q(0x5))])[0] == S.HV_STATUS_INVALID_REGISTER_VALUE  # #GP as an MSR
    assert vtl1.get([R.HvRegisterEom])[0] == S.HV_STATUS_INVALID_PARAMETER  # write-only


def test_vsm_status_registers(vtl1: Env) -> None:
    names = [R.HvRegisterVsmCodePageOffsets, R.HvRegisterVsmVpStatus, R.HvRegisterVsmPartitionStatus,
             R.HvRegisterVsmCapabilities, R.HvRegisterVsmPartitionConfig]  # fmt: skip
    status, _, values = vtl1.get(names)
    assert status == 0
    offsets, vp_status, partition_status, caps, config = (low(v) for v in values)
    assert offsets == HypercallPage.vsm_code_page_offsets(bit64=True)
    assert vp_status == 0 | (0b11 << 16)  # active VTL0 (the fake's), VTL0+1 enabled
    assert partition_status == 0b11 | (1 << 16)  # enabled {0,1}, maximum VTL 1
    assert caps == VsmCapabilities.DENY_LOWER_VTL_STARTUP and config == 0
    vtl1.part.vps[0].vtl = 1
    assert low(vtl1.get([R.HvRegisterVsmVpStatus], vp=0, caller_vp=1, caller_vtl=0)[2][0]) == 1 | (0b11 << 16)
    # VTL0 reads its own status, but has no partition-config instance
    assert vtl1.get([R.HvRegisterVsmVpStatus], caller_vtl=0)[0] == 0
    assert vtl1.get([R.HvRegisterVsmPartitionConfig], caller_vtl=0)[0] == S.HV_STATUS_INVALID_PARAMETER
    for name in names[:4]:
        assert vtl1.set([(name, q(0))])[0] == S.HV_STATUS_INVALID_PARAMETER  # read-only


def test_secure_config_and_cr_intercepts(vtl1: Env) -> None:
    name = R.HvRegisterVsmVpSecureConfigVtl0
    assert vtl1.set([(name, q(VsmVpSecureConfig.TLB_LOCKED))])[0] == 0
    assert low(vtl1.get([name])[2][0]) == VsmVpSecureConfig.TLB_LOCKED
    assert vtl1.set([(name, q(VsmVpSecureConfig.MBEC_ENABLED))])[0] == S.HV_STATUS_INVALID_REGISTER_VALUE
    assert vtl1.get([R.HvRegisterVsmVpSecureConfigVtl1])[0] == S.HV_STATUS_INVALID_PARAMETER  # not lower than VTL1
    assert vtl1.set([(R.HvX64RegisterCrInterceptControl, q(0x3))])[0] == 0
    assert low(vtl1.get([R.HvX64RegisterCrInterceptControl])[2][0]) == 0x3


def test_register_statuses(vtl1: Env) -> None:
    assert vtl1.get([R.HvX64RegisterRax], target=VTL1, caller_vtl=0)[0] == S.HV_STATUS_ACCESS_DENIED
    assert vtl1.get([R.HvX64RegisterRax], vp=9)[0] == S.HV_STATUS_INVALID_VP_INDEX
    assert vtl1.get([R.HvX64RegisterRax], partition=5)[0] == S.HV_STATUS_INVALID_PARTITION_ID
    assert vtl1.get([R.HvX64RegisterRax], target=0xE0)[0] == S.HV_STATUS_INVALID_PARAMETER  # reserved input-VTL bits
    # a failing element stops the rep call; reps completed = its index
    status, reps, _ = vtl1.get([R.HvX64RegisterRax, 0x12345678, R.HvX64RegisterRbx])
    assert (status, reps) == (S.HV_STATUS_INVALID_PARAMETER, 1)
    assert vtl1.get([R.HvX64RegisterXmm0])[0] == S.HV_STATUS_INVALID_PARAMETER  # defined, not served
    status, reps = vtl1.set([(R.HvX64RegisterRbx, q(1)), (R.HvX64RegisterXmm0, q(0))], target=VTL0)
    assert (status, reps) == (S.HV_STATUS_INVALID_PARAMETER, 1)
    # VTL1 of VP1 is not enabled
    assert vtl1.get([R.HvX64RegisterRip], vp=1)[0] == S.HV_STATUS_INVALID_VTL_STATE


def test_fast_register_calls(vtl1: Env) -> None:
    vp = vtl1.part.vps[0]
    vp.regs[0].update(rbx=0xB, rsi=0x51, rdi=0xD1, rbp=0xBB)
    names = [R.HvX64RegisterRbx, R.HvX64RegisterRsi, R.HvX64RegisterRdi, R.HvX64RegisterRbp]
    header = HvInputGetSetVpRegisters(HV_PARTITION_ID_SELF, HV_VP_INDEX_SELF, VTL0).pack()
    data = header + b"".join(struct.pack("<I", n) for n in names)
    assert vtl1.fast(HypercallCode.HvCallGetVpRegisters, data, vtl=1, rep=4) == (S.HV_STATUS_SUCCESS, 4)
    # names fill XMM0 (pair 1); outputs start at pair 2 = XMM1
    assert [vp.xmm[1][i] for i in range(1, 5)] == [0xB, 0x51, 0xD1, 0xBB]
    data = header + b"".join(struct.pack("<I", n) for n in [*names, R.HvX64RegisterRax])
    assert vtl1.fast(HypercallCode.HvCallGetVpRegisters, data, vtl=1, rep=5)[0] == S.HV_STATUS_INVALID_HYPERCALL_INPUT
    # SetVpRegisters fast: 32-byte elements; 3 fit, 4 do not
    pairs = [HvRegisterAssoc(R.HvX64RegisterR12, q(0x12)).pack(), HvRegisterAssoc(R.HvX64RegisterR13, q(0x13)).pack(),
             HvRegisterAssoc(R.HvX64RegisterR14, q(0x14)).pack()]  # fmt: skip
    assert vtl1.fast(HypercallCode.HvCallSetVpRegisters, header + b"".join(pairs), vtl=1, rep=3) == (0, 3)
    assert (vp.regs[0]["r12"], vp.regs[0]["r13"], vp.regs[0]["r14"]) == (0x12, 0x13, 0x14)
    status, _ = vtl1.fast(HypercallCode.HvCallSetVpRegisters, header + b"".join(pairs * 2)[:128], vtl=1, rep=4)
    assert status == S.HV_STATUS_INVALID_HYPERCALL_INPUT


def test_pending_event0(vtl1: Env) -> None:
    gp = 1 | (13 << 16) | (1 << 8) | (0x18 << 32)
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(gp))], target=VTL0)[0] == 0
    assert vtl1.part.vps[0].exceptions == [(0, 13, 0x18)]
    pf = 1 | (14 << 16) | (1 << 8) | (2 << 32)
    assert vtl1.set([(R.HvRegisterPendingEvent0, struct.pack("<QQ", pf, 0xDEAD000))], target=VTL0)[0] == 0
    assert vtl1.part.vps[0].exceptions[-1] == (0, 14, 2) and vtl1.part.vps[0].regs[0]["cr2"] == 0xDEAD000
    ud = 1 | (6 << 16)
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(ud))], target=VTL0)[0] == 0
    assert vtl1.part.vps[0].exceptions[-1] == (0, 6, None)
    count = len(vtl1.part.vps[0].exceptions)
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(1 | (1 << 1)))], target=VTL0)[0] == S.HV_STATUS_INVALID_PARAMETER
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(1 | (32 << 16)))], target=VTL0)[0] == S.HV_STATUS_INVALID_REGISTER_VALUE
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(0))], target=VTL0)[0] == 0  # not pending: nothing
    assert len(vtl1.part.vps[0].exceptions) == count
    assert vtl1.set([(R.HvRegisterPendingEvent0, q(gp))], target=VTL1, caller_vtl=0)[0] == S.HV_STATUS_ACCESS_DENIED


# ---------------------------------------------------------------------------------------------
# Protections
# ---------------------------------------------------------------------------------------------


def test_protection_needs_enable_first(vtl1: Env) -> None:
    assert vtl1.protect([5], 0x1) == (S.HV_STATUS_ACCESS_DENIED, 0)
    assert not vtl1.services.named("set_protections")


def test_default_mask_on_enable_and_write_once(vtl1: Env) -> None:
    assert vtl1.enable_protections(mask=0x3) == S.HV_STATUS_SUCCESS  # R+W, no execute
    assert vtl1.services.named("set_protections") == [
        ("set_protections", 0, [PageProtection(0, RAM_PAGES, Access.READ | Access.WRITE)])
    ]
    assert vtl1.vsm.lower_vtl_allowed(0, 7) == Access.READ | Access.WRITE
    assert vtl1.vsm.lower_vtl_allowed(1, 7) == ALL  # VTL1's own view is never restricted
    assert vtl1.events(EventKind.PROTECTION) == [
        {"target_vtl": 0, "gpa_start": 0, "pages": RAM_PAGES, "old_mask": 0xF, "new_mask": 0x3}
    ]
    # write-once: clearing EnableVtlProtection or changing the mask is ignored; other bits change
    assert vtl1.set([(R.HvRegisterVsmPartitionConfig, q(VsmPartitionConfig.DENY_LOWER_VTL_STARTUP))])[0] == 0
    config = low(vtl1.get([R.HvRegisterVsmPartitionConfig])[2][0])
    assert config == VsmPartitionConfig.ENABLE_VTL_PROTECTION | (0x3 << 1) | VsmPartitionConfig.DENY_LOWER_VTL_STARTUP
    assert len(vtl1.services.named("set_protections")) == 1


def test_partition_config_bad_values(vtl1: Env) -> None:
    assert vtl1.set([(R.HvRegisterVsmPartitionConfig, q(1 << 20))])[0] == S.HV_STATUS_INVALID_REGISTER_VALUE
    assert vtl1.enable_protections(mask=0x2) == S.HV_STATUS_INVALID_REGISTER_VALUE  # write without read
    assert not vtl1.services.named("set_protections")
    assert vtl1.enable_protections(mask=0xF) == S.HV_STATUS_SUCCESS


def test_modify_protection_mask_runs(vtl1: Env) -> None:
    vtl1.enable_protections()
    vtl1.services.calls.clear()
    vtl1.sink.events.clear()
    assert vtl1.protect([10, 5, 6, 7], 0x1) == (S.HV_STATUS_SUCCESS, 4)
    assert vtl1.services.named("set_protections") == [
        ("set_protections", 0, [PageProtection(5, 3, Access.READ), PageProtection(10, 1, Access.READ)])
    ]
    assert [e["gpa_start"] for e in vtl1.events(EventKind.PROTECTION)] == [0x5000, 0xA000]
    assert vtl1.events(EventKind.PROTECTION)[0] == {"target_vtl": 0, "gpa_start": 0x5000, "pages": 3,
                                                     "old_mask": 0xF, "new_mask": 0x1}  # fmt: skip
    vtl1.sink.events.clear()
    assert vtl1.protect([6, 7, 8], 0x0) == (S.HV_STATUS_SUCCESS, 3)  # mixed old masks → null
    assert vtl1.events(EventKind.PROTECTION)[0]["old_mask"] is None
    assert vtl1.vsm.protection_mask(0, 5) == 0x1 and vtl1.vsm.protection_mask(0, 8) == 0
    assert vtl1.vsm.lower_vtl_allowed(0, 8) == Access(0)
    # UMX is accepted (ignored without MBEC); explicit target VTL0 (seed form) and VTL1 (owner form)
    assert vtl1.protect([20], 0xF, target=VTL0) == (S.HV_STATUS_SUCCESS, 1)
    assert vtl1.protect([21], 0x5, target=VTL1) == (S.HV_STATUS_SUCCESS, 1)
    assert vtl1.vsm.lower_vtl_allowed(0, 21) == Access.READ | Access.EXECUTE


def test_modify_protection_mask_negative(vtl1: Env) -> None:
    vtl1.enable_protections()
    vtl1.services.calls.clear()
    assert vtl1.protect([1], 0x2) == (S.HV_STATUS_INVALID_PARAMETER, 0)  # write without read
    assert vtl1.protect([1], 0x4) == (S.HV_STATUS_INVALID_PARAMETER, 0)  # execute without read
    assert vtl1.protect([1], 0x10001) == (S.HV_STATUS_INVALID_PARAMETER, 0)
    assert vtl1.protect([1], 0x1, target=0x20) == (S.HV_STATUS_INVALID_PARAMETER, 0)
    assert vtl1.protect([1], 0x1, caller_vtl=0) == (S.HV_STATUS_ACCESS_DENIED, 0)  # VTL0 has no lower VTL
    assert vtl1.protect([1], 0x1, target=HvInputVtl(2, True).encode()) == (S.HV_STATUS_ACCESS_DENIED, 0)
    assert not vtl1.services.named("set_protections")
    # non-RAM page: the pages before it are applied, reps completed = its index
    assert vtl1.protect([3, 4, RAM_PAGES + 10, 6], 0x1) == (S.HV_STATUS_INVALID_PARAMETER, 2)
    assert vtl1.services.named("set_protections") == [("set_protections", 0, [PageProtection(3, 2, Access.READ)])]
    assert vtl1.vsm.protection_mask(0, 6) == 0xF


def test_modify_protection_mask_fast_and_rep_start(vtl1: Env) -> None:
    vtl1.enable_protections()
    vtl1.services.calls.clear()
    data = HvInputModifyVtlProtectionMask(HV_PARTITION_ID_SELF, 0x3, SELF_VTL).pack() + struct.pack("<3Q", 40, 41, 42)
    assert vtl1.fast(HypercallCode.HvCallModifyVtlProtectionMask, data, vtl=1, rep=3) == (S.HV_STATUS_SUCCESS, 3)
    assert vtl1.services.named("set_protections")[-1] == ("set_protections", 0, [PageProtection(40, 3, Access.READ | Access.WRITE)])
    # continuation: rep start 2 only applies the last element
    assert vtl1.protect([50, 51, 52], 0x1, rep_start=2) == (S.HV_STATUS_SUCCESS, 3)
    assert vtl1.services.named("set_protections")[-1] == ("set_protections", 0, [PageProtection(52, 1, Access.READ)])


def test_confused_deputy(vtl1: Env) -> None:
    vtl1.enable_protections()
    vtl1.protect([OUT_PAGE >> 12], 0x1)  # VTL0 may only read the output page
    vtl1.part.ram[OUT_PAGE : OUT_PAGE + 16] = b"\xAA" * 16
    status, reps, _ = vtl1.get([R.HvX64RegisterRax], caller_vtl=0)
    assert status == S.HV_STATUS_ACCESS_DENIED and reps == 0
    assert vtl1.part.ram[OUT_PAGE : OUT_PAGE + 16] == b"\xAA" * 16
    # and the input page: a VTL1-private page cannot be used as VTL0 input
    vtl1.protect([IN_PAGE >> 12], 0x0)
    assert vtl1.get([R.HvX64RegisterRax], caller_vtl=0)[0] == S.HV_STATUS_ACCESS_DENIED
    # VTL1 itself is not restricted
    assert vtl1.get([R.HvX64RegisterRax], caller_vtl=1)[0] == S.HV_STATUS_SUCCESS


def test_helpers() -> None:
    assert coalesce([9, 3, 4, 4, 5, 11]) == [(3, 3), (9, 1), (11, 1)]
    assert [m for m in range(16) if valid_mask(m)] == [0, 1, 3, 5, 7, 9, 11, 13, 15]


def test_ram_probe_fallback() -> None:
    services = FakeServices()
    part = FakePartition(services, 1)
    hv = HyperV(part, HypervPolicy().with_vsm(), timers=ManualTimerService(), apic=FakeApic(), tlb=services)
    vsm = Vsm(hv, part, services, sink=ListSink())
    assert vsm.ram_ranges == [(0, RAM_PAGES)]


# ---------------------------------------------------------------------------------------------
# Translation
# ---------------------------------------------------------------------------------------------

PML4 = 0x100000
PDPT = 0x101000
PD = 0x102000
PT = 0x103000
P, RW, US, PS, A, D = 1, 2, 4, 0x80, 0x20, 0x40
XD = 1 << 63


def put(env: Env, addr: int, value: int, size: int = 8) -> None:
    env.part.ram[addr : addr + size] = value.to_bytes(size, "little")


def entry(env: Env, addr: int) -> int:
    return int.from_bytes(env.part.ram[addr : addr + 8], "little")


def long_mode_tables(env: Env, vtl: int = 0) -> None:
    """GVA 0x400000 → 0x200000 (4 KiB, RW user), 0x401000 → read-only, 0x402000 → NX supervisor,
    0x600000 → 2 MiB page at 0x200000, 0x40000000 → 1 GiB page at 0, 0x403000 not present."""
    put(env, PML4, PDPT | P | RW | US)
    put(env, PDPT, PD | P | RW | US)
    put(env, PDPT + 8, 0 | P | RW | US | PS)  # 1 GiB at GVA 0x40000000
    put(env, PD + 2 * 8, PT | P | RW | US)  # GVA 0x400000
    put(env, PD + 3 * 8, 0x200000 | P | RW | PS)  # GVA 0x600000, 2 MiB, supervisor
    put(env, PT + 0 * 8, 0x200000 | P | RW | US)
    put(env, PT + 1 * 8, 0x201000 | P | US)
    put(env, PT + 2 * 8, 0x202000 | P | RW | XD)
    put(env, PT + 4 * 8, 0x7000000 | P | RW | US)  # beyond RAM
    put(env, PT + 5 * 8, (HC_PAGE[0]) | P | RW | US)
    env.part.vps[0].regs[vtl].update(cr0=0x80010011, cr3=PML4, cr4=0x20, efer=0xD00)


def translate(env: Env, gva: int, flags: int = 0, *, vp: int = 0, caller_vtl: int = 1, target: int = VTL0,
              fast: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """Returns (status, TranslationResult, GpaPage)."""
    control = flags | (target << 56)
    data = HvInputTranslateVirtualAddress(HV_PARTITION_ID_SELF, vp, 0, control, gva >> 12).pack()
    if fast:
        status, _ = env.fast(HypercallCode.HvCallTranslateVirtualAddress, data, vtl=caller_vtl)
        out = env.part.vps[0].xmm[caller_vtl][1]
        return status, out & ((1 << 64) - 1), out >> 64
    status, _ = env.call(HypercallCode.HvCallTranslateVirtualAddress, data, vtl=caller_vtl)
    result, page = struct.unpack_from("<QQ", env.part.ram, OUT_PAGE)
    return status, result, page


Xr = HvTranslateGvaResultCode
Fl = HvTranslateGvaControlFlags


def test_translate_long_mode(vtl1: Env) -> None:
    long_mode_tables(vtl1)
    assert translate(vtl1, 0x400000) == (0, (6 << 32) | Xr.SUCCESS, 0x200)
    assert translate(vtl1, 0x403000)[1] & 0xFFFFFFFF == Xr.PAGE_NOT_PRESENT
    assert translate(vtl1, 0x600000 + 0x5000)[1:] == ((6 << 32), 0x205)  # 2 MiB page
    assert translate(vtl1, 0x40000000 + 0x123000)[1:] == ((6 << 32), 0x123)  # 1 GiB page
    assert translate(vtl1, 0x404000)[1] & 0xFFFFFFFF == Xr.GPA_UNMAPPED
    assert translate(vtl1, 0x0000_8000_0000_0000)[1] & 0xFFFFFFFF == Xr.PAGE_NOT_PRESENT  # non-canonical
    # fast form with XMM output
    assert translate(vtl1, 0x400000, fast=True) == (0, (6 << 32), 0x200)


def test_translate_validation(vtl1: Env) -> None:
    long_mode_tables(vtl1)
    code = lambda gva, flags: translate(vtl1, gva, flags)[1] & 0xFFFFFFFF  # noqa: E731
    sup, user = Fl.SUPERVISOR_ACCESS, Fl.USER_ACCESS
    assert code(0x401000, Fl.VALIDATE_WRITE | sup) == Xr.PRIVILEGE_VIOLATION  # CR0.WP
    assert code(0x401000, Fl.VALIDATE_WRITE | user) == Xr.PRIVILEGE_VIOLATION
    assert code(0x401000, Fl.VALIDATE_READ | user) == Xr.SUCCESS
    assert code(0x402000, Fl.VALIDATE_READ | user) == Xr.PRIVILEGE_VIOLATION  # supervisor page
    assert code(0x402000, Fl.VALIDATE_READ | user | Fl.PRIVILEGE_EXEMPT) == Xr.SUCCESS
    assert code(0x402000, Fl.VALIDATE_EXECUTE | sup) == Xr.PRIVILEGE_VIOLATION  # NX
    assert code(0x400000, Fl.VALIDATE_EXECUTE | sup) == Xr.SUCCESS
    vtl1.part.vps[0].regs[0]["cr4"] = 0x20 | (1 << 20) | (1 << 21)  # SMEP + SMAP
    assert code(0x400000, Fl.VALIDATE_EXECUTE | sup) == Xr.PRIVILEGE_VIOLATION
    assert code(0x400000, Fl.VALIDATE_READ | sup) == Xr.PRIVILEGE_VIOLATION  # SMAP, AC clear
    assert code(0x400000, Fl.VALIDATE_READ | sup | Fl.OVERRIDE_SMAP) == Xr.SUCCESS
    vtl1.part.vps[0].regs[0]["rflags"] = 1 << 18
    assert code(0x400000, Fl.VALIDATE_READ | sup) == Xr.SUCCESS
    assert code(0x400000, Fl.VALIDATE_READ | sup | Fl.ENFORCE_SMAP) == Xr.PRIVILEGE_VIOLATION
    # CPL decides when neither mode flag is given
    vtl1.part.vps[0].cpls[0] = 3
    assert code(0x402000, Fl.VALIDATE_READ) == Xr.PRIVILEGE_VIOLATION
    # bad flags
    assert translate(vtl1, 0x400000, sup | user)[0] == S.HV_STATUS_INVALID_PARAMETER
    assert translate(vtl1, 0x400000, Fl.SHADOW_STACK)[0] == S.HV_STATUS_INVALID_PARAMETER
    assert translate(vtl1, 0x400000, 1 << 30)[0] == S.HV_STATUS_INVALID_PARAMETER


def test_translate_protections_overlays_and_bits(vtl1: Env) -> None:
    long_mode_tables(vtl1)
    vtl1.enable_protections()
    vtl1.protect([0x200], 0x1)  # read-only, no execute for VTL0
    code = lambda gva, flags: translate(vtl1, gva, flags)[1] & 0xFFFFFFFF  # noqa: E731
    assert code(0x400000, Fl.VALIDATE_READ) == Xr.SUCCESS
    assert code(0x400000, Fl.VALIDATE_WRITE) == Xr.GPA_NO_WRITE_ACCESS
    assert code(0x400000, Fl.VALIDATE_EXECUTE) == Xr.INTERCEPT
    vtl1.protect([0x200], 0x0)
    assert code(0x400000, Fl.VALIDATE_READ) == Xr.GPA_NO_READ_ACCESS
    status, result, page = translate(vtl1, 0x405000)
    assert result == (6 << 32) | (1 << 40) and page == HC_PAGE[0] >> 12  # hypercall overlay
    # validating a write to the hypercall overlay: Success with OverlayPage (seed; docs/vsm.md)
    assert translate(vtl1, 0x405000, Fl.VALIDATE_WRITE)[1:] == ((6 << 32) | (1 << 40), HC_PAGE[0] >> 12)
    # accessed / dirty bits
    assert code(0x401000, Fl.VALIDATE_READ | Fl.SET_PAGE_TABLE_BITS) == Xr.SUCCESS
    assert entry(vtl1, PML4) & A and entry(vtl1, PT + 8) & A and not entry(vtl1, PT + 8) & D
    put(vtl1, PT, 0x200000 | P | RW | US)
    vtl1.protect([0x200], 0x3)
    assert code(0x400000, Fl.VALIDATE_WRITE | Fl.SET_PAGE_TABLE_BITS) == Xr.SUCCESS
    assert entry(vtl1, PT) & (A | D) == A | D


def test_translate_walks_page_tables_through_the_target_view(vtl1: Env) -> None:
    """Page tables in pages VTL1 protected from VTL0: the walk must neither read nor update them."""
    long_mode_tables(vtl1)
    put(vtl1, PT + 6 * 8, 0x7E25BC7E20000 | P | RW)  # a "secret" qword that looks like a PTE
    vtl1.enable_protections()
    vtl1.protect([PT >> 12], 0x0)  # VTL0 may not read its own PT page any more
    for caller in (0, 1):  # VTL0 for itself, VTL1 in VTL0's context
        status, result, page = translate(vtl1, 0x406000, caller_vtl=caller)
        assert status == S.HV_STATUS_SUCCESS
        assert result & 0xFFFFFFFF == Xr.GPA_NO_READ_ACCESS and page == 0, (caller, hex(result), hex(page))
    # A 1 GiB page does not touch the PT page: unaffected
    assert translate(vtl1, 0x40000000 + 0x123000, caller_vtl=0)[1:] == ((6 << 32), 0x123)
    # Read-only page tables: the walk works, accessed/dirty bits are not written
    vtl1.protect([PT >> 12], 0x1)
    put(vtl1, PT, 0x200000 | P | RW | US)
    assert translate(vtl1, 0x400000, Fl.VALIDATE_READ, caller_vtl=0)[1] & 0xFFFFFFFF == Xr.SUCCESS
    before = entry(vtl1, PT)
    result = translate(vtl1, 0x400000, Fl.VALIDATE_WRITE | Fl.SET_PAGE_TABLE_BITS, caller_vtl=0)[1]
    assert result & 0xFFFFFFFF == Xr.GPA_NO_WRITE_ACCESS
    assert entry(vtl1, PT) == before


def test_translate_other_modes_and_statuses(vtl1: Env) -> None:
    regs = vtl1.part.vps[0].regs[0]
    regs.update(cr0=0x11, cr4=0, efer=0)
    assert translate(vtl1, 0x123000)[1:] == (6 << 32, 0x123)  # paging off: identity
    # 32-bit paging: 4 KiB and 4 MiB pages
    put(vtl1, PD, PT | P | RW, 4)
    put(vtl1, PT + 3 * 4, 0x300000 | P | RW, 4)
    put(vtl1, PD + 1 * 4, 0x000000 | P | RW | PS, 4)
    regs.update(cr0=0x80000011, cr3=PD, cr4=0x10)
    assert translate(vtl1, 0x3000)[1:] == (6 << 32, 0x300)
    assert translate(vtl1, 0x400000 + 0x7000)[1:] == (6 << 32, 0x7)
    # PAE
    pdpt = 0x104000
    put(vtl1, pdpt, PD | P)
    put(vtl1, PD, PT | P | RW)
    put(vtl1, PT + 3 * 8, 0x300000 | P | RW | XD)
    regs.update(cr3=pdpt, cr4=0x20, efer=0x800)
    assert translate(vtl1, 0x3000)[1:] == (6 << 32, 0x300)
    assert translate(vtl1, 0x3000, Fl.VALIDATE_EXECUTE)[1] & 0xFFFFFFFF == Xr.PRIVILEGE_VIOLATION
    regs["efer"] = 0  # XD set without NXE: reserved
    assert translate(vtl1, 0x3000)[1] & 0xFFFFFFFF == Xr.INVALID_PAGE_TABLE_FLAGS
    # statuses
    assert translate(vtl1, 0, vp=HV_ANY_VP)[0] == S.HV_STATUS_INVALID_VP_INDEX
    assert translate(vtl1, 0, vp=7)[0] == S.HV_STATUS_INVALID_VP_INDEX
    assert translate(vtl1, 0, caller_vtl=0, target=VTL1)[0] == S.HV_STATUS_ACCESS_DENIED


def test_translate_tlb_flush_inhibit(vtl1: Env) -> None:
    long_mode_tables(vtl1)
    translate(vtl1, 0x400000, Fl.TLB_FLUSH_INHIBIT)
    assert vtl1.vsm.state.tlb_locked(0, 0, 0)
    vtl1.vtl_trap(HypercallCode.HvCallVtlReturn, 1, vtl=1)
    assert not vtl1.vsm.state.tlb_locked(0, 0, 0)


# ---------------------------------------------------------------------------------------------
# TLB lock
# ---------------------------------------------------------------------------------------------


def flush_vp1(env: Env) -> tuple:
    data = HvInputFlushVirtualAddressSpace(0, 0, 1 << 1).pack()
    env.part.ram[IN_PAGE : IN_PAGE + len(data)] = data
    regs = env.part.vps[0].regs[0]
    regs.update(rcx=HypercallControl.encode(HypercallCode.HvCallFlushVirtualAddressSpace), rdx=IN_PAGE, r8=0,
                rax=0xDEAD)  # fmt: skip
    return env.hv.hypercall(0, 0), regs["rax"]


def test_tlb_lock_blocks_lower_vtl_flush_until_return(vtl1: Env) -> None:
    assert vtl1.enable_vp(vp=1, caller_vtl=1) == 0
    vtl1.hv.msr_write(1, 1, HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, 0x14000 | 1)
    released: list[list[int]] = []
    vtl1.vsm.on_tlb_unlock = released.append
    assert vtl1.set([(R.HvRegisterVsmVpSecureConfigVtl0, q(VsmVpSecureConfig.TLB_LOCKED))], caller_vp=1)[0] == 0
    outcome, rax = flush_vp1(vtl1)
    assert outcome.retry and rax == 0xDEAD and not vtl1.services.named("flush_vps")
    assert vtl1.vsm.tlb_wait_pending(0)
    # a flush that does not touch VP1 goes through
    data = HvInputFlushVirtualAddressSpace(0, 0, 1 << 0).pack()
    assert vtl1.call(HypercallCode.HvCallFlushVirtualAddressSpace, data)[0] == 0
    # VTL1 on VP1 returns: lock released, the waiter is told
    vtl1.part.vps[1].regs[1].update(rcx=int(HypercallCode.HvCallVtlReturn), rax=1)
    vtl1.hv.msr_write(1, 1, HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE[1] | 1)
    vtl1.hv.hypercall(1, 1)
    assert released == [[0]] and not vtl1.vsm.tlb_wait_pending(0)
    outcome, rax = flush_vp1(vtl1)
    assert not outcome.retry and rax == 0 and vtl1.services.named("flush_vps")[-1] == ("flush_vps", (1,), 0)


def test_tlb_lock_cleared_by_register(vtl1: Env) -> None:
    released: list[list[int]] = []
    vtl1.vsm.on_tlb_unlock = released.append
    vtl1.set([(R.HvRegisterVsmVpSecureConfigVtl0, q(VsmVpSecureConfig.TLB_LOCKED))])
    data = HvInputFlushVirtualAddressSpace(0, 0, 1).pack()
    vtl1.part.ram[IN_PAGE : IN_PAGE + 24] = data
    vtl1.part.vps[0].regs[0].update(rcx=HypercallControl.encode(HypercallCode.HvCallFlushVirtualAddressSpace), rdx=IN_PAGE)
    assert vtl1.hv.hypercall(0, 0).retry
    # VTL1 flushing VTL0's TLB is not blocked by its own lock
    flags = HvFlushFlags.USE_TARGET_VTL | HvFlushFlags.TARGET_VTL0
    assert vtl1.call(HypercallCode.HvCallFlushVirtualAddressSpace, HvInputFlushVirtualAddressSpace(0, flags, 1).pack(),
                     vtl=1)[0] == 0  # fmt: skip
    vtl1.set([(R.HvRegisterVsmVpSecureConfigVtl0, q(0))])
    assert released == [[0]]
    assert not vtl1.hv.hypercall(0, 0).retry


# ---------------------------------------------------------------------------------------------
# Intercept message
# ---------------------------------------------------------------------------------------------


def test_intercept_message_layout() -> None:
    regs = {name: 0x1000 + i for i, name in enumerate(
        ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}  # fmt: skip
    segments = {
        "cs": Segment(0x0, 0xFFFFFFFF, 0x10, 0xA09B),
        "ds": Segment(0x100, 0xFFFF, 0x18, 0xC093),
        "ss": Segment(0x200, 0xFFFFF, 0x20, 0xC093),
    }
    insn = bytes(range(0x90, 0x90 + 20))
    msg = build_intercept(3, 0, Access.WRITE, 0x12345678, 0xFFFF8000DEAD0000, insn, regs, segments,
                          rip=0xFFFF800000001000, rflags=0x246, insn_length=7, cpl=0, mode=CpuMode.LONG,
                          cr0=0x80050033)  # fmt: skip
    raw = msg.pack()
    assert len(raw) == HV_MESSAGE_SIZE
    u8 = lambda off: raw[off]  # noqa: E731
    u16 = lambda off: struct.unpack_from("<H", raw, off)[0]  # noqa: E731
    u32 = lambda off: struct.unpack_from("<I", raw, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", raw, off)[0]  # noqa: E731
    # header
    assert u32(0x00) == HvMessageType.HvMessageTypeGpaIntercept == 0x80000001
    assert u8(0x04) == 240 and u8(0x05) == 0 and u16(0x06) == 0 and u64(0x08) == 0
    # intercept header (slot offsets = payload + 0x10)
    assert u32(0x10) == 3  # VpIndex
    assert u8(0x14) == 7  # InstructionLength
    assert u8(0x15) == 1  # access type: write
    assert u16(0x16) == 0 | (1 << 2) | (1 << 3) | (1 << 4)  # CPL0, CR0.PE, CR0.AM, EFER.LMA, VTL0
    assert raw[0x18:0x28] == struct.pack("<QIHH", 0, 0xFFFFFFFF, 0x10, 0xA09B)  # CS
    assert u64(0x28) == 0xFFFF800000001000 and u64(0x30) == 0x246 | (1 << 16)  # RF set (seed, hardware)
    assert u32(0x38) == 6  # write-back
    assert u8(0x3C) == 16 and u8(0x3D) == 1  # byte count, GvaValid
    assert u8(0x3E) == 0 and u8(0x3F) == 0
    assert u64(0x40) == 0xFFFF8000DEAD0000 and u64(0x48) == 0x12345678
    assert raw[0x50:0x60] == insn[:16]
    # seed tail
    assert raw[0x60:0x70] == struct.pack("<QIHH", 0x100, 0xFFFF, 0x18, 0xC093)
    assert raw[0x70:0x80] == struct.pack("<QIHH", 0x200, 0xFFFFF, 0x20, 0xC093)
    assert [u64(0x80 + 8 * i) for i in range(16)] == [0x1000 + i for i in range(16)]
    assert HvMessage.unpack(raw).header.payload_size == 240


def test_intercept_message_from_register_dict() -> None:
    """The machine's form: RIP/RFLAGS inside ``regs``, EFER given explicitly."""
    regs = {"rip": 0x7000, "rflags": 0x202, "rax": 5}
    raw = build_intercept(vp=1, intercepted_vtl=0, access=Access.READ, gpa=0x9000, gva=0x9000, insn_bytes=b"\x8b\x00",
                          insn_length=2, regs=regs, segments={"cs": Segment(), "es": Segment()}, cr0=0x80000001,
                          efer=0, cpl=0, mode=CpuMode.LONG).pack()  # fmt: skip
    assert struct.unpack_from("<QQ", raw, 0x28) == (0x7000, 0x10202)
    assert struct.unpack_from("<H", raw, 0x16)[0] == 1 << 2  # PE; LMA follows the explicit EFER
    assert struct.unpack_from("<Q", raw, 0x80)[0] == 5 and raw[0x3C] == 2


def test_intercept_message_variants() -> None:
    msg = build_intercept(0, 1, Access.EXECUTE, 0x5000, None, b"", {}, {}, rip=0x5000, rflags=2, insn_length=0,
                          cpl=3, mode=CpuMode.PROTECTED)  # fmt: skip
    raw = msg.pack()
    assert raw[0x15] == 2 and raw[0x14] == 2  # execute; instruction length 2 as the seed
    assert struct.unpack_from("<H", raw, 0x16)[0] == 3 | (1 << 2) | (1 << 7)  # CPL3, PE, VTL1
    assert raw[0x3C] == 0 and raw[0x3D] == 0 and struct.unpack_from("<Q", raw, 0x40)[0] == 0
    assert build_intercept(0, 0, Access.READ, 0, None, b"", {}, {}, rip=0, rflags=0, insn_length=1, cpl=0,
                           mode=CpuMode.REAL).pack()[0x15] == 0  # fmt: skip
