"""The guest SDK's build module: C/assembly guests compiled with the system gcc, cached by content.

:func:`build_guest` makes a Multiboot v1 ELF64 kernel (what the vsmtrace loader
and ``qemu -kernel`` take); :func:`build_raw64` an ELF64 without a Multiboot
header, entered by the VMM directly in long mode. Both link the guest's own
sources with the runtime in ``runtime/`` (boot code, serial, IDT, APIC, SMP,
Hyper-V and the two-VTL framework ``vsm.h``). Results are cached under
``<cache>/guests`` (cache: ``$VSMTRACE_CACHE``, else ``$XDG_CACHE_HOME/vsmtrace``
or ``~/.cache/vsmtrace``) keyed by a hash of every source, header, linker script,
flag and the compiler's identity, so a second build is a ``stat`` and parallel
processes never see half-written files (each build writes a temporary file and
renames it into place).

Users call :func:`build_file` (``from vsmtrace.guests.build import build_file``)
or ``vsmtrace guest build FILE.c``, which prints the built kernel's path; the
SDK's documentation is ``README.md`` beside this module.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vsmtrace.vmm.native import cache_dir as cache_base

SDK_DIR = Path(__file__).resolve().parent
RUNTIME_DIR = SDK_DIR / "runtime"
DEMO_SOURCE = SDK_DIR / "vbs_demo.c"
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
    """gcc or objcopy failed; the message carries the command and its stderr.

    ``summary`` is the one-line reason and ``output`` the tool's own messages,
    for a command line that shows gcc's errors and then one error line.
    """

    def __init__(self, summary: str, command: Sequence[str] = (), output: str = "") -> None:
        detail = f"\n$ {' '.join(command)}" if command else ""
        super().__init__(f"{summary}{detail}\n{output}" if command or output else summary)
        self.summary = summary
        self.output = output


def cache_dir() -> Path:
    """Where built guests live: ``<vsmtrace cache>/guests``."""
    path = cache_base() / "guests"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tool(name: str) -> str:
    """Absolute path of a build tool, with an error that says what is missing."""
    found = shutil.which(name)
    if not found:
        raise GuestBuildError(f"{name} not found on PATH: building a guest needs the system {name}")
    return found


def _tool_identity(path: str) -> str:
    """Cheap stand-in for the tool version: a compiler upgrade changes its file."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _runtime_sources(flavour: str) -> list[Path]:
    """Runtime files linked into every guest of this flavour, entry file first."""
    asm = [RUNTIME_DIR / _ENTRY_ASM[flavour], *(RUNTIME_DIR / a for a in _COMMON_ASM)]
    return asm + sorted(RUNTIME_DIR.glob("*.c"))


def _guest_sources(name: str, sources: Sequence[str | Path] | None, source_dir: Path) -> list[Path]:
    """The guest's own sources: ``<name>.c`` by default, relative paths resolved in ``source_dir``."""
    names = list(sources) if sources is not None else [f"{name}.c"]
    paths = [Path(s) if Path(s).is_absolute() else source_dir / s for s in names]
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
        raise GuestBuildError(f"{what} failed (exit {proc.returncode})", cmd, proc.stderr + proc.stdout)


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


def _build(
    name: str, flavour: str, sources: Sequence[str | Path] | None, cflags: Sequence[str], source_dir: Path | None
) -> Path:
    """Compile and link one guest (ELF64) unless an identical build is cached."""
    gcc = _tool("gcc")
    where = Path(source_dir) if source_dir is not None else Path.cwd()
    files = _guest_sources(name, sources, where) + _runtime_sources(flavour)
    flags = [*BASE_CFLAGS, *cflags, f"-I{RUNTIME_DIR}", f"-I{where}", *LDFLAGS, f"-Wl,-T,{LINKER_SCRIPT}"]
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
    sources: Sequence[str | Path] | None = None,
    cflags: Sequence[str] = (),
    elf32: bool = False,
    source_dir: Path | None = None,
) -> Path:
    """Build ``<source_dir>/<name>.c`` (or ``sources``) with the runtime as a Multiboot ELF64.

    ``source_dir`` (default: the current directory) resolves relative source paths
    and is on the include path, so a guest can keep its own headers beside it.

    ``elf32=True`` returns an ``objcopy -O elf32-i386`` copy instead: same bytes and
    addresses in an ELF32 container, because QEMU's ``-kernel`` refuses ELF64
    Multiboot kernels. It is a test-tool option for checking guests under QEMU.
    """
    elf64 = _build(name, "multiboot", sources, cflags, source_dir)
    if not elf32:
        return elf64
    objcopy = _tool("objcopy")
    dest = elf64.with_suffix(".elf32")
    if dest.is_file():
        return dest

    def convert(tmp: Path) -> None:
        _run([objcopy, "-O", "elf32-i386", str(elf64), str(tmp)], f"converting guest {name!r} to ELF32")

    return _atomic_output(dest, convert)


def build_raw64(
    name: str,
    *,
    sources: Sequence[str | Path] | None = None,
    cflags: Sequence[str] = (),
    source_dir: Path | None = None,
) -> Path:
    """Build a guest without a Multiboot header, to be entered in 64-bit long mode.

    The entry (runtime/raw64.S) assumes the VMM set up long mode with an identity
    map covering the image and a valid stack in RSP (vsmtrace's raw loader uses
    RSP=0x80000, RDI=0x2BADB002, RSI=boot info); it then installs its own stack,
    GDT and 4 GiB identity map, so the rest of the runtime behaves as in the
    Multiboot flavour.
    """
    return _build(name, "raw64", sources, cflags, source_dir)


def build_file(path: str | Path, *, raw64: bool = False, cflags: Sequence[str] = (), elf32: bool = False) -> Path:
    """Build one guest from its main C (or assembly) file, e.g. ``build_file("my_guest.c")``.

    The file's folder is the guest's source directory (its own headers are found
    there); the runtime and the VSM framework come from the SDK.
    """
    src = Path(path).resolve()
    if not src.is_file():
        raise GuestBuildError(f"guest source {path} does not exist")
    if raw64:
        return build_raw64(src.stem, sources=[src], cflags=cflags, source_dir=src.parent)
    return build_guest(src.stem, sources=[src], cflags=cflags, elf32=elf32, source_dir=src.parent)


def build_demo() -> Path:
    """The bundled VBS-style demo guest (``vbs_demo.c``), as ``vsmtrace demo`` runs it."""
    return build_guest("vbs_demo", sources=[DEMO_SOURCE], source_dir=SDK_DIR)
