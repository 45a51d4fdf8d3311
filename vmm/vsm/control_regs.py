"""Is a CR0/CR3/CR4/EFER/CS combination one an x86-64 CPU can hold?

HvCallEnableVpVtl / HvCallStartVirtualProcessor initial contexts and HvCallSetVpRegisters of
CR0, CR3, CR4 and EFER come from the guest; KVM_SET_SREGS refuses inconsistent ones with
EINVAL, which used to escape from the hypercall handler as a VMM internal error (found by the
fuzz campaign, docs/fuzzing.md). The checks here are the architectural ones KVM applies
(Intel SDM vol. 3 §2.5, §9.8.5), so the handler can answer with a status instead.
"""

from __future__ import annotations

CR0_PE = 1 << 0
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
SEG_ATTR_LONG = 1 << 13  # TLFS segment attribute word: L bit

#: CR4 bits a guest context may set: the features every x86-64 host this VMM runs on has
#: (VME..OSXMMEXCPT, UMIP, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP). Others (LA57, VMXE, SMXE,
#: PKE, CET, PKS, reserved bits) depend on CPU features a guest here does not get.
CR4_ALLOWED = (1 << 12) - 1 | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 20) | (1 << 21)


def problem(cr0: int, cr3: int, cr4: int, efer: int, cs_attributes: int, ram_top: int) -> str | None:
    """Why the combination is impossible (one phrase), or None if a CPU can hold it.

    ``ram_top`` is the first byte above guest RAM: a paging root beyond it is refused too
    (hardware would take it and fault on every access; KVM refuses roots beyond MAXPHYADDR).
    """
    if cr0 >> 32:
        return "CR0 bits 63:32 are reserved"
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        return "CR0.PG without CR0.PE"
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        return "CR0.NW without CR0.CD"
    if cr4 & ~CR4_ALLOWED:
        return f"CR4 bits {cr4 & ~CR4_ALLOWED:#x} are reserved or unsupported"
    long_mode = bool(efer & EFER_LME and cr0 & CR0_PG)
    if long_mode:
        if not cr4 & CR4_PAE:
            return "long mode without CR4.PAE"
        if not efer & EFER_LMA:
            return "EFER.LME and CR0.PG without EFER.LMA"
    elif efer & EFER_LMA or cs_attributes & SEG_ATTR_LONG:
        return "EFER.LMA or CS.L outside long mode"
    if cr0 & CR0_PG and cr3 >= ram_top:
        return "CR3 beyond guest RAM"
    return None
