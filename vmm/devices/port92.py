"""System control port A at 0x92: bit 0 "fast reset" (on a 0 -> 1 write), bit 1 the A20 gate.

A20 is reported as written but never masks addresses (the guest runs in long mode; QEMU
with KVM likewise keeps A20 on). Reads return the last value written (QEMU's port92).
"""

from __future__ import annotations

from collections.abc import Callable

PORT92 = 0x92
FAST_RESET = 0x01
A20_GATE = 0x02


class Port92:
    def __init__(self, on_reset: Callable[[str], None]) -> None:
        self.on_reset = on_reset
        self.value = 0

    def pio_read(self, port: int, size: int) -> int:
        return self.value

    def pio_write(self, port: int, size: int, value: int) -> None:
        old, self.value = self.value, value & 0xFF
        if value & FAST_RESET and not old & FAST_RESET:
            self.on_reset("fast reset through port 0x92")
