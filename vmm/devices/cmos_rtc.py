"""MC146818 CMOS real-time clock at ports 0x70 (index) / 0x71 (data), reading the host's UTC time.

Why: Linux reads the wall clock from the RTC in ``timekeeping_init``, before it switches
``udelay`` to the TSC. With no RTC every read returns 0xFF, the update-in-progress bit
looks stuck, and the kernel's retry loop spins in its calibrated delay loop, which this
host's instruction emulator runs about a thousand times slower than hardware (16 s of a
boot, measured). The clock is read-only to the guest: writes to the time registers are
kept in CMOS RAM but the time registers always report the host's time (BCD, 24-hour,
never "update in progress"). Port reads are recorded, so replay sees the same values.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

RTC_INDEX_PORT = 0x70
RTC_PORT_COUNT = 2
CMOS_SIZE = 128
INDEX_MASK = 0x7F  # bit 7 of the index is the NMI mask

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
STATUS_A_DEFAULT = 0x26  # 32.768 kHz time base, 1024 Hz rate; bit 7 (update in progress) clear
STATUS_B_24H = 0x02  # 24-hour mode, BCD (bit 2 clear), no interrupts enabled
STATUS_D_VALID = 0x80  # valid RAM and time


def bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class CmosRtc:
    """Index/data register pair over 128 bytes of CMOS, with the time registers live."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self.index = 0
        self.lock = threading.Lock()
        self.ram = bytearray(CMOS_SIZE)
        self.ram[STATUS_A] = STATUS_A_DEFAULT
        self.ram[STATUS_B] = STATUS_B_24H
        self.ram[STATUS_D] = STATUS_D_VALID

    def _time_register(self, reg: int) -> int | None:
        if reg not in (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY):
            return None
        t = time.gmtime(self.now())
        value = {
            SECONDS: t.tm_sec % 60, MINUTES: t.tm_min, HOURS: t.tm_hour, WEEKDAY: (t.tm_wday + 1) % 7 + 1,
            DAY: t.tm_mday, MONTH: t.tm_mon, YEAR: t.tm_year % 100, CENTURY: t.tm_year // 100,
        }[reg]  # fmt: skip
        return bcd(value)

    def pio_read(self, port: int, size: int) -> int:
        with self.lock:
            if port == RTC_INDEX_PORT:
                return self.index
            reg = self.index
            live = self._time_register(reg)
            if live is not None:
                return live
            if reg == STATUS_C:
                return 0  # no interrupt flags: the RTC raises no interrupts here
            return self.ram[reg]

    def pio_write(self, port: int, size: int, value: int) -> None:
        with self.lock:
            if port == RTC_INDEX_PORT:
                self.index = value & INDEX_MASK
            elif self.index not in (STATUS_A, STATUS_B, STATUS_C, STATUS_D):  # the mode stays BCD, 24-hour
                self.ram[self.index] = value & 0xFF
