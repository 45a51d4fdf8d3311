"""Architectural register access by name and boot-time CPU setup for a KVM vCPU.

This is the KVM side of the VP interface's register methods: names are the
lower-case x86 names documented in ``vmm/vp.py``.
"""

from __future__ import annotations

import struct
from typing import Any

from vsmtrace.vmm.kvm.system import Vcpu, ffi, lib
from vsmtrace.vmm.loader.boot import BootMode, BootState
from vsmtrace.vmm.vp import CpuMode, Segment, Table

GPR_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags",
)  # fmt: skip
#: Byte offset of each GPR in kvm_run's sync-regs copy (struct kvm_regs: 18 u64 in GPR_NAMES order).
SYNC_GPR_OFFSETS = {
    name: ffi.offsetof("struct kvm_run", "s") + ffi.offsetof("struct kvm_regs", name) for name in GPR_NAMES
}
DIRTY_REGS_OFFSET = ffi.offsetof("struct kvm_run", "kvm_dirty_regs")
SYNC_X86_REGS = int(lib.KVM_SYNC_X86_REGS)
_U64 = struct.Struct("<Q")
SEGMENT_NAMES = {"cs": "cs", "ds": "ds", "es": "es", "fs": "fs", "gs": "gs", "ss": "ss", "tr": "tr", "ldtr": "ldt"}
TABLE_NAMES = {"gdtr": "gdt", "idtr": "idt"}
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")

# MSR-backed registers
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_PAT = 0x277
MSR_IA32_TSC = 0x10
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
MSR_REGISTERS = {
    "sysenter_cs": MSR_IA32_SYSENTER_CS,
    "sysenter_esp": MSR_IA32_SYSENTER_ESP,
    "sysenter_eip": MSR_IA32_SYSENTER_EIP,
    "pat": MSR_IA32_PAT,
    "star": MSR_STAR,
    "lstar": MSR_LSTAR,
    "cstar": MSR_CSTAR,
    "sfmask": MSR_SFMASK,
    "kernel_gs_base": MSR_KERNEL_GS_BASE,
    "tsc_aux": MSR_TSC_AUX,
}

# XSAVE area (SDM vol. 1, 13.4): legacy region XMM registers and the header's XSTATE_BV.
XSAVE_XMM_OFFSET = 160
XSAVE_XSTATE_BV_OFFSET = 512
XSTATE_SSE = 1 << 1

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_RESERVED1 = 1 << 1
RFLAGS_IF = 1 << 9

SEG_TYPE_CODE_XRA = 0xB  # execute/read, accessed
SEG_TYPE_DATA_RWA = 0x3  # read/write, accessed
BOOT_CS = 0x08
BOOT_DS = 0x10
REAL_MODE_CS_SHIFT = 4
SIPI_PAGE_SHIFT = 12


def segment_from_kvm(s: Any) -> Segment:
    attributes = (
        (s.type & 0xF)
        | (s.s & 1) << 4
        | (s.dpl & 3) << 5
        | (s.present & 1) << 7
        | (s.avl & 1) << 12
        | (s.l & 1) << 13
        | (s.db & 1) << 14
        | (s.g & 1) << 15
    )
    return Segment(base=s.base, limit=s.limit, selector=s.selector, attributes=attributes)


def segment_to_kvm(seg: Segment, s: Any) -> None:
    a = seg.attributes
    s.base, s.limit, s.selector = seg.base, seg.limit, seg.selector
    s.type = a & 0xF
    s.s = (a >> 4) & 1
    s.dpl = (a >> 5) & 3
    s.present = (a >> 7) & 1
    s.avl = (a >> 12) & 1
    s.l = (a >> 13) & 1
    s.db = (a >> 14) & 1
    s.g = (a >> 15) & 1
    s.unusable = 0 if s.present else 1


def cpu_mode(sregs: Any) -> CpuMode:
    if not sregs.cr0 & CR0_PE:
        return CpuMode.REAL
    if sregs.efer & EFER_LMA:
        return CpuMode.LONG if sregs.cs.l else CpuMode.COMPAT
    return CpuMode.PROTECTED


_REAL_MODE = (CpuMode.REAL, 0)
# CS.DPL, CS.L, CR0 and EFER in kvm_run's sync-regs copy of struct kvm_sregs, in one unpack.
_SREGS_OFFSET = ffi.offsetof("struct kvm_run", "s") + ffi.offsetof("struct kvm_sync_regs", "sregs")
_DPL_AT = ffi.offsetof("struct kvm_segment", "dpl")
_L_AT = ffi.offsetof("struct kvm_segment", "l")
_CR0_AT = ffi.offsetof("struct kvm_sregs", "cr0")
_EFER_AT = ffi.offsetof("struct kvm_sregs", "efer")
_MODE_FIELDS = struct.Struct(f"<B{_L_AT - _DPL_AT - 1}xB{_CR0_AT - _L_AT - 1}xQ{_EFER_AT - _CR0_AT - 8}xQ")
_MODE_FIELDS_OFFSET = _SREGS_OFFSET + ffi.offsetof("struct kvm_sregs", "cs") + _DPL_AT


