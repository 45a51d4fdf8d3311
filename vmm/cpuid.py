"""The CPUID the guest sees: KVM's supported set, filtered to what vsmtrace implements.

The local APIC is emulated in userspace, so its CPUID bits (APIC, x2APIC,
TSC-deadline) are ours to advertise; KVM's own paravirtual leaves are dropped so
that 0x40000000+ belongs to the Hyper-V layer (or nothing, with --no-hyperv).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx

LEAF_FEATURES = 0x1
LEAF_EXT_TOPOLOGY = 0xB
LEAF_EXT_TOPOLOGY_V2 = 0x1F
LEAF_XSAVE = 0xD
LEAF_HYPERVISOR_BASE = 0x40000000
LEAF_HYPERVISOR_END = 0x4FFFFFFF

# CPUID.1
ECX_X2APIC = 1 << 21
ECX_TSC_DEADLINE = 1 << 24
ECX_XSAVE = 1 << 26
ECX_OSXSAVE = 1 << 27
ECX_POPCNT = 1 << 23
ECX_MONITOR = 1 << 3
ECX_HYPERVISOR = 1 << 31
EDX_APIC = 1 << 9
EBX_APIC_ID_SHIFT = 24
EBX_APIC_ID_MASK = 0xFF << EBX_APIC_ID_SHIFT
EBX_LOGICAL_COUNT_SHIFT = 16
EBX_LOGICAL_COUNT_MASK = 0xFF << EBX_LOGICAL_COUNT_SHIFT
EDX_HTT = 1 << 28
LEAF_EXT_ADDRESS_SIZES = 0x80000008
EBX_XSAVEERPTR = 1 << 2  # FXSAVE/XSAVE always save the x87 error pointers (AMD)


@dataclass
class CpuidPolicy:
    """What to hide on top of KVM's supported set.

    XSAVE is hidden by default: this KVM backend cannot emulate ``xrstor`` in
    supervisor code, so a guest that saw XSAVE would stop; with it hidden, OS
    kernels fall back to FXSAVE. Whether the hiding reaches the guest depends on
    the backend: :mod:`vsmtrace.vmm.cpuid_probe` measures it at start-up (on the
    PVM host, XSAVE and POPCNT stay visible to ring 0; docs/linux-guest.md).
    """

    hide_xsave: bool = True
    hide_popcnt: bool = True
    hide_monitor: bool = True
    hypervisor_bit: bool = False  # CPUID.1:ECX[31]: set when a hypervisor interface is offered
    extra_leaves: list[CpuidEntry] = field(default_factory=list)  # e.g. Hyper-V leaves


def build_cpuid(supported: list[CpuidEntry], vp_index: int, vp_count: int, policy: CpuidPolicy) -> list[CpuidEntry]:
    out: list[CpuidEntry] = []
    for fn, idx, flags, a, b, c, d in supported:
        if LEAF_HYPERVISOR_BASE <= fn <= LEAF_HYPERVISOR_END:
            continue  # KVM's PV leaves: not ours to offer
        if fn == LEAF_XSAVE and policy.hide_xsave:
            continue
        if fn == LEAF_FEATURES:
            c |= ECX_X2APIC | ECX_TSC_DEADLINE
            c = c | ECX_HYPERVISOR if policy.hypervisor_bit else c & ~ECX_HYPERVISOR
            d |= EDX_APIC
            if policy.hide_xsave:
                c &= ~(ECX_XSAVE | ECX_OSXSAVE)
            if policy.hide_popcnt:
                c &= ~ECX_POPCNT
            if policy.hide_monitor:
                c &= ~ECX_MONITOR
            b = (b & ~EBX_APIC_ID_MASK) | (vp_index << EBX_APIC_ID_SHIFT)
            b = (b & ~EBX_LOGICAL_COUNT_MASK) | (max(vp_count, 1) << EBX_LOGICAL_COUNT_SHIFT)
            d |= EDX_HTT if vp_count > 1 else 0
        if fn == LEAF_EXT_ADDRESS_SIZES:
            # Linux then skips its FXSAVE-leak workaround (fnclex/emms/fild, which KVM's emulator
            # cannot run here); this leaf does take effect on the PVM host (docs/linux-guest.md)
            b |= EBX_XSAVEERPTR
        if fn in (LEAF_EXT_TOPOLOGY, LEAF_EXT_TOPOLOGY_V2):
            d = vp_index  # x2APIC ID
        out.append((fn, idx, flags, a, b, c, d))
    out.extend(policy.extra_leaves)
    return out
