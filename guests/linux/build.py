"""Build the vsmtrace Linux guest: Debian's linux-source-6.1 as a PVH vmlinux, and its initramfs.

What goes in (all in this folder, see docs/linux-guest.md):

* ``vsmtrace.config``: the config fragment merged on top of ``make tinyconfig``;
* ``syscall-fault.patch``: the one host workaround in the kernel (a SYSCALL that
  did not leave user mode is run as the system call it was);
* ``init.c``: the only user program, built ``gcc -static -nostdlib`` into a newc
  cpio archive with ``/dev/console``, ``/proc`` and ``/sys``.

The kernel is built once per (linux-source version, fragment, patch, this
script's recipe, gcc) into ``<vsmtrace cache>/linux/<key>/vmlinux``; the build
runs in a temporary directory beside it and is renamed into place, under a lock,
so concurrent callers wait for one build instead of starting two. If
``/usr/src/linux-source-6.1.tar.xz`` is missing and we are root, the package is
installed with apt-get (other users get the command to run).

``python -m vsmtrace.guests.linux.build`` builds what is missing and prints the
paths of ``vmlinux`` and ``initramfs.cpio``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vsmtrace.vmm.native import cache_dir as cache_base

HERE = Path(__file__).resolve().parent
CONFIG_FRAGMENT = HERE / "vsmtrace.config"
PATCH = HERE / "syscall-fault.patch"
INIT_SOURCE = HERE / "init.c"
#: Bench-only: bench/linux builds a variant of the same kernel with this patch too, so
#: that QEMU, which cannot complete the INT3 self-test's int3 on a host whose KVM does
#: not emulate it, boots the same kernel as vsmtrace (docs/linux-guest.md, "Figures").
#: CI and the tests never build it.
QEMU_PEER_PATCH = HERE / "bench-skip-int3-selftest.patch"
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_PACKAGES = (SOURCE_PACKAGE, "bc", "bison", "flex", "libelf-dev", "cpio", "xz-utils", "make", "gcc", "patch")
RECIPE_VERSION = "1"  # bump when the steps below change what comes out

#: The kernel command line the guest boots with: console, then the workarounds this
#: host needs (docs/linux-guest.md, "This host"): each one was a measured stop.
DEFAULT_CMDLINE = (
    "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 "
    "noxsave clearcpuid=smap,popcnt,cx16,rdpid,rdtscp,erms,fsrm noinvpcid mitigations=off"
)

# Options the boot depends on: a fragment line Kconfig dropped (a missing dependency)
# must fail the build, not produce a kernel that cannot boot here.
REQUIRED = (
    "CONFIG_64BIT=y", "CONFIG_SMP=y", "CONFIG_PVH=y", "CONFIG_ACPI=y", "CONFIG_HYPERV=y", "CONFIG_HYPERV_TIMER=y",
    "CONFIG_X86_HV_CALLBACK_VECTOR=y", "CONFIG_PARAVIRT=y", "CONFIG_SERIAL_8250_CONSOLE=y", "CONFIG_BLK_DEV_INITRD=y",
    "CONFIG_BINFMT_ELF=y", "CONFIG_X86_IO_APIC=y", "CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE=y", "CONFIG_SLUB=y",
    "# CONFIG_JUMP_LABEL is not set", "# CONFIG_VT is not set", "# CONFIG_LEGACY_PTYS is not set",
    "CONFIG_UNWINDER_GUESS=y", "CONFIG_INIT_STACK_NONE=y", "CONFIG_HZ_100=y", "CONFIG_PCI=y", "CONFIG_PNPACPI=y",
    "CONFIG_SERIAL_8250_PNP=y",
)  # fmt: skip

INIT_CFLAGS = (
    "-static", "-nostdlib", "-ffreestanding", "-fno-pie", "-no-pie", "-O2", "-fno-stack-protector",
    "-fcf-protection=none", "-mgeneral-regs-only", "-fno-asynchronous-unwind-tables", "-Wall", "-Wextra",
    "-Werror", "-Wl,--build-id=none",
)  # fmt: skip


class LinuxBuildError(RuntimeError):
    """A step of the build failed; the message names the step and carries its output's tail."""