def _flat(s: Any, selector: int, type_: int, *, long_code: bool = False) -> None:
    s.base = 0
    s.limit = 0xFFFFFFFF
    s.selector = selector
    s.type = type_
    s.present = 1
    s.dpl = 0
    s.s = 1
    s.g = 1
    s.avl = 0
    s.l = 1 if long_code else 0
    s.db = 0 if long_code else 1
    s.unusable = 0


def apply_boot_state(vcpu: Vcpu, boot: BootState) -> None:
    """Put the boot processor where the loader says the kernel expects it."""
    s = vcpu.get_sregs()
    long_mode = boot.mode is BootMode.LONG64
    _flat(s.cs, BOOT_CS, SEG_TYPE_CODE_XRA, long_code=long_mode)
    for seg in (s.ds, s.es, s.fs, s.gs, s.ss):
        _flat(seg, BOOT_DS, SEG_TYPE_DATA_RWA)
    s.cr0 = CR0_PE | CR0_ET | CR0_NE
    if long_mode:
        s.cr0 |= CR0_PG | CR0_MP | CR0_WP
        s.cr3 = boot.cr3
        s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
        s.efer = EFER_LME | EFER_LMA | EFER_NXE | EFER_SCE
        s.gdt.base = boot.gdt_base
        s.gdt.limit = boot.gdt_limit
    vcpu.set_sregs(s)
    regs = ffi.new("struct kvm_regs *")
    for name, value in boot.regs.items():
        setattr(regs, name, value)
    regs.rip = boot.entry
    regs.rflags = RFLAGS_RESERVED1
    vcpu.set_regs(regs)


def apply_sipi(vcpu: Vcpu, vector: int) -> None:
    """Start an application processor in real mode at ``vector << 12``."""
    s = vcpu.get_sregs()
    s.cs.selector = vector << (SIPI_PAGE_SHIFT - REAL_MODE_CS_SHIFT)
    s.cs.base = vector << SIPI_PAGE_SHIFT
    vcpu.set_sregs(s)
    regs = vcpu.get_regs()
    regs.rip = 0
    regs.rflags = RFLAGS_RESERVED1
    vcpu.set_regs(regs)


