"""Every `vsmtrace run` error path: one `vsmtrace: error: ...` line on stderr, status 2, no traceback.

Errors found before KVM is opened run everywhere; the others need /dev/kvm (they
get as far as the loader or the memory set-up) and request the ``kvm`` fixture.
The KVM device itself is redirected with the hidden VSMTRACE_KVM_DEVICE variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, RunResult


def assert_user_error(r: RunResult, *fragments: str) -> None:
    assert r.status == 2, (r.status, r.stdout, r.stderr)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    err = r.stderr.splitlines()
    assert len(err) == 1, r.stderr
    assert err[0].startswith("vsmtrace: error: "), err[0]
    for fragment in fragments:
        assert fragment in err[0], (fragment, err[0])


def run_with_device(kernel: Path, device: str) -> RunResult:
    env = dict(os.environ, VSMTRACE_KVM_DEVICE=device)
    r = subprocess.run(
        [sys.executable, "-m", "vsmtrace.cli", "run", str(kernel), "--timeout", "10"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    return RunResult(r.returncode, r.stdout.decode(), r.stderr.decode())


# -- option values (click's own checks, reported in vsmtrace's form) ------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--smp", "0"], ["--smp", "0 is not in the range"]),
        (["--smp", "999"], ["--smp", "999 is not in the range"]),
        (["--smp", "two"], ["--smp", "'two'"]),
        (["--memory", "abc"], ["--memory", "'abc'"]),
        (["--memory", "1"], ["--memory", "1 is not in the range"]),
        (["--timeout", "0"], ["--timeout"]),
        (["--timeout", "soon"], ["--timeout", "'soon'"]),
        (["--no-such-option"], ["No such option", "--no-such-option"]),
    ],
)
def test_bad_option_values(vsmtrace, guest, args: list[str], fragments: list[str]) -> None:
    assert_user_error(vsmtrace(["run", str(guest("hello")), *args]), *fragments)


def test_missing_kernel_argument(vsmtrace) -> None:
    assert_user_error(vsmtrace(["run"]), "Missing argument 'KERNEL'")


def test_unknown_command(vsmtrace) -> None:
    assert_user_error(vsmtrace(["bogus"]), "No such command 'bogus'")


def test_kernel_does_not_exist(vsmtrace, tmp_path: Path) -> None:
    missing = tmp_path / "nope.elf"
    assert_user_error(vsmtrace(["run", str(missing), "--timeout", "10"]), f"kernel {missing} does not exist")


def test_kernel_is_a_directory(vsmtrace, tmp_path: Path) -> None:
    assert_user_error(vsmtrace(["run", str(tmp_path), "--timeout", "10"]), "is a directory")


def test_initrd_does_not_exist(vsmtrace, guest, tmp_path: Path) -> None:
    missing = tmp_path / "initrd.img"
    r = vsmtrace(["run", str(guest("hello")), "--initrd", str(missing), "--timeout", "10"])
    assert_user_error(r, f"module {missing} does not exist")


def test_serial_file_cannot_be_written(vsmtrace, guest, tmp_path: Path) -> None:
    r = vsmtrace(["run", str(guest("hello")), "--serial", str(tmp_path / "no" / "dir" / "out"), "--timeout", "10"])
    assert_user_error(r, "cannot write serial output to")


def test_version(vsmtrace) -> None:
    from vsmtrace import __version__

    r = vsmtrace(["--version"])
    assert r.status == 0
    assert r.stdout == f"vsmtrace, version {__version__}\n"


# -- the KVM device ---------------------------------------------------------------------------------


def test_no_kvm_device(guest, tmp_path: Path) -> None:
    r = run_with_device(guest("hello"), str(tmp_path / "kvm"))
    assert_user_error(r, f"{tmp_path / 'kvm'} does not exist", "no KVM")


def test_kvm_device_without_permission(guest, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        # root ignores file modes; a read-only /proc/sys entry refuses O_RDWR even to root
        device = "/proc/sys/kernel/ostype"
        try:
            os.close(os.open(device, os.O_RDWR))
            pytest.skip(f"{device} opens read-write here; no way to provoke EACCES as root")
        except PermissionError:
            pass
    else:
        device = str(tmp_path / "kvm")
        Path(device).touch(mode=0)
    assert_user_error(run_with_device(guest("hello"), device), f"no permission to open {device}", "'kvm' group")


def test_kvm_device_that_is_not_kvm(guest) -> None:
    assert_user_error(run_with_device(guest("hello"), "/dev/null"), "/dev/null is not a KVM device")


def test_kvm_device_is_a_directory(guest, tmp_path: Path) -> None:
    assert_user_error(run_with_device(guest("hello"), str(tmp_path)), f"cannot open {tmp_path}")


# -- kernels the loader refuses, and memory KVM cannot have (need /dev/kvm to get that far) ----------


@pytest.mark.kvm
def test_not_an_elf(vsmtrace, tmp_path: Path) -> None:
    text = tmp_path / "kernel.txt"
    text.write_text("this is not a kernel\n" * 10)
    assert_user_error(vsmtrace(["run", str(text), "--timeout", "10"]), "not an ELF file and no Multiboot header")


@pytest.mark.kvm
def test_elf32_without_multiboot_header(vsmtrace, tmp_path: Path) -> None:
    elf = tmp_path / "plain32.elf"
    elf.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x02\x00\x03\x00" + bytes(100))
    assert_user_error(vsmtrace(["run", str(elf), "--timeout", "10"]), "ELF without a Multiboot header")


@pytest.mark.kvm
def test_user_program_is_not_a_kernel(vsmtrace) -> None:
    program = Path(sys.executable).resolve()
    with program.open("rb") as f:
        head = f.read(18)
    if not head.startswith(b"\x7fELF") or head[16] != 3:
        pytest.skip(f"{program} is not a PIE/shared ELF")
    assert_user_error(vsmtrace(["run", str(program), "--timeout", "10"]), "not a kernel", "ET_DYN")


@pytest.mark.kvm
def test_memory_too_large(vsmtrace, guest) -> None:
    r = vsmtrace(["run", str(guest("hello")), "--memory", "100000000", "--timeout", "10"])
    assert_user_error(r, "100000000 MiB")


@pytest.mark.kvm
def test_module_does_not_fit(vsmtrace, guest, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with big.open("wb") as f:
        f.truncate(8 * 2**20)
    r = vsmtrace(["run", str(guest("hello")), "--memory", "4", "--initrd", str(big), "--timeout", "10"])
    assert_user_error(r, "does not fit")
