"""PVH direct boot of an ELF kernel (the x86/HVM direct boot ABI), as ``qemu -kernel vmlinux`` does.

A kernel built with ``CONFIG_PVH`` carries the Xen ELF note
``XEN_ELFNOTE_PHYS32_ENTRY`` (type 0x12, name "Xen"): the physical address of a
32-bit entry point. The loader copies every PT_LOAD segment to its ``p_paddr``
(Linux's per-CPU segment has ``p_vaddr`` 0, so virtual addresses are useless
here), writes a ``struct hvm_start_info`` (version 1: command line, modules,
an E820-style memory map, the ACPI RSDP) and enters the kernel in flat 32-bit
protected mode with paging off and EBX pointing at that structure.

Layout (all below 1 MiB, in RAM the memory map reports as usable but inside the
first 64 KiB, which Linux never hands out): start info at 0x1000, module list
at 0x1100, memory map at 0x1400, strings (command line, module names) from
0x2000. Module 0 (Linux: the initrd) is placed page aligned after the kernel.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from vsmtrace.vmm.loader.boot import BootMode, BootState, BootStrings
from vsmtrace.vmm.loader.elf import ELF_MAGIC, LoaderError, load_elf
from vsmtrace.vmm.loader.multiboot import Module, memory_map
from vsmtrace.vmm.memory import PAGE_SIZE, GuestMemory

XEN_NOTE_NAME = "Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 0x12

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
# struct hvm_start_info: magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr,
# rsdp_paddr, memmap_paddr, memmap_entries, reserved
START_INFO = struct.Struct("<IIIIQQQQII")
MODLIST_ENTRY = struct.Struct("<QQQQ")  # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type (E820), reserved

START_INFO_ADDR = 0x1000
MODLIST_ADDR = 0x1100
MEMMAP_ADDR = 0x1400
STRINGS_ADDR = 0x2000
STRINGS_END = 0x7000
MAX_MODULES = (MEMMAP_ADDR - MODLIST_ADDR) // MODLIST_ENTRY.size
MAX_MEMMAP = (STRINGS_ADDR - MEMMAP_ADDR) // MEMMAP_ENTRY.size


@dataclass(frozen=True)
class PvhImage:
    """What the note scan found: the 32-bit physical entry point."""

    entry: int


def find_pvh_entry(image: bytes) -> PvhImage | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY of an ELF image, or None if it has none (or is not ELF)."""
    if not image.startswith(ELF_MAGIC):
        return None
    try:
        elf = ELFFile(io.BytesIO(image))
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():
                if note["n_name"] != XEN_NOTE_NAME or note["n_type"] != XEN_ELFNOTE_PHYS32_ENTRY:
                    continue
                desc = note["n_desc"]
                raw = desc if isinstance(desc, bytes) else bytes(desc, "latin-1")
                if len(raw) not in (4, 8):
                    return None
                return PvhImage(int.from_bytes(raw, "little"))
    except (ELFError, ValueError, struct.error):
        return None
    return None



def load_pvh(
    path: Path,
    memory: GuestMemory,
    *,
    cmdline: str = "",
    modules: list[Module] | None = None,
    rsdp: int = 0,
    image: bytes | None = None,
) -> BootState:
    """Load a PVH kernel and write its ``hvm_start_info``; returns the boot processor's state.

    ``rsdp`` is the guest-physical address of the ACPI RSDP (0: no ACPI tables).
    Unlike Multiboot, the command line is passed as given (no kernel path in front).
    """
    name = str(path)
    if image is None:
        try:
            image = path.read_bytes()
        except OSError as exc:
            raise LoaderError(f"cannot read kernel {name}: {exc.strerror}") from None
    found = find_pvh_entry(image)
    if found is None:
        raise LoaderError(f"{name}: no XEN_ELFNOTE_PHYS32_ENTRY note (not a PVH kernel)")
    if found.entry >= 1 << 32:
        raise LoaderError(f"{name}: PVH entry point {found.entry:#x} is above 4 GiB")
    loaded = load_elf(image, memory, name)
    if not loaded.low <= found.entry < loaded.high:
        raise LoaderError(f"{name}: PVH entry point {found.entry:#x} is outside the loaded image")

    strings = BootStrings(memory, STRINGS_ADDR, STRINGS_END, "the PVH boot area (20 KiB)")
    cmdline_addr = strings.put(cmdline)
    mods = modules or []
    if len(mods) > MAX_MODULES:
        raise LoaderError(f"at most {MAX_MODULES} modules (--initrd) fit in the PVH module list")
    mod_addr = (loaded.high + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    modlist = bytearray()
    for mod in mods:
        try:
            data = mod.path.read_bytes()
        except OSError as exc:
            raise LoaderError(f"cannot read initrd {mod.path}: {exc.strerror}") from None
        if mod_addr + len(data) > memory.low_end:
            raise LoaderError(f"initrd {mod.path} ({len(data)} bytes) does not fit in guest RAM below 3 GiB; use --memory")
        memory.write(mod_addr, data)
        modlist += MODLIST_ENTRY.pack(mod_addr, len(data), strings.put(mod.string), 0)
        mod_addr = (mod_addr + len(data) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    if modlist:
        memory.write(MODLIST_ADDR, bytes(modlist))

    entries = memory_map(memory)
    if len(entries) > MAX_MEMMAP:
        raise LoaderError("the guest memory map has too many entries for the PVH boot area")
    memmap = b"".join(MEMMAP_ENTRY.pack(base, length, kind, 0) for base, length, kind in entries)
    memory.write(MEMMAP_ADDR, memmap)

    info = START_INFO.pack(
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,
        len(mods),
        MODLIST_ADDR if mods else 0,
        cmdline_addr,
        rsdp,
        MEMMAP_ADDR,
        len(entries),
        0,
    )
    memory.write(START_INFO_ADDR, info)
    return BootState(BootMode.PROTECTED32, found.entry, regs={"rbx": START_INFO_ADDR}, protocol="pvh")


__all__ = ["HVM_START_MAGIC", "PvhImage", "find_pvh_entry", "load_pvh"]
