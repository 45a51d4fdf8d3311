"""Port-I/O and MMIO buses: map an address to the device that owns it.

Dispatch is a dict lookup per access, built once when devices are added, so
the run loop's port-I/O path costs one hash probe.
"""

from __future__ import annotations

import logging
from typing import Protocol

log = logging.getLogger("vsmtrace.devices")

ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


class PioDevice(Protocol):
    """A device on the port-I/O bus."""

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...


class MmioDevice(Protocol):
    """A device on the MMIO bus."""

    def mmio_read(self, offset: int, size: int) -> int: ...

    def mmio_write(self, offset: int, size: int, value: int) -> None: ...


class PioBus:
    """Ports → devices. Unclaimed ports read as all-ones and warn once per port."""

    def __init__(self) -> None:
        self.devices: dict[int, PioDevice] = {}
        self.warned: set[int] = set()

    def add(self, first: int, count: int, device: PioDevice) -> None:
        for port in range(first, first + count):
            if port in self.devices:
                raise ValueError(f"port {port:#x} already claimed by {self.devices[port]!r}")
            self.devices[port] = device

    def read(self, port: int, size: int) -> int:
        dev = self.devices.get(port)
        if dev is None:
            self._warn(port, "read")
            return ALL_ONES[size]
        return dev.pio_read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        dev = self.devices.get(port)
        if dev is None:
            self._warn(port, "write")
            return
        dev.pio_write(port, size, value)

    def _warn(self, port: int, what: str) -> None:
        if port not in self.warned:
            self.warned.add(port)
            log.warning("guest %s of unclaimed I/O port %#x (reads return all-ones)", what, port)


class MmioBus:
    """Guest-physical ranges → devices (ranges are few; a linear scan is fine)."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, MmioDevice]] = []

    def add(self, base: int, size: int, device: MmioDevice) -> None:
        self.ranges.append((base, size, device))

    def find(self, gpa: int) -> tuple[int, MmioDevice] | None:
        for base, size, dev in self.ranges:
            if base <= gpa < base + size:
                return base, dev
        return None
