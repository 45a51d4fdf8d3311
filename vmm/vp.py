"""The VP interface: the only way Hyper-V and VSM code reaches the guest.

Emulation code (``vmm/hyperv``, ``vmm/vsm``) never touches KVM directly. It is
handed a :class:`PartitionAccess` and a :class:`VpAccess` and reads/writes the
guest through them. The live backend (``vmm/machine.py``) implements them over
KVM; the replayer implements them from a trace. Whatever emulation reads through
these methods is an *input* of the trace; whatever it writes or decides is an
*output*. Keeping the interface narrow is what makes deterministic replay work.

Register names are lower-case x86 names: ``rax`` .. ``r15``, ``rip``, ``rflags``,
``cr0`` ``cr2`` ``cr3`` ``cr4`` ``cr8``, ``efer``, ``dr0``-``dr3`` ``dr6`` ``dr7``,
``cs`` ``ds`` ``es`` ``fs`` ``gs`` ``ss`` ``tr`` ``ldtr`` (as :class:`Segment`),
``gdtr`` ``idtr`` (as :class:`Table`), and MSR-backed ones ``star`` ``lstar``
``cstar`` ``sfmask`` ``sysenter_cs`` ``sysenter_eip`` ``sysenter_esp``
``kernel_gs_base`` ``pat`` ``tsc_aux`` ``apic_base``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


@dataclass
class Segment:
    """An x86 segment register in the TLFS HV_X64_SEGMENT_REGISTER shape."""

    base: int = 0
    limit: int = 0
    selector: int = 0
    attributes: int = 0  # TLFS attribute word: type:4 s:1 dpl:2 p:1 rsvd:4 avl:1 l:1 db:1 g:1


@dataclass
class Table:
    """GDTR / IDTR."""

    base: int = 0
    limit: int = 0


class Access(enum.IntFlag):
    """What a guest-physical access wants; checked against VTL protections."""

    READ = 1
    WRITE = 2
    EXECUTE = 4


class GuestMemoryError(Exception):
    """A guest-physical access outside RAM."""

    def __init__(self, gpa: int, size: int) -> None:
        super().__init__(f"guest-physical access {gpa:#x}+{size} is outside guest RAM")
        self.gpa = gpa
        self.size = size


class VtlAccessDenied(Exception):
    """A guest-physical access that the acting VTL's protections forbid."""

    def __init__(self, vtl: int, gpa: int, access: Access) -> None:
        super().__init__(f"VTL{vtl} may not {access.name.lower() if access.name else access} {gpa:#x}")
        self.vtl = vtl
        self.gpa = gpa
        self.access = access


class CpuMode(enum.IntEnum):
    REAL = 0
    PROTECTED = 1  # 32-bit (or 16-bit) protected mode
    LONG = 2  # 64-bit code segment in long mode
    COMPAT = 3  # long mode, 32-bit code segment


class VpAccess(Protocol):
    """One virtual processor, at any of its VTLs."""

    index: int

    @property
    def active_vtl(self) -> int: ...

    def get_register(self, vtl: int, name: str) -> int | Segment | Table: ...

    def set_register(self, vtl: int, name: str, value: int | Segment | Table) -> None: ...

    def get_xmm(self, vtl: int, index: int) -> int:
        """XMM register ``index`` as a 128-bit integer."""
        ...

    def set_xmm(self, vtl: int, index: int, value: int) -> None: ...

    def cpl(self, vtl: int) -> int: ...

    def mode(self, vtl: int) -> CpuMode: ...

    def inject_exception(self, vtl: int, vector: int, error_code: int | None = None) -> None:
        """Queue an exception for delivery when this VTL next runs."""
        ...


class PartitionAccess(Protocol):
    """Partition-wide services: memory through a VTL's view, time, VPs."""

    def vp(self, index: int) -> VpAccess: ...

    @property
    def vp_count(self) -> int: ...

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        """Read guest-physical memory as ``vtl`` may see it; raises VtlAccessDenied / GuestMemoryError."""
        ...

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None: ...

    def reference_time(self) -> int:
        """Partition reference time in 100 ns units (TIME_REF_COUNT)."""
        ...

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        """Make ``vector`` pending in the local APIC of VP ``vp_index`` at ``vtl``."""
        ...
