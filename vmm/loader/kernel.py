"""Which boot protocol a kernel image speaks: Multiboot v1, PVH, or a raw 64-bit ELF.

The order matters only for images that carry more than one: a Multiboot header
wins (vsmtrace's own guests), then the PVH note (Linux ``vmlinux``), then a plain
ELF64 entered in long mode.
"""

from __future__ import annotations

from pathlib import Path

from vsmtrace.vmm.loader.boot import BootState
from vsmtrace.vmm.loader.elf import ELF_MAGIC, LoaderError
from vsmtrace.vmm.loader.multiboot import MULTIBOOT_SEARCH, Module, find_multiboot_header, load_multiboot, load_raw64
from vsmtrace.vmm.loader.pvh import find_pvh_entry, load_pvh
from vsmtrace.vmm.memory import GuestMemory

ELFCLASS64 = 2


def load_kernel(
    path: Path, memory: GuestMemory, *, cmdline: str = "", modules: list[Module] | None = None, rsdp: int = 0
) -> BootState:
    """Load ``path`` by the protocol it supports and return the boot processor's state.

    ``rsdp`` (the ACPI RSDP's address) reaches the kernel only through PVH's start info;
    Multiboot kernels find the tables by scanning the BIOS area, as on a PC.
    """
    try:
        image = path.read_bytes()
    except OSError as exc:
        raise LoaderError(f"cannot read kernel {path}: {exc.strerror}") from None
    if find_multiboot_header(image[:MULTIBOOT_SEARCH]) is not None:
        return load_multiboot(path, memory, cmdline=cmdline, modules=modules)
    if find_pvh_entry(image) is not None:
        return load_pvh(path, memory, cmdline=cmdline, modules=modules, rsdp=rsdp, image=image)
    if image.startswith(ELF_MAGIC) and len(image) > 4 and image[4] == ELFCLASS64:
        if modules:
            raise LoaderError(f"{path}: modules (--initrd) need a Multiboot or PVH kernel")
        return load_raw64(path, memory, cmdline=cmdline)
    return load_multiboot(path, memory, cmdline=cmdline, modules=modules)  # raises the right error


__all__ = ["LoaderError", "Module", "load_kernel"]
