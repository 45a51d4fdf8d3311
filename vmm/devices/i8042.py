"""Just enough of the 8042 keyboard controller for its reset line (ports 0x60 and 0x64).

Command 0xFE written to 0x64 pulses the CPU reset line: the machine resets. There is no
keyboard: the status register (0x64) reads 0 (output and input buffers empty, so a guest
waiting to send a command proceeds), the data port (0x60) reads 0, other commands and
data are ignored.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
CMD_PULSE_RESET = 0xFE


class I8042:
    def __init__(self, on_reset: Callable[[str], None]) -> None:
        self.on_reset = on_reset

    def pio_read(self, port: int, size: int) -> int:
        return 0

    def pio_write(self, port: int, size: int, value: int) -> None:
        if port == I8042_COMMAND_PORT and value & 0xFF == CMD_PULSE_RESET:
            self.on_reset("keyboard controller reset pulse (0xfe to port 0x64)")
