"""Every test guest builds with the system gcc into a well-formed kernel image.

No KVM needed: these tests check what the loader relies on (ELF64 x86-64
executable at 1 MiB, Multiboot header in the first 8 KiB with a valid checksum,
none in raw64 builds) and that the code avoids instructions KVM's emulator
lacks, so a broken guest fails here rather than as a confusing VMM error.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

MULTIBOOT_GUESTS = ["hello", "exitcode", "bootinfo", "smp", "apic_timer", "ipi", "ports", "fwcfg", "fault"]
RAW64_GUESTS = ["raw64"]
MB_MAGIC = 0x1BADB002
MB_SEARCH = 8192
# Mnemonics KVM's instruction emulator cannot handle (seen on this kind of host).
FORBIDDEN = ("cmpxchg16b", "xrstor", "xsave", "int3", "clac", "stac", "popcnt", "fwait", "endbr64")


from tests import guests as build  # noqa: E402  (the SDK, bound to guests/programs)

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs the system gcc")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build into a per-session cache so the test proves a cold build works."""
    cache = tmp_path_factory.getbasetemp() / "guest-cache"
    monkeypatch.setenv("VSMTRACE_CACHE", str(cache))


def _elf_header(data: bytes) -> dict[str, int]:
    """The ELF header fields the loader checks."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    ei_class, ei_data = data[4], data[5]
    e_type, e_machine, _ver, e_entry = struct.unpack_from("<HHIQ", data, 16) if ei_class == 2 else (0, 0, 0, 0)
    return {"class": ei_class, "data": ei_data, "type": e_type, "machine": e_machine, "entry": e_entry}


def _program_headers(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(type, offset, paddr, filesz, memsz) of each ELF64 program header."""
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    out = []
    for i in range(e_phnum):
        p_type, _flags, off, _vaddr, paddr, filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        out.append((p_type, off, paddr, filesz, memsz))
    return out


def _find_multiboot(data: bytes) -> int | None:
    """Offset of the Multiboot header as a loader searches for it, or None."""
    for off in range(0, min(len(data), MB_SEARCH) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MB_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


@pytest.mark.parametrize("name", MULTIBOOT_GUESTS)
def test_multiboot_guest_builds(name: str) -> None:
    path = build.build_guest(name)
    data = path.read_bytes()
    hdr = _elf_header(data)
    assert (hdr["class"], hdr["data"], hdr["type"], hdr["machine"]) == (2, 1, 2, 62), "want ELF64 LE EXEC x86-64"
    off = _find_multiboot(data)
    assert off is not None, "no Multiboot header with a valid checksum in the first 8 KiB"
    assert off % 4 == 0
    flags = struct.unpack_from("<I", data, off + 4)[0]
    assert flags & 0x2, "the header must request memory information"
    assert not flags & 0x10000, "ELF guests are loaded by program headers, no a.out kludge"
    loads = [p for p in _program_headers(data) if p[0] == 1]
    assert loads and min(p[2] for p in loads) == 0x100000, "guests load at 1 MiB"
    # the header's file offset lies in the first segment, so it is loaded too
    first = min(loads, key=lambda p: p[2])
    assert first[1] <= off < first[1] + first[3]
    assert first[2] <= hdr["entry"] < first[2] + first[3]


@pytest.mark.parametrize("name", RAW64_GUESTS)
def test_raw64_guest_builds(name: str) -> None:
    data = build.build_raw64(name).read_bytes()
    hdr = _elf_header(data)
    assert (hdr["class"], hdr["machine"], hdr["type"]) == (2, 62, 2)
    assert _find_multiboot(data) is None, "raw64 kernels must not carry a Multiboot header"
    assert hdr["entry"] >= 0x100000


def test_cache_reuses_and_keys_on_flags() -> None:
    first = build.build_guest("hello")
    mtime = first.stat().st_mtime_ns
    assert build.build_guest("hello") == first
    assert first.stat().st_mtime_ns == mtime, "a repeated build must come from the cache"
    assert build.build_guest("hello", cflags=["-DVSMTRACE_TEST_FLAG=1"]) != first


def test_build_error_carries_gcc_stderr(tmp_path: Path) -> None:
    bad = tmp_path / "broken.c"
    bad.write_text("int kmain(unsigned a, unsigned b) { return this_is_not_declared; }\n")
    with pytest.raises(build.GuestBuildError, match="this_is_not_declared"):
        build.build_guest("broken", sources=[str(bad)])


def test_missing_source_is_a_clear_error() -> None:
    with pytest.raises(build.GuestBuildError, match="does not exist"):
        build.build_guest("no_such_guest")


@pytest.mark.skipif(shutil.which("objcopy") is None, reason="needs objcopy")
def test_elf32_copy_for_qemu() -> None:
    data = build.build_guest("hello", elf32=True).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1, "want ELF32"
    assert struct.unpack_from("<H", data, 18)[0] == 3, "want EM_386"
    assert _find_multiboot(data) is not None


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.parametrize("name", MULTIBOOT_GUESTS + RAW64_GUESTS)
def test_no_instructions_kvm_cannot_emulate(name: str) -> None:
    path = build.build_raw64(name) if name in RAW64_GUESTS else build.build_guest(name)
    env = {**os.environ, "LC_ALL": "C"}
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True, env=env)
    assert asm.returncode == 0, asm.stderr
    bad = [line for line in asm.stdout.splitlines() if any(f"\t{m}" in line or f" {m} " in line for m in FORBIDDEN)]
    assert not bad, "instructions KVM's emulator lacks:\n" + "\n".join(bad[:20])
