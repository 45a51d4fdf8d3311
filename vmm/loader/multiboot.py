"""Multiboot v1 loading, as QEMU's ``-kernel`` does it, and raw 64-bit ELF kernels.

Multiboot: the header (magic 0x1BADB002) must sit 4-byte aligned in the first
8 KiB; segments come from the ELF program headers (or the a.out-kludge
addresses); the boot information structure carries memory sizes, the command
line, modules and a memory map. Entry is in 32-bit protected mode with EAX =
0x2BADB002 and EBX = the information structure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vsmtrace.vmm.loader.boot import BootMode, BootState, BootStrings
from vsmtrace.vmm.loader.elf import ELF_MAGIC, LoaderError, load_elf
from vsmtrace.vmm.memory import HIGH_RAM_BASE, PAGE_SIZE, GuestMemory

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_FLAG_PAGE_ALIGN = 1 << 0
MULTIBOOT_FLAG_MEMORY_INFO = 1 << 1
MULTIBOOT_FLAG_VIDEO_MODE = 1 << 2
MULTIBOOT_FLAG_AOUT_KLUDGE = 1 << 16

MBI_FLAG_MEM = 1 << 0
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9

MMAP_AVAILABLE = 1
MMAP_RESERVED = 2

# Where the boot information lives (below the usual 0x8000 AP trampoline page).
MBI_ADDR = 0x1000
MBI_SIZE = 0x80
MMAP_ADDR = 0x1100
MODS_ADDR = 0x1400
STRINGS_ADDR = 0x2000
STRINGS_END = 0x7000
LOWER_MEMORY_END = 0x9FC00  # 639 KiB: the EBDA follows
BIOS_AREA = 0xF0000
ONE_MIB = 0x100000
BOOTLOADER_NAME = "vsmtrace"

ELF_TYPE_EXEC = 2
ELF_TYPE_NAMES = {1: "relocatable object (ET_REL)", 3: "shared object or PIE program (ET_DYN)", 4: "core dump (ET_CORE)"}

# Raw 64-bit kernels: boot GDT and identity page tables (4 GiB with 2 MiB pages).
RAW_GDT_ADDR = 0x500
RAW_PML4_ADDR = 0x10000
RAW_PDPT_ADDR = 0x11000
RAW_PD_ADDR = 0x12000  # four PDs
RAW_STACK_TOP = 0x80000
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_LARGE = 1 << 7
GDT_NULL = 0
GDT_CODE64 = 0x00AF9A000000FFFF
GDT_DATA = 0x00CF92000000FFFF
GDT_CODE32 = 0x00CF9A000000FFFF


@dataclass(frozen=True)
class Module:
    path: Path
    string: str


@dataclass(frozen=True)
class MultibootHeader:
    offset: int
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_multiboot_header(image: bytes) -> MultibootHeader | None:
    for off in range(0, min(len(image), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            if flags & MULTIBOOT_FLAG_AOUT_KLUDGE:
                if off + 32 > len(image):
                    return None
                fields = struct.unpack_from("<5I", image, off + 12)
                return MultibootHeader(off, flags, *fields)
            return MultibootHeader(off, flags)
    return None


def _load_aout_kludge(image: bytes, hdr: MultibootHeader, memory: GuestMemory, name: str) -> tuple[int, int]:
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    end = hdr.load_end_addr or hdr.load_addr + (len(image) - file_start)
    data = image[file_start : file_start + (end - hdr.load_addr)]
    try:
        memory.write(hdr.load_addr, data)
        bss_end = hdr.bss_end_addr or end
        if bss_end > end:
            memory.fill(end, bss_end - end)
    except Exception:
        raise LoaderError(f"{name}: a.out-kludge image does not fit in guest RAM") from None
    return hdr.entry_addr, max(end, hdr.bss_end_addr)



def memory_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(base, length, type) entries describing guest RAM and the legacy holes."""
    entries = [
        (0, LOWER_MEMORY_END, MMAP_AVAILABLE),
        (LOWER_MEMORY_END, 0xA0000 - LOWER_MEMORY_END, MMAP_RESERVED),
        (BIOS_AREA, ONE_MIB - BIOS_AREA, MMAP_RESERVED),
        (ONE_MIB, memory.low_end - ONE_MIB, MMAP_AVAILABLE),
    ]
    for r in memory.ranges[1:]:
        entries.append((r.gpa, r.size, MMAP_AVAILABLE))
    return entries


