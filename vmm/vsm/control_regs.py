"""Is a CR0/CR3/CR4/EFER/CS combination, or a register value, one an x86-64 CPU can hold?

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


#: Registers that hold a linear address, which WRMSR refuses unless it is canonical (48-bit
#: linear addresses: no LA57 here). KVM_SET_MSRS refuses such values with EINVAL.
CANONICAL_REGISTERS = frozenset({"lstar", "cstar", "kernel_gs_base", "sysenter_eip", "sysenter_esp"})
PAT_MEMORY_TYPES = frozenset({0, 1, 4, 5, 6, 7})  # UC, WC, WT, WP, WB, UC-
EFER_ALLOWED = (1 << 0) | EFER_LME | EFER_LMA | (1 << 11)  # SCE, LME, LMA, NXE: what a guest here may set


def is_canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


def register_problem(name: str, value: int) -> str | None:
    """Why ``value`` cannot be loaded into architectural register ``name`` (one phrase), or None.

    The checks WRMSR, MOV to CR8 and MOV to DR6/DR7 apply (#GP on hardware; KVM refuses the
    value with EINVAL, which used to escape a SetVpRegisters handler as a VMM internal error:
    found by the fuzz campaign, docs/fuzzing.md).
    """
    if name in CANONICAL_REGISTERS and not is_canonical(value):
        return f"{name} {value:#x} is not a canonical address"
    if name == "pat" and any((value >> (8 * i)) & 0xFF not in PAT_MEMORY_TYPES for i in range(8)):
        return f"PAT {value:#x} holds an undefined memory type"
    if name == "tsc_aux" and value >> 32:
        return "TSC_AUX bits 63:32 are reserved"
    if name == "efer" and value & ~EFER_ALLOWED:
        return f"EFER bits {value & ~EFER_ALLOWED:#x} are reserved or unsupported"
    if name == "cr8" and value >> 4:
        return "CR8 bits 63:4 are reserved"
    if name in ("dr6", "dr7") and value >> 32:
        return f"{name.upper()} bits 63:32 are reserved"
    return None
