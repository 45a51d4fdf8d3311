"""The CPU state a loader hands to the boot processor."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
