"""Minimal ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) describing vsmtrace's PC.

Why ACPI and not MP tables: Linux's Hyper-V guest code (``CONFIG_HYPERV``) depends
on ACPI, so a kernel that can use vsmtrace's Hyper-V has the ACPI table parser
anyway; MP tables would be a second description of the same machine.

What the tables say (ACPI 6.4 field layouts):

* FADT: a *hardware-reduced* platform (flags.HW_REDUCED_ACPI): no PM timer, no
  SCI, no GPEs, no 8259/PIT expected (Linux then installs no legacy PIC and no
  PIT timer, which vsmtrace does not have); no VGA; a reset
  register at I/O port 0xCF9 with value 6 (flags.RESET_REG_SUP), the PC's
  reset control register.
* DSDT: one device, COM1 (``PNP0501``: I/O 0x3F8-0x3FF, ISA IRQ 4). A
  hardware-reduced platform has no legacy IRQs (Linux allocates none for ISA
  IRQs 0-15 there), so a device's interrupt exists only if ACPI describes it:
  without this entry the serial console's interrupt is never routed and nothing
  written to the tty (every line of a user program) leaves the guest.
* MADT: the local APIC at 0xFEE00000, one enabled Processor Local APIC entry per
  VP (APIC ID = ACPI UID = VP index), and the I/O APIC at 0xFEC00000 with the PC's
  one interrupt source override (ISA IRQ 0 -> GSI 2); every other ISA IRQ n is GSI n.

The tables sit at 0xF0000, which the boot memory map reports as reserved (the
BIOS area) and where a legacy OS scans for the RSDP. PVH kernels also get the
RSDP's address in ``hvm_start_info.rsdp_paddr``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ACPI_BASE = 0xF0000
ACPI_AREA_SIZE = 0x10000
OEM_ID = b"VSMTRC"
OEM_TABLE_ID = b"VSMTRACE"
OEM_REVISION = 1
CREATOR_ID = b"VSMT"
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")  # signature, length, revision, checksum, OEM id/table id/revision, creator
HEADER_SIZE = HEADER.size  # 36
RSDP_V2_SIZE = 36
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR = 4
DSDT_REVISION = 2  # 64-bit AML integers
MADT_REVISION = 5
XSDT_REVISION = 1

# FADT flags and IA-PC boot architecture flags
FADT_WBINVD = 1 << 0
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
RESET_PORT = 0xCF9
RESET_VALUE = 0x06  # CF9: full reset (bit 2) of the CPU (bit 1)

LOCAL_APIC_ADDRESS = 0xFEE00000
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
ISA_IRQ0_GSI = 2  # the PC wiring: the PIT's IRQ 0 is I/O APIC pin 2 (vmm/devices/ioapic.py)
MADT_LAPIC_ENABLED = 1

# AML (ACPI 6.4 section 20) opcodes and the COM1 device's resources
AML_SCOPE = 0x10
AML_NAME = 0x08
AML_BUFFER = 0x11
AML_BYTE_PREFIX = 0x0A
AML_DWORD_PREFIX = 0x0C
AML_ONE = 0x01
AML_DEVICE = b"\x5b\x82"
COM1_PORT = 0x3F8
COM1_PORTS = 8
COM1_ISA_IRQ = 4
MAX_XAPIC_ID = 254


@dataclass(frozen=True)
class IoApicInfo:
    """An I/O APIC as the MADT lists it."""

    apic_id: int
    address: int
    gsi_base: int = 0


@dataclass(frozen=True)
class AcpiTables:
    """The tables laid out from ``base``: write ``blob`` there; the RSDP is at ``rsdp``."""

    base: int
    blob: bytes
    rsdp: int
    tables: dict[str, int]  # signature -> guest-physical address


def checksum_fix(data: bytearray, offset: int, length: int | None = None) -> None:
    """Set ``data[offset]`` so the bytes (all, or the first ``length``) sum to 0 mod 256."""
    end = len(data) if length is None else length
    data[offset] = 0
    data[offset] = (-sum(data[:end])) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    data = bytearray(HEADER.pack(signature, HEADER_SIZE + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION))
    data += body
    checksum_fix(data, 9)
    return bytes(data)


def _gas(space: int, bit_width: int, access: int, address: int) -> bytes:
    """Generic Address Structure (12 bytes)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


