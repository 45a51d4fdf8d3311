"""GVA → GPA translation for HvCallTranslateVirtualAddress, walking a VTL's own page tables.

The walk uses the target (VP, VTL)'s CR0/CR3/CR4/EFER (VTL-private state) and reads page
tables through the target VTL's own view, as that VTL's MMU would: a page-table page the
target VTL may not read ends the walk with GpaNoReadAccess (nothing of it is reported),
and with SET_PAGE_TABLE_BITS an accessed/dirty update the target VTL may not write is
not made and the result is GpaNoWriteAccess. Otherwise a lower VTL could learn a higher
VTL's protected bytes (as PTEs, through the result code and GpaPage) or have them
modified (A/D bits) just by pointing its page tables at them. Supported: no paging, 32-bit (4 KiB / 4 MiB with CR4.PSE),
PAE, 4-level and 5-level long mode with 2 MiB / 1 GiB pages.

Access validation (only for the VALIDATE_* flags the caller set):

* user/supervisor: USER_ACCESS / SUPERVISOR_ACCESS choose the mode; with neither the
  target VP's CPL decides (CPL 3 = user). PRIVILEGE_EXEMPT skips the user/supervisor
  checks (U/S, SMEP, SMAP) but not write protection or NX.
* write: every level writable, or a supervisor access with CR0.WP clear.
* execute: no level with XD (EFER.NXE); a supervisor fetch from a user page with CR4.SMEP.
* SMAP: a supervisor data access to a user page with CR4.SMAP is a violation if
  ENFORCE_SMAP, or if neither ENFORCE_SMAP nor OVERRIDE_SMAP is set and RFLAGS.AC is clear.
* then the GPA: outside RAM → GpaUnmapped; VTL protections of the target VTL → GpaNoReadAccess
  / GpaNoWriteAccess, and Intercept for a denied execute (the TLFS has no "no execute"
  code; a real fetch would be intercepted).

OverlayPage is set when the GPA is the target VTL's hypercall page or the (VP, VTL)'s VP
assist page. Validating a write to the hypercall overlay is Success with OverlayPage set and
the overlay's GPA, as in the seed: the TLFS names GpaIllegalOverlayAccess but never says
which access is illegal, and a translation grants nothing (docs/vsm.md). GpaIllegalOverlayAccess
is never returned. The cache type is always write-back (PAT/MTRRs are not evaluated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vsmtrace.vmm.hyperv.hvdef import (
    HV_PAGE_SHIFT,
    HvCacheType,
    HvTranslateGvaControlFlags,
    HvTranslateGvaResult,
    HvTranslateGvaResultCode,
)
from vsmtrace.vmm.vp import Access, GuestMemoryError, PartitionAccess, VpAccess, VtlAccessDenied

# Architectural x86 bits (not Hyper-V numbers).
CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
RFLAGS_AC = 1 << 18
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_XD = 1 << 63
ADDR_MASK_64 = 0x000F_FFFF_FFFF_F000
ADDR_MASK_32 = 0xFFFF_F000
PAE_PDPT_MASK = 0xFFFF_FFE0
PAE_PDPTE_RESERVED = (0x3 << 1) | (0xF << 5)  # bits 2:1 and 8:5 of a PAE PDPTE
PAGE_SIZE = 1 << HV_PAGE_SHIFT
_U64 = (1 << 64) - 1

Code = HvTranslateGvaResultCode
F = HvTranslateGvaControlFlags


@dataclass(frozen=True)
class Translation:
    """Outcome of one translation: result code, GPA page, overlay flag and cache type."""

    code: HvTranslateGvaResultCode
    gpa_page: int = 0
    overlay: bool = False
    cache_type: int = HvCacheType.WRITE_BACK

    def result_value(self) -> int:
        """The HV_TRANSLATE_GVA_RESULT u64."""
        value = int(self.code) & HvTranslateGvaResult.RESULT_CODE_MASK
        value |= (self.cache_type & HvTranslateGvaResult.CACHE_TYPE_MASK) << HvTranslateGvaResult.CACHE_TYPE_SHIFT
        if self.overlay:
            value |= HvTranslateGvaResult.OVERLAY_PAGE
        return value


class _Fault(Exception):
    def __init__(self, code: HvTranslateGvaResultCode) -> None:
        super().__init__(code.name)
        self.code = code


@dataclass
class _Walk:
    """What the walk found: the physical address and the combined rights."""

    gpa: int
    writable: bool = True
    user: bool = True
    nx: bool = False


class _Reader:
    """Reads (and, for SET_PAGE_TABLE_BITS, updates) page-table entries as the hypervisor."""

    def __init__(self, partition: PartitionAccess, vtl: int) -> None:
        self.partition = partition
        self.vtl = vtl
        self.touched: list[tuple[int, int, int]] = []  # (address, size, value)

    def entry(self, address: int, size: int) -> int:
        try:
            data = self.partition.read_gpa(self.vtl, address, size)
        except GuestMemoryError:
            raise _Fault(Code.GPA_UNMAPPED) from None
        except VtlAccessDenied:
            raise _Fault(Code.GPA_NO_READ_ACCESS) from None
        value = int.from_bytes(data, "little")
        self.touched.append((address, size, value))
        return value

    def set_bits(self, dirty: bool) -> bool:
        """Set Accessed in every entry used, Dirty in the leaf (last) entry for a write.

        False if the reader's view does not allow writing one of the entries (that one and
        the ones after it are left alone).
        """
        for i, (address, size, value) in enumerate(self.touched):
            new = value | PTE_A
            if dirty and i == len(self.touched) - 1:
                new |= PTE_D
            if new != value:
                try:
                    self.partition.write_gpa(self.vtl, address, new.to_bytes(size, "little"))
                except GuestMemoryError:
                    pass
                except VtlAccessDenied:
                    return False
        return True


def _accumulate(walk: _Walk, entry: int, nxe: bool) -> None:
    walk.writable &= bool(entry & PTE_RW)
    walk.user &= bool(entry & PTE_US)
    if nxe and entry & PTE_XD:
        walk.nx = True


def _check_xd(entry: int, nxe: bool) -> None:
    if entry & PTE_XD and not nxe:
        raise _Fault(Code.INVALID_PAGE_TABLE_FLAGS)


def _walk_long(reader: _Reader, cr3: int, gva: int, levels: int, nxe: bool) -> _Walk:
    va_bits = 12 + 9 * levels
    top = gva >> (va_bits - 1)
    if top not in (0, (1 << (64 - va_bits + 1)) - 1):
        raise _Fault(Code.PAGE_NOT_PRESENT)  # non-canonical: nothing can map it
    return _walk_tables(reader, cr3 & ADDR_MASK_64, gva, levels, nxe)


def _walk_pae(reader: _Reader, cr3: int, gva: int, nxe: bool) -> _Walk:
    gva &= 0xFFFF_FFFF
    pdpte = reader.entry((cr3 & PAE_PDPT_MASK) + ((gva >> 30) & 0x3) * 8, 8)
    if not pdpte & PTE_P:
        raise _Fault(Code.PAGE_NOT_PRESENT)
    if pdpte & (PAE_PDPTE_RESERVED | PTE_XD):
        raise _Fault(Code.INVALID_PAGE_TABLE_FLAGS)
    return _walk_tables(reader, pdpte & ADDR_MASK_64, gva, 2, nxe)


def _walk_tables(reader: _Reader, table: int, gva: int, levels: int, nxe: bool) -> _Walk:
    """The 8-byte-entry levels shared by PAE (2 levels below the PDPT) and long mode (4 or 5).

    PS at level 2 (2 MiB) or 3 (1 GiB) maps a large page; above level 3 it is invalid;
    at level 1 it is the PAT bit of a 4 KiB page.
    """
    walk = _Walk(gpa=0)
    for level in range(levels, 0, -1):
        shift = 12 + 9 * (level - 1)
        entry = reader.entry(table + ((gva >> shift) & 0x1FF) * 8, 8)
        if not entry & PTE_P:
            raise _Fault(Code.PAGE_NOT_PRESENT)
        _check_xd(entry, nxe)
        _accumulate(walk, entry, nxe)
        if entry & PTE_PS:
            if level > 3:
                raise _Fault(Code.INVALID_PAGE_TABLE_FLAGS)
            if level > 1:
                # Large page: bits shift-1..13 of the entry must be zero (bit 12 is PAT).
                if entry & ((1 << shift) - 1) & ~((1 << 13) - 1):
                    raise _Fault(Code.INVALID_PAGE_TABLE_FLAGS)
                walk.gpa = (entry & ADDR_MASK_64 & ~((1 << shift) - 1)) | (gva & ((1 << shift) - 1))
                return walk
        table = entry & ADDR_MASK_64
    walk.gpa = table | (gva & (PAGE_SIZE - 1))
    return walk


def _walk_32(reader: _Reader, cr3: int, cr4: int, gva: int) -> _Walk:
    gva &= 0xFFFF_FFFF
    walk = _Walk(gpa=0)
    pde = reader.entry((cr3 & ADDR_MASK_32) + (gva >> 22) * 4, 4)
    if not pde & PTE_P:
        raise _Fault(Code.PAGE_NOT_PRESENT)
    _accumulate(walk, pde, nxe=False)
    if pde & PTE_PS and cr4 & CR4_PSE:
        walk.gpa = (pde & 0xFFC0_0000) | (gva & 0x3F_FFFF)
        return walk
    pte = reader.entry((pde & ADDR_MASK_32) + ((gva >> 12) & 0x3FF) * 4, 4)
    if not pte & PTE_P:
        raise _Fault(Code.PAGE_NOT_PRESENT)
    _accumulate(walk, pte, nxe=False)
    walk.gpa = (pte & ADDR_MASK_32) | (gva & (PAGE_SIZE - 1))
    return walk


def _reg(vp: VpAccess, vtl: int, name: str) -> int:
    return int(vp.get_register(vtl, name))  # type: ignore[arg-type]


def _check_rights(walk: _Walk, flags: int, user: bool, cr0: int, cr4: int, rflags: int) -> None:
    exempt = bool(flags & F.PRIVILEGE_EXEMPT)
    read = bool(flags & F.VALIDATE_READ)
    write = bool(flags & F.VALIDATE_WRITE)
    execute = bool(flags & F.VALIDATE_EXECUTE)
    if exempt:
        user = False
    if user and not walk.user:
        raise _Fault(Code.PRIVILEGE_VIOLATION)
    if write and not walk.writable and (user or cr0 & CR0_WP):
        raise _Fault(Code.PRIVILEGE_VIOLATION)
    if execute and walk.nx:
        raise _Fault(Code.PRIVILEGE_VIOLATION)
    if exempt or user or not walk.user:
        return
    if execute and cr4 & CR4_SMEP:
        raise _Fault(Code.PRIVILEGE_VIOLATION)
    if (read or write) and cr4 & CR4_SMAP:
        enforce = bool(flags & F.ENFORCE_SMAP) or (not flags & F.OVERRIDE_SMAP and not rflags & RFLAGS_AC)
        if enforce:
            raise _Fault(Code.PRIVILEGE_VIOLATION)


def translate_gva(
    partition: PartitionAccess,
    vp: VpAccess,
    vtl: int,
    gva: int,
    flags: int,
    *,
    reader_vtl: int,
    allowed: Callable[[int], Access],
    is_ram: Callable[[int], bool],
    overlay_pages: set[int],
) -> Translation:
    """Translate ``gva`` in the context of (``vp``, ``vtl``) and validate per ``flags``.

    ``allowed(page)`` gives the VTL protections of ``vtl``'s view; ``overlay_pages`` are GPA
    page numbers. Page tables are read and updated through
    ``reader_vtl``'s view (the handler passes the target VTL).
    """
    cr0 = _reg(vp, vtl, "cr0")
    cr4 = _reg(vp, vtl, "cr4")
    efer = _reg(vp, vtl, "efer")
    reader = _Reader(partition, reader_vtl)
    validate = flags & (F.VALIDATE_READ | F.VALIDATE_WRITE | F.VALIDATE_EXECUTE)
    try:
        if not cr0 & CR0_PG:
            walk = _Walk(gpa=gva & 0xFFFF_FFFF)
        else:
            cr3 = _reg(vp, vtl, "cr3")
            nxe = bool(efer & EFER_NXE)
            if efer & EFER_LMA:
                walk = _walk_long(reader, cr3, gva & _U64, 5 if cr4 & CR4_LA57 else 4, nxe)
            elif cr4 & CR4_PAE:
                walk = _walk_pae(reader, cr3, gva, nxe)
            else:
                walk = _walk_32(reader, cr3, cr4, gva)
        if validate:
            if flags & F.USER_ACCESS:
                user = True
            elif flags & F.SUPERVISOR_ACCESS:
                user = False
            else:
                user = vp.cpl(vtl) == 3
            _check_rights(walk, flags, user, cr0, cr4, _reg(vp, vtl, "rflags"))
    except _Fault as fault:
        return Translation(fault.code)

    page = walk.gpa >> HV_PAGE_SHIFT
    overlay = page in overlay_pages
    if not is_ram(page):
        return Translation(Code.GPA_UNMAPPED, page, overlay)
    rights = allowed(page)
    if flags & F.VALIDATE_READ and not rights & Access.READ:
        return Translation(Code.GPA_NO_READ_ACCESS, page, overlay)
    if flags & F.VALIDATE_WRITE and not rights & Access.WRITE:
        return Translation(Code.GPA_NO_WRITE_ACCESS, page, overlay)
    if flags & F.VALIDATE_EXECUTE and not rights & Access.EXECUTE:
        return Translation(Code.INTERCEPT, page, overlay)
    if flags & F.SET_PAGE_TABLE_BITS and cr0 & CR0_PG and not reader.set_bits(dirty=bool(flags & F.VALIDATE_WRITE)):
        return Translation(Code.GPA_NO_WRITE_ACCESS, page, overlay)
    return Translation(Code.SUCCESS, page, overlay)
