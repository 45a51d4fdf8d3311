"""ELF program-header loading (ELF32 or ELF64), shared by the Multiboot and raw loaders."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from vsmtrace.vmm.memory import GuestMemory
from vsmtrace.vmm.vp import GuestMemoryError

ELF_MAGIC = b"\x7fELF"
PT_LOAD = "PT_LOAD"


class LoaderError(Exception):
    """The kernel image cannot be loaded; the message is for the user."""


@dataclass(frozen=True)
class LoadedImage:
    entry: int
    low: int  # lowest guest-physical address loaded
    high: int  # one past the highest (including BSS)
    elf_class: int  # 32 or 64


def load_elf(image: bytes, memory: GuestMemory, name: str) -> LoadedImage:
    """Copy every PT_LOAD segment to its physical address and zero-fill the BSS part."""
    if not image.startswith(ELF_MAGIC):
        raise LoaderError(f"{name}: not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(image))
        if elf["e_machine"] not in ("EM_386", "EM_X86_64"):
            raise LoaderError(f"{name}: ELF for {elf['e_machine']}, not x86")
        segments = [s for s in elf.iter_segments() if s["p_type"] == PT_LOAD and s["p_memsz"] > 0]
        if not segments:
            raise LoaderError(f"{name}: ELF has no loadable segments")
        low, high = 1 << 64, 0
        for seg in segments:
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            data = seg.data()
            if len(data) != filesz:
                raise LoaderError(
                    f"{name}: ELF file cut short: the segment loaded at {paddr:#x} needs file bytes "
                    f"{seg['p_offset']}..{seg['p_offset'] + filesz}, the file has {len(image)} bytes (a partial copy or download?)"
                )
            try:
                memory.write(paddr, data)
                if memsz > filesz:
                    memory.fill(paddr + filesz, memsz - filesz)
            except GuestMemoryError:
                raise LoaderError(
                    f"{name}: segment {paddr:#x}-{paddr + memsz:#x} does not fit in guest RAM "
                    f"({memory.size >> 20} MiB); use --memory"
                ) from None
            low, high = min(low, paddr), max(high, paddr + memsz)
        return LoadedImage(elf["e_entry"], low, high, elf.elfclass)
    except (ELFError, ValueError, struct.error):
        raise LoaderError(f"{name}: {describe_damage(image)}") from None


def describe_damage(image: bytes) -> str:
    """Why an ELF image the parser rejected cannot be loaded, in words (the parser's own text is cryptic)."""
    size = len(image)
    is64 = size > 4 and image[4] == 2
    header = 64 if is64 else 52
    if size < header:
        return f"ELF file cut short: {size} bytes, less than its {header}-byte ELF header (a partial copy or download?)"
    order = "<" if image[5] != 2 else ">"
    if is64:
        phoff, shoff = struct.unpack_from(order + "QQ", image, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", image, 54)
    else:
        phoff, shoff = struct.unpack_from(order + "II", image, 28)
        phentsize, phnum, shentsize, shnum = struct.unpack_from(order + "HHHH", image, 42)
    if phnum and phoff + phentsize * phnum > size:
        return (
            f"ELF file cut short: its {phnum} program headers end at byte {phoff + phentsize * phnum}, "
            f"but the file has only {size} bytes (a partial copy or download?)"
        )
    if shnum and shoff + shentsize * shnum > size:
        return (
            f"ELF file cut short: its section headers end at byte {shoff + shentsize * shnum}, "
            f"but the file has only {size} bytes (a partial copy or download?)"
        )
    return f"corrupt ELF file ({size} bytes): its headers are inconsistent"
