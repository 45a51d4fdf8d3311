"""Legacy PC ports a guest touches at boot and that need no behaviour.

The 8259 PIC pair is accepted (masks remembered, nothing delivered: interrupts
come from the local APIC), and port 0x80 (POST codes / I/O delay) is ignored.
"""

from __future__ import annotations

PIC_MASTER = 0x20
PIC_SLAVE = 0xA0
PIC_PORTS = 2
POST_PORT = 0x80


class Pic8259Stub:
    """Accepts ICW/OCW writes and remembers the mask register."""

    def __init__(self) -> None:
        self.masks = {PIC_MASTER: 0xFF, PIC_SLAVE: 0xFF}

    def pio_read(self, port: int, size: int) -> int:
        base = port & ~1
        if port & 1:
            return self.masks.get(base, 0xFF)
        return 0  # IRR/ISR: nothing pending

    def pio_write(self, port: int, size: int, value: int) -> None:
        base = port & ~1
        if port & 1:
            self.masks[base] = value & 0xFF


class Ignore:
    """Reads zero, swallows writes."""

    #: A write changes nothing, so a machine that records nothing may complete it without calling
    #: ``pio_write`` (``Machine.attach_fastpath``: answered in C inside KVM_RUN).
    writes_have_no_effect = True

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        return None