class RegisterFile:
    """Named register access over one vCPU (GPRs via sync regs, the rest via ioctls).

    GPRs are read and written as bytes of kvm_run's sync-regs copy when KVM syncs them
    (what ``Vcpu.get_regs``/``set_regs`` do, without a cffi struct per access: hypercalls
    read and write several per call). Mode and CPL are derived from the special registers
    once per copy of them (one per exit, or per KVM_SET_SREGS).
    """

    def __init__(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu
        self._view = vcpu.run_view if vcpu.sync_regs else None
        self._mode_of: Any = None  # the sregs object _mode_cpl was derived from
        self._mode_writes = -1  # and vcpu.sregs_writes at that time
        self._mode_cpl: tuple[CpuMode, int] = (CpuMode.REAL, 0)

    def get(self, name: str) -> int | Segment | Table:
        view = self._view
        if view is not None:
            offset = SYNC_GPR_OFFSETS.get(name)
            if offset is not None:
                return _U64.unpack_from(view, offset)[0]
        if name in GPR_NAMES:
            return int(getattr(self.vcpu.get_regs(), name))
        if name in CONTROL_NAMES:
            return int(getattr(self.vcpu.get_sregs(), name))
        if name in SEGMENT_NAMES:
            return segment_from_kvm(getattr(self.vcpu.get_sregs(), SEGMENT_NAMES[name]))
        if name in TABLE_NAMES:
            t = getattr(self.vcpu.get_sregs(), TABLE_NAMES[name])
            return Table(base=t.base, limit=t.limit)
        if name in ("dr0", "dr1", "dr2", "dr3"):
            return int(self.vcpu.get_debugregs().db[int(name[2])])
        if name in ("dr6", "dr7"):
            return int(getattr(self.vcpu.get_debugregs(), name))
        if name == "apic_base":
            return int(self.vcpu.get_sregs().apic_base)
        if name in MSR_REGISTERS:
            return self.vcpu.get_msrs([MSR_REGISTERS[name]])[MSR_REGISTERS[name]]
        raise KeyError(f"unknown register {name!r}")

    def set(self, name: str, value: int | Segment | Table) -> None:
        view = self._view
        if view is not None:
            offset = SYNC_GPR_OFFSETS.get(name)
            if offset is not None and value.__class__ is int and 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:  # type: ignore[operator]
                _U64.pack_into(view, offset, value)  # type: ignore[arg-type]
                dirty = _U64.unpack_from(view, DIRTY_REGS_OFFSET)[0]
                if not dirty & SYNC_X86_REGS:
                    _U64.pack_into(view, DIRTY_REGS_OFFSET, dirty | SYNC_X86_REGS)
                return
        if name in GPR_NAMES:  # no sync regs, or a value cffi must judge (it raises as before)
            regs = self.vcpu.get_regs()
            setattr(regs, name, value)
            self.vcpu.set_regs(regs)
            return
        self.set_many({name: value})

    def mode_cpl(self) -> tuple[CpuMode, int]:
        """The processor mode and CPL (0 in real mode).

        When KVM exports the special registers with every exit, kvm_run's copy is the
        current state (``Vcpu.get_sregs`` hands out that very copy): the four fields are
        read from its bytes at once. Otherwise they are derived once per KVM_GET_SREGS.
        """
        vcpu = self.vcpu
        if vcpu.sregs_exported:
            dpl, long_cs, cr0, efer = _MODE_FIELDS.unpack_from(vcpu.run_view, _MODE_FIELDS_OFFSET)
            if not cr0 & CR0_PE:
                return _REAL_MODE
            if efer & EFER_LMA:
                return (CpuMode.LONG if long_cs else CpuMode.COMPAT, dpl)
            return (CpuMode.PROTECTED, dpl)
        s = vcpu.get_sregs()
        if s is self._mode_of and vcpu.sregs_writes == self._mode_writes:
            return self._mode_cpl
        mode = cpu_mode(s)
        result = self._mode_cpl = (mode, 0 if mode is CpuMode.REAL else int(s.cs.dpl))
        self._mode_of, self._mode_writes = s, vcpu.sregs_writes
        return result

    def set_many(self, values: dict[str, int | Segment | Table]) -> None:
        """Set several registers at once; control/segment registers go in one KVM_SET_SREGS.

        Loading a whole context one register at a time would pass through states KVM
        rejects (e.g. CR0.PG with EFER.LME before CR4.PAE), so they are applied together.
        """
        gprs = {n: v for n, v in values.items() if n in GPR_NAMES}
        special = {n: v for n, v in values.items() if n in CONTROL_NAMES or n in SEGMENT_NAMES or n in TABLE_NAMES or n == "apic_base"}
        rest = {n: v for n, v in values.items() if n not in gprs and n not in special}
        if special:
            self.vcpu.flush_regs()
            s = self.vcpu.get_sregs()
            for name, value in special.items():
                if name in CONTROL_NAMES or name == "apic_base":
                    setattr(s, name, value)
                elif name in SEGMENT_NAMES:
                    assert isinstance(value, Segment)
                    segment_to_kvm(value, getattr(s, SEGMENT_NAMES[name]))
                else:
                    assert isinstance(value, Table)
                    t = getattr(s, TABLE_NAMES[name])
                    t.base, t.limit = value.base, value.limit
            self.vcpu.set_sregs(s)
        if gprs:
            regs = self.vcpu.get_regs()
            for name, value in gprs.items():
                setattr(regs, name, value)
            self.vcpu.set_regs(regs)  # through kvm_run (sync regs): applied at the next KVM_RUN
        for name, value in rest.items():
            if name.startswith("dr"):
                d = self.vcpu.get_debugregs()
                if name in ("dr6", "dr7"):
                    setattr(d, name, value)
                else:
                    d.db[int(name[2])] = value
                self.vcpu.set_debugregs(d)
            elif name in MSR_REGISTERS:
                self.vcpu.set_msrs({MSR_REGISTERS[name]: int(value)})  # type: ignore[arg-type]
            else:
                raise KeyError(f"unknown register {name!r}")

    def get_xmm(self, index: int) -> int:
        fpu = self.vcpu.get_fpu()
        return int.from_bytes(bytes(ffi.buffer(fpu.xmm[index], 16)), "little")

    def set_xmm(self, index: int, value: int) -> None:
        """Through KVM_SET_XSAVE: a KVM_SET_FPU leaves XSTATE_BV.SSE clear, and the guest
        then sees the SSE init state instead (observed on this backend)."""
        xsave = self.vcpu.get_xsave()
        area = ffi.cast("uint8_t *", xsave.region)
        ffi.memmove(area + XSAVE_XMM_OFFSET + 16 * index, value.to_bytes(16, "little"), 16)
        bv = int.from_bytes(bytes(ffi.buffer(area + XSAVE_XSTATE_BV_OFFSET, 8)), "little") | XSTATE_SSE
        ffi.memmove(area + XSAVE_XSTATE_BV_OFFSET, bv.to_bytes(8, "little"), 8)
        self.vcpu.set_xsave(xsave)
