"""isa-debug-exit at 0xF4: the guest asks the VMM to exit with ``(value << 1) | 1``.

This is QEMU's convention, so test kernels written for QEMU run unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

DEBUG_EXIT_PORT = 0xF4
DEBUG_EXIT_SIZE = 4


def exit_status(value: int) -> int:
    """The process exit status QEMU reports for a write of ``value``."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self.on_exit = on_exit  # (value written, exit status)

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.on_exit(value, exit_status(value))
