"""Shared test fixtures: KVM availability, guest builds, and running the CLI.

Tests that need /dev/kvm use the ``kvm`` fixture (or the ``kvm`` marker). On a
machine without KVM they skip with the reason; with VSMTRACE_REQUIRE_KVM=1 (set
by ``.ci/run``) the same condition is a failure, so CI can never go green by
skipping the tests that matter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.guests import build_guest, build_raw64  # noqa: E402


def kvm_problem() -> str | None:
    """Why KVM cannot be used here, or None."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


def _require_kvm() -> None:
    problem = kvm_problem()
    if problem is None:
        return
    if os.environ.get("VSMTRACE_REQUIRE_KVM"):
        pytest.fail(f"KVM test cannot run: {problem} (VSMTRACE_REQUIRE_KVM is set)")
    pytest.skip(f"needs KVM: {problem}")


@pytest.fixture
def kvm() -> None:
    """Skip (or, in CI, fail) when /dev/kvm is unusable."""
    _require_kvm()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("kvm") is not None and "kvm" not in getattr(item, "fixturenames", ()):
            item.fixturenames.insert(0, "kvm")  # type: ignore[attr-defined]


@dataclass
class RunResult:
    status: int
    stdout: str
    stderr: str

    @property
    def guest_exit_code(self) -> int | None:
        """The value the guest wrote to isa-debug-exit, if the status is one of those."""
        return self.status >> 1 if self.status & 1 else None


def run_vsmtrace(args: list[str], *, timeout: float = 60, input: bytes | None = None) -> RunResult:
    """Run the ``vsmtrace`` CLI in a subprocess (the way users run it)."""
    r = subprocess.run(
        [sys.executable, "-m", "vsmtrace", *args],
        capture_output=True,
        timeout=timeout,
        input=input,
        cwd=ROOT,
    )
    return RunResult(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def run_in_process(args: list[str]) -> RunResult:
    """The CLI in this process (as the `vsmtrace` script runs it, minus the interpreter start-up): the sweep's
    ~100 cases stay fast. Anything but SystemExit escaping the group is what a user would see as a traceback."""
    from click.testing import CliRunner

    from vsmtrace.cli import main

    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        return RunResult(-1, result.stdout, "Traceback (in process)\n" + tb)
    return RunResult(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def vsmtrace():
    return run_vsmtrace


@pytest.fixture
def guest():
    """``guest(name, raw64=False, **kw) -> Path``: build a test guest (cached)."""

    def build(name: str, *, raw64: bool = False, **kw):  # type: ignore[no-untyped-def]
        return build_raw64(name, **kw) if raw64 else build_guest(name, **kw)

    return build


@pytest.fixture
def readonly_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A directory nobody can write to, root included (a read-only tmpfs), or 0555 for other users."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
