"""What a guest's supervisor code really reads from CPUID, measured once per host and process.

KVM_SET_CPUID2 is authoritative on ordinary KVM. On some backends it is not: on
the PVM host vsmtrace is developed on, ring-0 guest code reads the host's leaf 1
and leaf 7 feature bits except those inside KVM_GET_SUPPORTED_CPUID's mask
(docs/linux-guest.md, "This host"). So the VMM does not take its own hiding
for granted: a throwaway one-page VM executes ``cpuid; hlt`` in real mode (CPL 0)
with the table a VP would get, and :func:`ineffective_hiding` names every bit the
policy hides that the guest still sees.
"""

from __future__ import annotations

import errno
import mmap
from dataclasses import dataclass

from vsmtrace.vmm.cpuid import ECX_MONITOR, ECX_POPCNT, ECX_XSAVE, LEAF_FEATURES, CpuidEntry, CpuidPolicy
from vsmtrace.vmm.kvm.system import Kvm, KvmError, MemoryRegion, ffi, lib

PROBE_CODE = bytes.fromhex("0fa2f4")  # cpuid; hlt
PAGE = 4096
PROBE_TSS = 0xFFFBD000


@dataclass(frozen=True)
class HiddenBit:
    name: str
    leaf: int
    register: str
    mask: int
    hidden_by: str  # the CpuidPolicy field that asks to hide it


HIDDEN_BITS = (
    HiddenBit("XSAVE", LEAF_FEATURES, "ecx", ECX_XSAVE, "hide_xsave"),
    HiddenBit("POPCNT", LEAF_FEATURES, "ecx", ECX_POPCNT, "hide_popcnt"),
    HiddenBit("MONITOR", LEAF_FEATURES, "ecx", ECX_MONITOR, "hide_monitor"),
)


def guest_cpuid(kvm: Kvm, table: list[CpuidEntry], leaf: int, subleaf: int = 0) -> dict[str, int]:
    """Run ``cpuid`` at CPL 0 in a scratch VM with ``table`` installed; returns eax..edx."""
    vm = kvm.create_vm()
    page = mmap.mmap(-1, PAGE)
    try:
        try:
            vm.set_tss_addr(PROBE_TSS)
        except OSError:
            pass
        page[0 : len(PROBE_CODE)] = PROBE_CODE
        address = int(ffi.cast("uintptr_t", ffi.from_buffer(page)))
        vm.set_memory_region(MemoryRegion(0, 0, PAGE, address))
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid(table)
        s = vcpu.get_sregs()
        s.cs.selector, s.cs.base = 0, 0
        vcpu.set_sregs(s)
        regs = vcpu.get_regs()
        regs.rip, regs.rax, regs.rcx, regs.rflags = 0, leaf, subleaf, 2
        vcpu.set_regs(regs)
        while vcpu.run() == -errno.EINTR:  # a signal (a Ctrl-C at start-up) stopped it before the hlt: go on
            pass
        if vcpu.run_struct.exit_reason != lib.KVM_EXIT_HLT:
            raise KvmError("cpuid probe", 0)
        regs = vcpu.get_regs()
        out = {"eax": int(regs.rax), "ebx": int(regs.rbx), "ecx": int(regs.rcx), "edx": int(regs.rdx)}
        return out
    finally:
        vm.close()
        try:
            page.close()
        except BufferError:
            pass  # a cffi buffer still references it; freed with the process


def ineffective_hiding(kvm: Kvm, table: list[CpuidEntry], policy: CpuidPolicy) -> list[str]:
    """Names of the bits ``policy`` hides that ring-0 guest code still reads as set."""
    asked = [bit for bit in HIDDEN_BITS if getattr(policy, bit.hidden_by)]
    seen: dict[int, dict[str, int]] = {}
    leaky = []
    for bit in asked:
        if bit.leaf not in seen:
            seen[bit.leaf] = guest_cpuid(kvm, table, bit.leaf)
        if seen[bit.leaf][bit.register] & bit.mask:
            leaky.append(bit.name)
    return leaky
