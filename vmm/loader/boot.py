"""The CPU state a loader hands to the boot processor."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsmtrace.vmm.loader.elf import LoaderError

if TYPE_CHECKING:
    from vsmtrace.vmm.memory import GuestMemory


class BootMode(enum.Enum):
    PROTECTED32 = "protected32"  # Multiboot: flat 32-bit segments, paging off
    LONG64 = "long64"  # raw 64-bit ELF: long mode, identity-mapped paging


@dataclass
class BootState:
    mode: BootMode
    entry: int
    regs: dict[str, int] = field(default_factory=dict)  # GPR name → value
    cr3: int = 0  # page tables (LONG64)
    gdt_base: int = 0
    gdt_limit: int = 0
    protocol: str = ""  # which boot protocol loaded the kernel: multiboot, pvh, raw64


class BootStrings:
    """NUL-terminated strings (command line, module names) packed into a boot string area.

    Multiboot and PVH both keep them in ``[first, end)``; ``area`` names it in the error.
    """

    def __init__(self, memory: GuestMemory, first: int, end: int, area: str) -> None:
        self.memory = memory
        self.next = first
        self.end = end
        self.area = area

    def put(self, text: str) -> int:
        data = text.encode() + b"\0"
        if self.next + len(data) > self.end:
            raise LoaderError(f"command line and module strings are too long for {self.area}")
        addr = self.next
        self.memory.write(addr, data)
        self.next += len(data)
        return addr