#: vsmtrace options the guest needs: Linux 6.1 reads the partition ID whenever the
#: AccessPartitionId privilege is offered, into a per-CPU page it allocates only for the
#: root partition (hyperv_init -> hv_get_partition_id: a NULL dereference at boot). Real
#: Hyper-V grants that privilege only to the root partition; vsmtrace grants it by default.
VSMTRACE_ARGS = ("--hv-disable", "partition-id")


@dataclass(frozen=True)
class LinuxGuest:
    vmlinux: Path
    initramfs: Path
    cmdline: str = DEFAULT_CMDLINE
    vsmtrace_args: tuple[str, ...] = VSMTRACE_ARGS


def linux_cache() -> Path:
    path = cache_base() / "linux"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    print(f"vsmtrace.guests.linux: {what}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise LinuxBuildError(f"{what} failed (exit {proc.returncode}): $ {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _tool_identity(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LinuxBuildError(f"{name} not found: install it (apt-get install {name})")
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def source_version() -> str:
    """The installed linux-source package version, installing the package first if we may."""
    if not SOURCE_TARBALL.is_file():
        if os.geteuid() != 0:
            raise LinuxBuildError(
                f"{SOURCE_TARBALL} is missing: run `sudo apt-get install {' '.join(BUILD_PACKAGES)}`"
            )
        _run(["apt-get", "install", "-y", *BUILD_PACKAGES], f"installing {SOURCE_PACKAGE}")
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE], capture_output=True, text=True, check=True
        ).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    st = SOURCE_TARBALL.stat()
    return f"tarball:{st.st_size}:{st.st_mtime_ns}"


def kernel_key(version: str, extra_patches: tuple[Path, ...] = ()) -> str:
    """The cache key; the stock kernel's key does not depend on the (absent) extra patches."""
    h = hashlib.sha256()
    for part in (version, RECIPE_VERSION, CONFIG_FRAGMENT.read_text(), PATCH.read_text(), _tool_identity("gcc")):
        h.update(part.encode() + b"\0")
    for extra in extra_patches:
        h.update(b"extra patch\0" + extra.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_config(config: Path) -> None:
    text = config.read_text().splitlines()
    missing = [opt for opt in REQUIRED if opt not in text]
    if missing:
        raise LinuxBuildError(f"kernel config lost required options (a dependency is off): {', '.join(missing)}")


def build_kernel(jobs: int | None = None, *, quiet: bool = True, extra_patches: tuple[Path, ...] = ()) -> Path:
    """The cached vmlinux for the installed source, config fragment and patch (built if missing).

    ``extra_patches`` (bench-only variants such as QEMU_PEER_PATCH) are applied after the
    host-workaround patch and go into the cache key.
    """
    version = source_version()
    key = kernel_key(version, extra_patches)
    cache = linux_cache()
    dest = cache / f"vmlinux-{key}"
    vmlinux = dest / "vmlinux"
    if vmlinux.is_file():
        return vmlinux
    with _locked(cache / f"vmlinux-{key}.lock"):
        if vmlinux.is_file():  # another process built it while we waited
            return vmlinux
        work = Path(tempfile.mkdtemp(prefix=f"build-{key}-", dir=cache))
        try:
            _run(["tar", "-C", str(work), "-xf", str(SOURCE_TARBALL)], "extracting the kernel source")
            src = work / SOURCE_TARBALL.name.removesuffix(".tar.xz")
            for patch in (PATCH, *extra_patches):
                _run(["patch", "-p1", "--forward", "-i", str(patch)], f"applying {patch.name}", cwd=src)
            out = work / "out"
            make = ["make", "-s", f"O={out}"]
            _run([*make, "tinyconfig"], "make tinyconfig", cwd=src)
            _run(
                ["./scripts/kconfig/merge_config.sh", "-m", "-O", str(out), str(out / ".config"), str(CONFIG_FRAGMENT)],
                "merging vsmtrace.config",
                cwd=src,
            )
            _run([*make, "olddefconfig"], "make olddefconfig", cwd=src)
            _check_config(out / ".config")
            n = jobs or os.cpu_count() or 1
            _run([*make, f"-j{n}", "vmlinux"], f"building vmlinux (linux-source {version})", cwd=src)
            staged = work / "result"
            staged.mkdir()
            shutil.copy2(out / "vmlinux", staged / "vmlinux")
            shutil.copy2(out / ".config", staged / "config")
            (staged / "source-version").write_text(version + "\n")
            os.rename(staged, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"built {vmlinux}", file=sys.stderr)
    return vmlinux


# -- initramfs --------------------------------------------------------------------------------

S_IFDIR = 0o040000
S_IFREG = 0o100000
S_IFCHR = 0o020000
NEWC_MAGIC = b"070701"
CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
KMSG_MAJOR, KMSG_MINOR = 1, 11


def _newc_entry(ino: int, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One cpio "newc" record: header, NUL-terminated name and data, each padded to 4 bytes."""
    fields = (ino, mode, 0, 0, 2 if mode & S_IFDIR else 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    head = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + data + b"\0" * (-len(data) % 4)


def make_cpio(init: bytes) -> bytes:
    """The initramfs: /dev/console, /dev/kmsg, /proc, /sys and /init, deterministic (no times, no owners)."""
    entries = [
        ("dev", S_IFDIR | 0o755, b"", (0, 0)),
        ("dev/console", S_IFCHR | 0o600, b"", (CONSOLE_MAJOR, CONSOLE_MINOR)),
        ("dev/kmsg", S_IFCHR | 0o600, b"", (KMSG_MAJOR, KMSG_MINOR)),
        ("proc", S_IFDIR | 0o755, b"", (0, 0)),
        ("sys", S_IFDIR | 0o755, b"", (0, 0)),
        ("init", S_IFREG | 0o755, init, (0, 0)),
    ]
    out = b"".join(_newc_entry(i + 1, name, mode, data, rdev) for i, (name, mode, data, rdev) in enumerate(entries))
    out += _newc_entry(0, "TRAILER!!!", 0)
    return out + b"\0" * (-len(out) % 512)


def build_initramfs() -> Path:
    """``init.c`` compiled static and packed as a newc cpio (cached by source, flags and gcc)."""
    h = hashlib.sha256()
    for part in (INIT_SOURCE.read_text(), " ".join(INIT_CFLAGS), _tool_identity("gcc"), RECIPE_VERSION):
        h.update(part.encode() + b"\0")
    h.update(make_cpio(b""))  # the archive's layout
    dest = linux_cache() / f"initramfs-{h.hexdigest()[:16]}.cpio"
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=linux_cache()) as tmp:
        binary = Path(tmp) / "init"
        _run(["gcc", *INIT_CFLAGS, "-o", str(binary), str(INIT_SOURCE)], "building init")
        staged = Path(tmp) / "initramfs.cpio"
        staged.write_bytes(make_cpio(binary.read_bytes()))
        os.replace(staged, dest)
    return dest


def build(jobs: int | None = None, *, extra_patches: tuple[Path, ...] = ()) -> LinuxGuest:
    """Kernel and initramfs, built if missing."""
    return LinuxGuest(build_kernel(jobs, extra_patches=extra_patches), build_initramfs())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the vsmtrace Linux guest (kernel + initramfs) into the cache.")
    ap.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    args = ap.parse_args(argv)
    try:
        guest = build(args.jobs)
    except LinuxBuildError as exc:
        print(f"vsmtrace: {exc}", file=sys.stderr)
        return 1
    print(f"vmlinux   {guest.vmlinux}")
    print(f"initramfs {guest.initramfs}")
    print(f"cmdline   {guest.cmdline}")
    print(f"options   {' '.join(guest.vsmtrace_args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