def load_multiboot(
    path: Path, memory: GuestMemory, *, cmdline: str = "", modules: list[Module] | None = None
) -> BootState:
    """Load a Multiboot v1 kernel and write its boot information; returns the BSP state."""
    name = str(path)
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"cannot read kernel {name}: {exc.strerror}") from None
    hdr = find_multiboot_header(image)
    if hdr is None:
        if image.startswith(ELF_MAGIC):
            raise LoaderError(f"{name}: ELF without a Multiboot header (use a 64-bit ELF entry, or add one)")
        raise LoaderError(f"{name}: not an ELF file and no Multiboot header in its first 8 KiB")
    if hdr.flags & MULTIBOOT_FLAG_AOUT_KLUDGE and not image.startswith(ELF_MAGIC):
        entry, high = _load_aout_kludge(image, hdr, memory, name)
    else:
        loaded = load_elf(image, memory, name)
        entry, high = loaded.entry, loaded.high
    if entry >= 1 << 32:
        raise LoaderError(f"{name}: Multiboot entry point {entry:#x} is above 4 GiB")

    strings = BootStrings(memory, STRINGS_ADDR, STRINGS_END, "the boot information area")
    flags = MBI_FLAG_MEM | MBI_FLAG_CMDLINE | MBI_FLAG_MMAP | MBI_FLAG_LOADER_NAME
    cmdline_addr = strings.put(f"{name} {cmdline}".rstrip())  # QEMU passes "<kernel> <append>"
    loader_name = strings.put(BOOTLOADER_NAME)

    mods = modules or []
    mod_addr = (high + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    mod_entries = bytearray()
    for mod in mods:
        try:
            data = mod.path.read_bytes()
        except OSError as exc:
            raise LoaderError(f"cannot read module {mod.path}: {exc.strerror}") from None
        if mod_addr + len(data) > memory.low_end:
            raise LoaderError(f"module {mod.path} does not fit in guest RAM below 3 GiB; use --memory")
        memory.write(mod_addr, data)
        string = strings.put(mod.string)
        mod_entries += struct.pack("<IIII", mod_addr, mod_addr + len(data), string, 0)
        mod_addr = (mod_addr + len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if mods:
        flags |= MBI_FLAG_MODS
        memory.write(MODS_ADDR, bytes(mod_entries))

    mmap = bytearray()
    for base, length, kind in memory_map(memory):
        mmap += struct.pack("<IQQI", 20, base, length, kind)
    memory.write(MMAP_ADDR, bytes(mmap))

    mem_upper_kib = (memory.low_end - ONE_MIB) // 1024
    mbi = bytearray(MBI_SIZE)
    struct.pack_into("<IIII", mbi, 0, flags, LOWER_MEMORY_END // 1024, mem_upper_kib, 0)
    struct.pack_into("<III", mbi, 16, cmdline_addr, len(mods), MODS_ADDR if mods else 0)
    struct.pack_into("<II", mbi, 44, len(mmap), MMAP_ADDR)
    struct.pack_into("<I", mbi, 64, loader_name)
    memory.write(MBI_ADDR, bytes(mbi))
    return BootState(
        BootMode.PROTECTED32, entry, regs={"rax": MULTIBOOT_BOOTLOADER_MAGIC, "rbx": MBI_ADDR}, protocol="multiboot"
    )


def load_raw64(path: Path, memory: GuestMemory, *, cmdline: str = "") -> BootState:
    """Load a plain ELF64 kernel entered in long mode with identity-mapped 4 GiB.

    RSP = 0x80000 (a stack below 512 KiB), RSI = the Multiboot-style info
    structure with memory sizes and the command line, RDI = 0x2BADB002.
    """
    name = str(path)
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"cannot read kernel {name}: {exc.strerror}") from None
    if image.startswith(ELF_MAGIC) and len(image) >= 18:
        e_type = struct.unpack_from("<H", image, 16)[0]
        if e_type != ELF_TYPE_EXEC:  # a program, shared object or .o would be "loaded" at 0 and crash
            kind = ELF_TYPE_NAMES.get(e_type, f"type {e_type}")
            raise LoaderError(f"{name}: not a kernel: an ELF {kind} with no Multiboot header (kernels are ET_EXEC)")
    loaded = load_elf(image, memory, name)
    if loaded.elf_class != 64:
        raise LoaderError(f"{name}: a raw kernel must be ELF64 (ELF32 kernels need a Multiboot header)")
    gdt = struct.pack("<4Q", GDT_NULL, GDT_CODE64, GDT_DATA, GDT_CODE32)
    memory.write(RAW_GDT_ADDR, gdt)
    memory.write_u64(RAW_PML4_ADDR, RAW_PDPT_ADDR | PTE_PRESENT | PTE_WRITE)
    for i in range(4):
        memory.write_u64(RAW_PDPT_ADDR + 8 * i, (RAW_PD_ADDR + PAGE_SIZE * i) | PTE_PRESENT | PTE_WRITE)
    pds = bytearray(4 * PAGE_SIZE)
    for i in range(4 * 512):
        struct.pack_into("<Q", pds, 8 * i, (i << 21) | PTE_PRESENT | PTE_WRITE | PTE_LARGE)
    memory.write(RAW_PD_ADDR, bytes(pds))
    strings = BootStrings(memory, STRINGS_ADDR, STRINGS_END, "the boot information area")
    mbi = bytearray(MBI_SIZE)
    mem_upper_kib = (memory.low_end - ONE_MIB) // 1024
    struct.pack_into("<IIII", mbi, 0, MBI_FLAG_MEM | MBI_FLAG_CMDLINE, LOWER_MEMORY_END // 1024, mem_upper_kib, 0)
    struct.pack_into("<I", mbi, 16, strings.put(cmdline))
    memory.write(MBI_ADDR, bytes(mbi))
    return BootState(
        BootMode.LONG64,
        loaded.entry,
        regs={"rsp": RAW_STACK_TOP, "rdi": MULTIBOOT_BOOTLOADER_MAGIC, "rsi": MBI_ADDR},
        cr3=RAW_PML4_ADDR,
        gdt_base=RAW_GDT_ADDR,
        gdt_limit=len(gdt) - 1,
        protocol="raw64",
    )


__all__ = ["HIGH_RAM_BASE", "LoaderError", "Module", "load_multiboot", "load_raw64"]