def fadt_body(dsdt: int) -> bytes:
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(40, "<I", dsdt)
    put(109, "<H", BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_MSI_NOT_SUPPORTED)
    put(112, "<I", FADT_WBINVD | FADT_RESET_REG_SUP | FADT_HW_REDUCED_ACPI)
    put(116, "<12s", _gas(GAS_SYSTEM_IO, 8, GAS_ACCESS_BYTE, RESET_PORT))
    put(128, "<B", RESET_VALUE)
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt)
    put(268, "<8s", b"VSMTRACE")  # hypervisor vendor identity
    return bytes(body)


def _pkg(body: bytes) -> bytes:
    """An AML PkgLength (counting itself) followed by ``body``."""
    n = len(body) + 1
    if n < 0x40:
        return bytes([n]) + body
    n += 1
    if n >= 0x1000:
        raise ValueError("AML package too long for a 2-byte PkgLength")
    return bytes([0x40 | (n & 0xF), n >> 4]) + body


def eisa_id(text: str) -> int:
    """The compressed EISA ID AML's EisaId() makes of e.g. "PNP0501" (as the DWORD stored)."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    big = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return int.from_bytes(big.to_bytes(4, "big"), "little")


def dsdt_body() -> bytes:
    """``Scope (\\_SB) { Device (COM1) { _HID PNP0501, _UID 1, _CRS: IO 0x3F8/8, IRQNoFlags {4} } }``."""
    resources = (
        struct.pack("<BBHHBB", 0x47, 1, COM1_PORT, COM1_PORT, 1, COM1_PORTS)  # I/O port, 16-bit decode
        + struct.pack("<BH", 0x22, 1 << COM1_ISA_IRQ)  # IRQ, no flags: edge, active high
        + bytes([0x79, 0])  # end tag (checksum 0: not checked)
    )
    crs = bytes([AML_NAME]) + b"_CRS" + bytes([AML_BUFFER]) + _pkg(bytes([AML_BYTE_PREFIX, len(resources)]) + resources)
    hid = bytes([AML_NAME]) + b"_HID" + bytes([AML_DWORD_PREFIX]) + struct.pack("<I", eisa_id("PNP0501"))
    uid = bytes([AML_NAME]) + b"_UID" + bytes([AML_ONE])
    device = AML_DEVICE + _pkg(b"COM1" + hid + uid + crs)
    return bytes([AML_SCOPE]) + _pkg(b"_SB_" + device)  # in the root scope: iasl compiles Scope (\_SB) the same


def madt_body(vp_count: int, ioapic: IoApicInfo | None) -> bytes:
    if vp_count - 1 > MAX_XAPIC_ID:
        raise ValueError(f"{vp_count} VPs do not fit in xAPIC MADT entries")
    body = bytearray(struct.pack("<II", LOCAL_APIC_ADDRESS, 0))  # flags: no PC-AT 8259 pair
    for vp in range(vp_count):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, vp, vp, MADT_LAPIC_ENABLED)
    if ioapic is not None:
        body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic.apic_id, 0, ioapic.address, ioapic.gsi_base)
        # bus 0 (ISA), source IRQ 0, GSI 2, flags 0 (bus-default polarity and trigger)
        body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, ISA_IRQ0_GSI, 0)
    return bytes(body)


def build_acpi_tables(vp_count: int, ioapic: IoApicInfo | None = None, base: int = ACPI_BASE) -> AcpiTables:
    """Lay out RSDP, XSDT, FADT, DSDT and MADT from ``base`` (each 16-byte aligned)."""
    blob = bytearray()
    where: dict[str, int] = {}

    def place(name: str, data: bytes) -> int:
        while len(blob) % 16:
            blob.append(0)
        addr = base + len(blob)
        blob.extend(data)
        where[name] = addr
        return addr

    rsdp_off = 0
    place("RSDP", bytes(RSDP_V2_SIZE))
    dsdt = place("DSDT", _table(b"DSDT", DSDT_REVISION, dsdt_body()))
    fadt = place("FACP", _table(b"FACP", FADT_REVISION, fadt_body(dsdt)))
    madt = place("APIC", _table(b"APIC", MADT_REVISION, madt_body(vp_count, ioapic)))
    xsdt = place("XSDT", _table(b"XSDT", XSDT_REVISION, struct.pack("<QQ", fadt, madt)))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_V2_SIZE, xsdt, 0, b"\0\0\0"))
    checksum_fix(rsdp, 8, 20)
    checksum_fix(rsdp, 32)
    blob[rsdp_off : rsdp_off + RSDP_V2_SIZE] = rsdp
    if len(blob) > ACPI_AREA_SIZE:
        raise ValueError("ACPI tables do not fit in the BIOS area")
    return AcpiTables(base, bytes(blob), where["RSDP"], where)
