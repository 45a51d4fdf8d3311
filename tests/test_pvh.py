"""PVH direct boot (vmm/loader/pvh.py) and the ACPI tables (vmm/firmware/acpi.py).

A runtime guest built as a PVH kernel (guests/programs/pvh.c + pvh_note.S, no
Multiboot header) prints the hvm_start_info it was handed and walks the ACPI
tables from rsdp_paddr, checking every checksum itself.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from vsmtrace.vmm.firmware.acpi import ACPI_BASE, IoApicInfo, build_acpi_tables, dsdt_body, eisa_id
from vsmtrace.vmm.loader.elf import LoaderError
from vsmtrace.vmm.loader.kernel import load_kernel
from vsmtrace.vmm.loader.multiboot import Module
from vsmtrace.vmm.loader.pvh import HVM_START_MAGIC, START_INFO, START_INFO_ADDR, find_pvh_entry, load_pvh
from vsmtrace.vmm.memory import GuestMemory

from tests.conftest import build_guest, run_vsmtrace


def pvh_guest() -> Path:
    return build_guest("pvh", sources=["pvh.c", "pvh_note.S"], cflags=["-DGUEST_NO_MULTIBOOT_HEADER"])


def test_note_gives_the_entry_and_only_pvh_kernels_have_one() -> None:
    pvh = pvh_guest().read_bytes()
    found = find_pvh_entry(pvh)
    assert found is not None and found.entry == 0x100000  # the runtime's _start
    assert find_pvh_entry(build_guest("hello").read_bytes()) is None  # Multiboot guest: no note
    assert find_pvh_entry(b"not an elf at all") is None
    assert find_pvh_entry(pvh[:200]) is None  # truncated: no crash, no note


def test_start_info_in_memory() -> None:
    memory = GuestMemory(64)
    try:
        initrd = pvh_guest().parent / "pvh-test-initrd.bin"
        initrd.write_bytes(b"\x01\x02initrd")
        boot = load_pvh(pvh_guest(), memory, cmdline="a=b", modules=[Module(initrd, "rd")], rsdp=0xF0000)
        assert boot.entry == 0x100000 and boot.regs == {"rbx": START_INFO_ADDR}
        magic, version, flags, nmods, modlist, cmdline, rsdp, memmap, nmap, _ = START_INFO.unpack(
            memory.read(START_INFO_ADDR, START_INFO.size)
        )
        assert (magic, version, flags, nmods, rsdp) == (HVM_START_MAGIC, 1, 0, 1, 0xF0000)
        assert memory.read(cmdline, 4) == b"a=b\0"
        paddr, size, _, _ = struct.unpack("<QQQQ", memory.read(modlist, 32))
        assert size == 8 and memory.read(paddr, 8) == b"\x01\x02initrd" and paddr % 4096 == 0
        entries = [struct.unpack("<QQII", memory.read(memmap + 24 * i, 24)) for i in range(nmap)]
        assert entries[-1][:3] == (0x100000, 63 << 20, 1)
    finally:
        memory.close()


def test_loader_errors_are_one_line(tmp_path: Path) -> None:
    memory = GuestMemory(8)
    try:
        with pytest.raises(LoaderError, match="not a PVH kernel"):
            load_pvh(build_guest("hello"), memory)
        with pytest.raises(LoaderError, match="cannot read initrd"):
            load_kernel(pvh_guest(), memory, modules=[Module(tmp_path / "missing", "x")])
        big = tmp_path / "big.img"
        big.write_bytes(bytes(8 << 20))
        with pytest.raises(LoaderError, match=r"does not fit in guest RAM below 3 GiB; use --memory"):
            load_kernel(pvh_guest(), memory, modules=[Module(big, "x")])
    finally:
        memory.close()


def test_acpi_tables_checksum_and_list_every_vp() -> None:
    tables = build_acpi_tables(3, IoApicInfo(3, 0xFEC00000, 0))
    blob = tables.blob
    assert tables.rsdp == ACPI_BASE and blob[:8] == b"RSD PTR "
    assert sum(blob[:20]) % 256 == 0 and sum(blob[:36]) % 256 == 0
    for sig, addr in tables.tables.items():
        if sig == "RSDP":
            continue
        off = addr - ACPI_BASE
        assert blob[off : off + 4] == sig.encode()
        length = struct.unpack_from("<I", blob, off + 4)[0]
        assert sum(blob[off : off + length]) % 256 == 0, sig
    madt = tables.tables["APIC"] - ACPI_BASE
    length = struct.unpack_from("<I", blob, madt + 4)[0]
    body = blob[madt + 44 : madt + length]
    kinds = []
    while body:
        kinds.append((body[0], body[2], body[3]))
        body = body[body[1] :]
    assert kinds == [(0, 0, 0), (0, 1, 1), (0, 2, 2), (1, 3, 0), (2, 0, 0)]
    with pytest.raises(ValueError):
        build_acpi_tables(300)


def test_dsdt_describes_com1_with_its_irq() -> None:
    """The AML of Scope (\\_SB) { Device (COM1) { ... } }, byte for byte as iasl compiles it."""
    assert eisa_id("PNP0501") == 0x0105D041 and eisa_id("PNP0A03") == 0x030AD041  # as in every PC's DSDT
    aml = dsdt_body()
    assert aml == bytes.fromhex(
        "10 32 5f53425f"  # Scope, PkgLength 50, _SB_ (the table is in the root scope)
        " 5b82 2b 434f4d31"  # Device, PkgLength 43, COM1
        " 08 5f484944 0c 41d00501"  # Name (_HID, EisaId ("PNP0501"))
        " 08 5f554944 01"  # Name (_UID, One)
        " 08 5f435253 11 10 0a 0d"  # Name (_CRS, Buffer (13) {
        " 47 01 f803 f803 01 08"  # IO (Decode16, 0x3F8, 0x3F8, 1, 8)
        " 22 1000"  # IRQNoFlags () {4}
        " 79 00"  # end tag })
    )


EXPECTED_ACPI = [
    "rsdp=0xf0000",
    "acpi RSDP revision=2 checksum ok extended ok",
    "acpi XSDT length=52 checksum ok",
    "acpi FACP length=276 checksum ok",
    "fadt flags=0x100401 boot_arch=0xc reset=1:0xcf9 value=0x6",
    "acpi DSDT length=87 checksum ok",
]


@pytest.mark.kvm
@pytest.mark.parametrize("cpus", [1, 2])
def test_pvh_guest_sees_start_info_and_acpi(tmp_path: Path, cpus: int) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"initrd-bytes\x00\xff" * 100)
    r = run_vsmtrace(
        ["run", "--timeout", "60", "--smp", str(cpus), "--memory", "128", "--initrd", str(initrd),
         "--append", "console=ttyS0 x=1", str(pvh_guest())]
    )  # fmt: skip
    assert r.status == 1, r.stdout + r.stderr
    out = r.stdout.splitlines()
    assert out[:4] == [
        "pvh magic=0x336ec578 version=1 flags=0x0 eax=0x0",
        "cmdline: console=ttyS0 x=1",
        "modules: 1",
        f"module 0: 1400 bytes, cmdline '{initrd}', first bytes 'initrd-bytes..in'",
    ]
    assert out[4:9] == [
        "memmap entries: 4",
        "memmap 0: addr=0x0 size=0x9fc00 type=1",
        "memmap 1: addr=0x9fc00 size=0x400 type=2",
        "memmap 2: addr=0xf0000 size=0x10000 type=2",
        "memmap 3: addr=0x100000 size=0x7f00000 type=1",
    ]
    assert out[9:15] == EXPECTED_ACPI
    madt = out[15:]
    assert madt[0].startswith("acpi APIC length=") and madt[0].endswith("checksum ok")
    assert madt[1:] == [f"madt lapic uid={i} id={i} flags=1" for i in range(cpus)] + [
        "madt ioapic id=0 address=0xfec00000 gsi=0",
        "madt override bus=0 irq=0 gsi=2 flags=0x0",
        "pvh done",
    ]
