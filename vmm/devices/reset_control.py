"""The PIIX/ICH reset control register at port 0xCF9.

A write with bit 2 (reset CPU) set resets the machine (0x06 and 0x0E are what guests
write: bit 1 picks a hard reset, bit 3 a full one; every kind is a full VM reset here).
Other writes keep bit 1, which reads back (as QEMU's PIIX3 does).
"""

from __future__ import annotations

from collections.abc import Callable

RESET_CONTROL_PORT = 0xCF9
RCR_SYSTEM_RESET = 0x02
RCR_RESET_CPU = 0x04


class ResetControl:
    def __init__(self, on_reset: Callable[[str], None]) -> None:
        self.on_reset = on_reset
        self.rcr = 0

    def pio_read(self, port: int, size: int) -> int:
        return self.rcr

    def pio_write(self, port: int, size: int, value: int) -> None:
        if value & RCR_RESET_CPU:
            self.on_reset(f"write of {value & 0xFF:#04x} to the reset control register (port 0xcf9)")
            return
        self.rcr = value & RCR_SYSTEM_RESET
