"""QEMU's PC test device (``-device pc-testdev``), which kvm-unit-tests style kernels expect.

Regions and behaviour, as QEMU 7.2 answers them (checked against ``qemu-system-x86_64
-device pc-testdev``, see docs/devices.md):

* ports 0xE0-0xE3: a 32-bit scratch register. An aligned access of 1, 2 or 4 bytes
  reads or writes those bytes of it; an unaligned access is ignored (reads 0).
* ports 0xE4-0xE7: "flush page": QEMU remaps the written page to force KVM to drop its
  translations; no guest-visible effect, so writes are accepted and ignored, reads 0.
* ports 0xE8-0xEB: the same scratch register, byte by byte (QEMU splits wider
  accesses into bytes, so every access size sees the same bytes as at 0xE0).
* ports 0x2000-0x2017: IRQ lines. Writing ``v`` to 0x2000 + n drives line n to
  ``v != 0``; reads return 0. Lines 0-15 are ISA IRQs (IRQ 0 reaches I/O APIC pin 2,
  as on a PC); QEMU 7.2 aborts on lines 16-23 (an assertion in isa_get_irq), here
  they drive I/O APIC pins 16-23 directly.
* MMIO 0xFF000000-0xFF00FFFF: 64 KiB of RAM behind MMIO exits (every access goes
  through the VMM, which is what instruction-emulation tests want), zero at reset,
  any size 1-8 at any offset, little endian.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

PORT_DATA = 0xE0
PORT_FLUSH_PAGE = 0xE4
PORT_DATA_BYTES = 0xE8
PORT_WIDTH = 4
IRQ_LINE_BASE = 0x2000
IRQ_LINES = 24
ISA_IRQS = 16
IOMEM_BASE = 0xFF000000
IOMEM_SIZE = 0x10000
ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}


class PcTestdev:
    """Port and MMIO device; ``set_isa_irq(irq, level)`` and ``set_gsi(pin, level)`` reach the I/O APIC."""

    def __init__(self, set_isa_irq: Callable[[int, bool], None], set_gsi: Callable[[int, bool], None]) -> None:
        self.set_isa_irq = set_isa_irq
        self.set_gsi = set_gsi
        self.lock = threading.Lock()
        self.data = 0
        self.iomem = bytearray(IOMEM_SIZE)

    @staticmethod
    def port_ranges() -> list[tuple[int, int]]:
        """(first port, count) of every port range the device claims."""
        return [(PORT_DATA, PORT_WIDTH), (PORT_FLUSH_PAGE, PORT_WIDTH), (PORT_DATA_BYTES, PORT_WIDTH),
                (IRQ_LINE_BASE, IRQ_LINES)]  # fmt: skip

    # -- port I/O ----------------------------------------------------------------------
    def pio_read(self, port: int, size: int) -> int:
        if PORT_FLUSH_PAGE <= port < PORT_FLUSH_PAGE + PORT_WIDTH or port >= IRQ_LINE_BASE:
            return 0
        shift = (port & 3) * 8
        if (port & 3) % size:
            return 0  # unaligned: QEMU rejects the access and the guest reads 0
        with self.lock:
            return (self.data >> shift) & ALL_ONES[size]

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port >= IRQ_LINE_BASE:
            for i in range(size):  # one byte per line: a wider OUT drives the next lines too
                line = port - IRQ_LINE_BASE + i
                level = bool((value >> (8 * i)) & 0xFF)
                if line < ISA_IRQS:
                    self.set_isa_irq(line, level)
                elif line < IRQ_LINES:
                    self.set_gsi(line, level)
            return
        if PORT_FLUSH_PAGE <= port < PORT_FLUSH_PAGE + PORT_WIDTH:
            return
        if (port & 3) % size:
            return
        shift = (port & 3) * 8
        mask = ALL_ONES[size] << shift
        with self.lock:
            self.data = (self.data & ~mask) | ((value << shift) & mask)

    # -- MMIO ------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        end = min(offset + size, IOMEM_SIZE)
        with self.lock:
            return int.from_bytes(self.iomem[offset:end], "little")

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        end = min(offset + size, IOMEM_SIZE)
        with self.lock:
            self.iomem[offset:end] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[: end - offset]
