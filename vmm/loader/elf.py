"""ELF program-header loading (ELF32 or ELF64), shared by the Multiboot and raw loaders."""

from __future__ import annotations

import io
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
                raise LoaderError(f"{name}: segment at {paddr:#x} is truncated in the file")
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
    except ELFError as exc:
        raise LoaderError(f"{name}: malformed ELF: {exc}") from None
