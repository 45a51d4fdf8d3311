"""The CMOS RTC (vmm/devices/cmos_rtc.py): host UTC time in BCD, never "update in progress"."""

from __future__ import annotations

import calendar

from vsmtrace.vmm.devices.cmos_rtc import RTC_INDEX_PORT, CmosRtc

DATA = RTC_INDEX_PORT + 1


def read(rtc: CmosRtc, reg: int) -> int:
    rtc.pio_write(RTC_INDEX_PORT, 1, reg | 0x80)  # bit 7 (NMI mask) is ignored
    return rtc.pio_read(DATA, 1)


def test_time_registers_are_bcd_utc() -> None:
    t = calendar.timegm((2026, 12, 7, 23, 59, 58, 0, 0, 0))  # a Monday
    rtc = CmosRtc(now=lambda: t)
    regs = {name: read(rtc, reg) for name, reg in (("sec", 0), ("min", 2), ("hour", 4), ("dow", 6), ("day", 7), ("mon", 8), ("year", 9), ("cent", 0x32))}
    assert regs == {"sec": 0x58, "min": 0x59, "hour": 0x23, "dow": 2, "day": 0x07, "mon": 0x12, "year": 0x26, "cent": 0x20}
    assert read(rtc, 0x0A) & 0x80 == 0  # never update-in-progress
    assert read(rtc, 0x0B) == 0x02 and read(rtc, 0x0D) == 0x80  # BCD, 24-hour; valid


def test_ram_is_writable_but_the_mode_is_not() -> None:
    rtc = CmosRtc(now=lambda: 0)
    rtc.pio_write(RTC_INDEX_PORT, 1, 0x40)
    rtc.pio_write(DATA, 1, 0xA5)
    assert read(rtc, 0x40) == 0xA5
    rtc.pio_write(RTC_INDEX_PORT, 1, 0x0B)
    rtc.pio_write(DATA, 1, 0x06)  # binary mode: refused
    assert read(rtc, 0x0B) == 0x02
    assert read(rtc, 0) == 0x00
