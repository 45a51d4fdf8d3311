"""Guest RAM: one memfd, mapped once into the VMM and into every VTL's KVM VM.

All VMM accesses to guest-physical memory go through :class:`GuestMemory`,
which bounds-checks them. Per-VTL views (protections) are layered on top by
``vmm/vsm``; this module only knows where RAM is.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from vsmtrace.vmm.vp import GuestMemoryError

MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096
PAGE_SHIFT = 12

# RAM above this stays below the 32-bit device hole (LAPIC at 0xFEE00000 etc.)
LOW_RAM_LIMIT = 3 * GiB
HIGH_RAM_BASE = 4 * GiB
# A generous cap; the real limit is what the host can back.
MAX_MEMORY_MIB = 64 * 1024


@dataclass(frozen=True)
class RamRange:
    """A run of guest-physical RAM backed by ``memfd[offset : offset + size]``."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_layout(size: int) -> list[RamRange]:
    """RAM below 3 GiB, the rest (if any) from 4 GiB, as a PC does."""
    low = min(size, LOW_RAM_LIMIT)
    ranges = [RamRange(0, low, 0)]
    if size > low:
        ranges.append(RamRange(HIGH_RAM_BASE, size - low, low))
    return ranges


class GuestMemory:
    """The guest's RAM and bounds-checked guest-physical accessors."""

    def __init__(self, size_mib: int) -> None:
        if size_mib < 2:
            raise ValueError(f"memory must be at least 2 MiB, got {size_mib} MiB")
        if size_mib > MAX_MEMORY_MIB:
            raise ValueError(f"memory {size_mib} MiB is more than vsmtrace supports ({MAX_MEMORY_MIB} MiB)")
        self.size = size_mib * MiB
        self.fd = os.memfd_create("vsmtrace-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(self.fd)
            raise ValueError(f"cannot allocate {size_mib} MiB of guest memory: {exc.strerror}") from None
        self.ranges = ram_layout(self.size)
        self._view = memoryview(self.map)

    @property
    def low_end(self) -> int:
        return self.ranges[0].end

    def host_address(self) -> int:
        """Address of the mapping in this process, for KVM memslots."""
        from vsmtrace.vmm.kvm.system import ffi

        return int(ffi.cast("uintptr_t", ffi.from_buffer(self.map)))

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return any(r.gpa <= gpa and gpa + size <= r.end for r in self.ranges)

    def _offset(self, gpa: int, size: int) -> int:
        for r in self.ranges:
            if r.gpa <= gpa and gpa + size <= r.end:
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError(gpa, size)

    def host_address_of(self, gpa: int, size: int) -> int:
        """Address in this process of ``[gpa, gpa + size)`` (GuestMemoryError unless it is RAM), for C code."""
        return self.host_address() + self._offset(gpa, size)

    def read(self, gpa: int, size: int) -> bytes:
        off = self._offset(gpa, size)
        return bytes(self._view[off : off + size])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self._offset(gpa, len(data))
        self._view[off : off + len(data)] = data

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        off = self._offset(gpa, size)
        self._view[off : off + size] = bytes([byte]) * size

    def read_u8(self, gpa: int) -> int:
        return self._view[self._offset(gpa, 1)]

    def read_u16(self, gpa: int) -> int:
        return struct.unpack_from("<H", self._view, self._offset(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self._view, self._offset(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self._view, self._offset(gpa, 8))[0]

    def write_u8(self, gpa: int, value: int) -> None:
        self._view[self._offset(gpa, 1)] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self._view, self._offset(gpa, 2), value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self._view, self._offset(gpa, 4), value & 0xFFFFFFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self._view, self._offset(gpa, 8), value & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        self._view.release()
        try:
            self.map.close()
        except BufferError:
            pass  # a cffi buffer still references the mapping; the process exit frees it
        os.close(self.fd)
