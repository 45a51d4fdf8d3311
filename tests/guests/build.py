"""Build the C/assembly test guests with the system gcc, cached by content.

Tests call :func:`build_guest` (a Multiboot v1 ELF64 kernel, what the vsmtrace
loader and ``-kernel`` take) or :func:`build_raw64` (an ELF64 without a Multiboot
header, entered by the VMM directly in long mode). Results are cached under
``$VSMTRACE_CACHE`` (default ``~/.cache/vsmtrace/guests/``) keyed by a hash of
every source, header, linker script, flag and the compiler's identity, so a
second build is a ``stat`` and parallel test processes never see half-written
files (each build writes a temporary file and renames it into place).

Run ``python tests/guests/build.py NAME [--raw64] [--elf32] [--cflag=-DX]...`` to
print the path of a built guest (handy for QEMU checks).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = GUESTS_DIR / "runtime"
LINKER_SCRIPT = RUNTIME_DIR / "guest.ld"

# Assembly shared by both flavours; the entry file decides the flavour.
_COMMON_ASM = ("common.S", "isr.S")
_ENTRY_ASM = {"multiboot": "boot.S", "raw64": "raw64.S"}

# -mgeneral-regs-only keeps SSE out (no FPU/xsave state to worry about);
# -fcf-protection=none keeps endbr64 out (KVM's instruction emulator lacks it).
BASE_CFLAGS: tuple[str, ...] = (
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-mcmodel=small",
    "-nostdlib",
    "-fno-stack-protector",
    "-O2",
    "-march=x86-64",
    "-mtune=generic",
    "-mgeneral-regs-only",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-fcf-protection=none",
    "-fno-jump-tables",
    "-Wall",
    "-Wextra",
    "-Werror=implicit-function-declaration",
    "-Werror=return-type",
    "-std=gnu11",
)
LDFLAGS: tuple[str, ...] = (
    "-static",
    "-Wl,-z,max-page-size=0x1000",
    "-Wl,--build-id=none",
    "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
)


class GuestBuildError(RuntimeError):
    """gcc or objcopy failed; the message carries the command and its stderr."""


def cache_dir() -> Path:
    """Where built guests live: ``$VSMTRACE_CACHE`` or ``~/.cache/vsmtrace/guests``."""
    env = os.environ.get("VSMTRACE_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "vsmtrace" / "guests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tool(name: str) -> str:
    """Absolute path of a build tool, with an error that says what is missing."""
    found = shutil.which(name)
    if not found:
        raise GuestBuildError(f"{name} not found on PATH: test guests need the system {name}")
    return found


def _tool_identity(path: str) -> str:
    """Cheap stand-in for the tool version: a compiler upgrade changes its file."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _runtime_sources(flavour: str) -> list[Path]:
    """Runtime files linked into every guest of this flavour, entry file first."""
    asm = [RUNTIME_DIR / _ENTRY_ASM[flavour], *(RUNTIME_DIR / a for a in _COMMON_ASM)]
    return asm + sorted(RUNTIME_DIR.glob("*.c"))


def _guest_sources(name: str, sources: Sequence[str] | None) -> list[Path]:
    """The guest's own sources: ``<name>.c`` by default, relative paths resolved in tests/guests."""
    names = list(sources) if sources is not None else [f"{name}.c"]
    paths = [Path(s) if Path(s).is_absolute() else GUESTS_DIR / s for s in names]
    for p in paths:
        if not p.is_file():
            raise GuestBuildError(f"guest source {p} does not exist")
    return paths


def _cache_key(files: Iterable[Path], flags: Sequence[str], tools: Sequence[str]) -> str:
    """Hash of everything that can change the output, so stale builds are impossible."""
    h = hashlib.sha256()
    headers = {p for f in files for p in f.parent.glob("*.h")} | set(RUNTIME_DIR.glob("*.h"))
    for p in [*files, *sorted(headers), LINKER_SCRIPT]:
        h.update(str(p).encode() + b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    for item in [*flags, *(_tool_identity(t) for t in tools)]:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:20]


def _run(cmd: list[str], what: str) -> None:
    """Run a build command; failures raise with the full stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GuestBuildError(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{proc.stderr}{proc.stdout}")


def _atomic_output(dest: Path, produce: Callable[[Path], None]) -> Path:
    """Let ``produce(tmp)`` write a temp file beside dest, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        produce(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _build(name: str, flavour: str, sources: Sequence[str] | None, cflags: Sequence[str]) -> Path:
    """Compile and link one guest (ELF64) unless an identical build is cached."""
    gcc = _tool("gcc")
    files = _guest_sources(name, sources) + _runtime_sources(flavour)
    flags = [*BASE_CFLAGS, *cflags, f"-I{RUNTIME_DIR}", f"-I{GUESTS_DIR}", *LDFLAGS, f"-Wl,-T,{LINKER_SCRIPT}"]
    key = _cache_key(files, [flavour, *flags], [gcc])
    dest = cache_dir() / f"{name}-{flavour}-{key}.elf"
    if dest.is_file():
        return dest

    def compile_to(tmp: Path) -> None:
        _run([gcc, *flags, "-o", str(tmp), *map(str, files)], f"building guest {name!r} ({flavour})")

    return _atomic_output(dest, compile_to)


def build_guest(
    name: str,
    *,
    sources: Sequence[str] | None = None,
    cflags: Sequence[str] = (),
    elf32: bool = False,
) -> Path:
    """Build ``tests/guests/<name>.c`` (or ``sources``) with the runtime as a Multiboot ELF64.

    ``elf32=True`` returns an ``objcopy -O elf32-i386`` copy instead: same bytes and
    addresses in an ELF32 container, because QEMU's ``-kernel`` refuses ELF64
    Multiboot kernels. It is a test-tool option for checking guests under QEMU.
    """
    elf64 = _build(name, "multiboot", sources, cflags)
    if not elf32:
        return elf64
    objcopy = _tool("objcopy")
    dest = elf64.with_suffix(".elf32")
    if dest.is_file():
        return dest

    def convert(tmp: Path) -> None:
        _run([objcopy, "-O", "elf32-i386", str(elf64), str(tmp)], f"converting guest {name!r} to ELF32")

    return _atomic_output(dest, convert)


def build_raw64(name: str, *, sources: Sequence[str] | None = None, cflags: Sequence[str] = ()) -> Path:
    """Build a guest without a Multiboot header, to be entered in 64-bit long mode.

    The entry (runtime/raw64.S) assumes the VMM set up long mode with an identity
    map covering the image and a valid stack in RSP (vsmtrace's raw loader uses
    RSP=0x80000, RDI=0x2BADB002, RSI=boot info); it then installs its own stack,
    GDT and 4 GiB identity map, so the rest of the runtime behaves as in the
    Multiboot flavour.
    """
    return _build(name, "raw64", sources, cflags)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: build one guest and print its path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--raw64", action="store_true", help="build without a Multiboot header")
    ap.add_argument("--elf32", action="store_true", help="ELF32 copy for QEMU -kernel")
    ap.add_argument("--cflag", action="append", default=[], help="extra compiler flag (repeatable)")
    args = ap.parse_args(argv)
    try:
        if args.raw64:
            path = build_raw64(args.name, cflags=args.cflag)
        else:
            path = build_guest(args.name, cflags=args.cflag, elf32=args.elf32)
    except GuestBuildError as e:
        print(e, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
