"""QEMU's Hyper-V test device (``-device hyperv-testdev``): one 32-bit control port at 0x3000.

The guest writes ``conn_id << 24 | cmd << 16 | vp << 8 | sint``; what the command does to
the SynIC is Hyper-V emulation (``vmm/hyperv/test_device.py``), run as a recorded
emulation entry so that replay repeats it. This file is only the port: a 32-bit OUT
hands the word over; other sizes are ignored and reads return 0 (as QEMU's).
"""

from __future__ import annotations

from collections.abc import Callable

HYPERV_TESTDEV_PORT = 0x3000
HYPERV_TESTDEV_PORT_COUNT = 4
COMMAND_SIZE = 4


class HypervTestdev:
    def __init__(self, on_command: Callable[[int], None]) -> None:
        self.on_command = on_command

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port == HYPERV_TESTDEV_PORT and size == COMMAND_SIZE:
            self.on_command(value)
