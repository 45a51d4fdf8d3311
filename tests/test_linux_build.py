"""The Linux guest's build script (guests/linux/build.py), without building a kernel."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from vsmtrace.guests.linux import build as B


def test_initramfs_is_a_deterministic_newc_archive(tmp_path: Path) -> None:
    blob = B.make_cpio(b"\x7fELF-init")
    assert blob == B.make_cpio(b"\x7fELF-init") and len(blob) % 512 == 0
    if shutil.which("cpio") is None:
        pytest.skip("needs cpio to list the archive")
    listing = subprocess.run(["cpio", "-itv"], input=blob, capture_output=True, check=True).stdout.decode()
    rows = [line.split() for line in listing.splitlines()]
    assert [r[-1] for r in rows] == ["dev", "dev/console", "dev/kmsg", "proc", "sys", "init"]
    console = rows[1]
    assert console[0] == "crw-------" and console[4:6] == ["5,", "1"]
    assert rows[2][0] == "crw-------" and rows[2][4:6] == ["1,", "11"]
    assert rows[5][0] == "-rwxr-xr-x" and rows[5][4] == "9"


def test_kernel_key_covers_fragment_and_patch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = B.kernel_key("6.1.1-1")
    assert B.kernel_key("6.1.2-1") != base
    fragment = tmp_path / "frag.config"
    fragment.write_text(B.CONFIG_FRAGMENT.read_text() + "CONFIG_FOO=y\n")
    monkeypatch.setattr(B, "CONFIG_FRAGMENT", fragment)
    assert B.kernel_key("6.1.1-1") != base
    monkeypatch.undo()
    patch = tmp_path / "p.patch"
    patch.write_text(B.PATCH.read_text() + "\n")
    monkeypatch.setattr(B, "PATCH", patch)
    assert B.kernel_key("6.1.1-1") != base


def test_a_config_that_lost_a_required_option_fails(tmp_path: Path) -> None:
    config = tmp_path / ".config"
    config.write_text("\n".join(o for o in B.REQUIRED if o != "CONFIG_HYPERV=y") + "\n# CONFIG_HYPERV is not set\n")
    with pytest.raises(B.LinuxBuildError, match="CONFIG_HYPERV=y"):
        B._check_config(config)
    config.write_text("\n".join(B.REQUIRED) + "\n")
    B._check_config(config)


def test_missing_source_as_non_root_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(B, "SOURCE_TARBALL", tmp_path / "linux-source-6.1.tar.xz")
    monkeypatch.setattr(B.os, "geteuid", lambda: 1000)
    with pytest.raises(B.LinuxBuildError, match=r"apt-get install linux-source-6.1"):
        B.source_version()


def test_patch_touches_only_the_syscall_fault_path() -> None:
    text = B.PATCH.read_text()
    files = [line.split()[1] for line in text.splitlines() if line.startswith("+++ ")]
    assert files == ["b/arch/x86/entry/common.c", "b/arch/x86/include/asm/syscall.h", "b/arch/x86/mm/fault.c"]
    assert "syscall_fault_as_syscall" in text and "entry_SYSCALL_64" in text
