"""Guest page walks on a live vCPU: guest-linear addresses to guest-physical, and reads through them.

KVM walks the guest's own page tables (KVM_TRANSLATE), so these helpers see
exactly what the vCPU's MMU sees. Used to name an instruction KVM cannot emulate
(``guest_errors``) and to locate the instruction behind a denied access
(``backends/vsm``). The TLFS's HvCallTranslateVirtualAddress walk, which must
honour VTL protections, is ``vsm/translate.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vsmtrace.vmm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory
from vsmtrace.vmm.vp import GuestMemoryError

if TYPE_CHECKING:
    from vsmtrace.vmm.kvm.system import Vcpu

ADDRESS_MASK = 0xFFFFFFFFFFFFFFFF
Translate = Callable[[int], "int | None"]


def translator(vcpu: Vcpu) -> Translate:
    """Guest-linear → guest-physical through the vCPU's own page tables (None: not mapped)."""

    def translate(linear: int) -> int | None:
        try:
            gpa, valid, _ = vcpu.translate(linear & ADDRESS_MASK)
        except OSError:
            return None
        return int(gpa) if valid else None

    return translate


def cached_translator(vcpu: Vcpu) -> Translate:
    """:func:`translator` with each page translated once.

    Locating an instruction decodes up to 16 candidates around RIP; without the
    cache each would cost KVM_TRANSLATE ioctls (several µs each on some hosts).
    """
    pages: dict[int, int | None] = {}
    walk = translator(vcpu)

    def translate(linear: int) -> int | None:
        page = (linear & ADDRESS_MASK) >> PAGE_SHIFT
        if page not in pages:
            pages[page] = walk(page << PAGE_SHIFT)
        base = pages[page]
        return None if base is None else base + (linear & (PAGE_SIZE - 1))

    return translate


def read_linear(memory: GuestMemory, translate: Translate, linear: int, size: int) -> bytes:
    """Up to ``size`` bytes at a guest linear address, page by page through ``translate``.

    Stops early (returns fewer bytes) at an unmapped page or a page outside RAM.
    """
    out = bytearray()
    addr = linear & ADDRESS_MASK
    while len(out) < size:
        gpa = translate(addr)
        if gpa is None:
            break
        chunk = min(size - len(out), PAGE_SIZE - (addr & (PAGE_SIZE - 1)))
        try:
            out += memory.read(gpa, chunk)
        except GuestMemoryError:
            break
        addr += chunk
    return bytes(out)


def rip_linear(vcpu: Vcpu) -> tuple[int, int]:
    """(RIP, the linear address of the instruction there: CS base + RIP)."""
    rip = int(vcpu.get_regs().rip)
    return rip, (int(vcpu.get_sregs().cs.base) + rip) & ADDRESS_MASK
