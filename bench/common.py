"""Shared helpers for the benchmark scripts: building bench guests and timing runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from vsmtrace.guests.build import build_guest
from vsmtrace.vmm.native import cache_dir as cache_base

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
GUEST_DIR = BENCH_DIR / "guests"
TEST_GUEST_DIR = ROOT / "tests" / "guests"  # C sources only: benchmarks import nothing from tests/


def test_guest(name: str) -> Path:
    """Build one of the test suite's guests (``tests/guests/<name>.c``) with the guest SDK."""
    return build_guest(name, source_dir=TEST_GUEST_DIR)


def bench_guest(name: str) -> Path:
    """Build ``bench/guests/<name>.c`` with the guest SDK."""
    return build_guest(name, source_dir=GUEST_DIR)


def cache_dir() -> Path:
    path = cache_base() / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(args: list[str], inputs: list[Path], out_name: str) -> Path:
    """Run gcc with ``args`` (``{out}`` replaced by the output path), cached by inputs+args."""
    h = hashlib.sha256(" ".join(args).encode())
    for p in inputs:
        h.update(p.read_bytes())
    out = cache_dir() / f"{out_name}-{h.hexdigest()[:12]}"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        cmd = [a.replace("{out}", str(tmp)) for a in args]
        subprocess.run(cmd, check=True, cwd=BENCH_DIR)
        tmp.rename(out)
    return out


def exits_guest(count: int) -> Path:
    src, ld = GUEST_DIR / "exits.S", GUEST_DIR / "exits.ld"
    return build(
        ["gcc", "-m32", "-nostdlib", "-static", "-no-pie", f"-DCOUNT={count}", "-Wl,-T," + str(ld),
         "-Wl,--build-id=none", "-o", "{out}", str(src)],
        [src, ld],
        f"exits-{count}.elf",
    )  # fmt: skip


def exits_driver() -> Path:
    src = BENCH_DIR / "exits_driver.c"
    return build(["gcc", "-O2", "-o", "{out}", str(src)], [src], "exits_driver")


def timed(cmd: list[str], clock: str = "wall") -> float:
    """Seconds ``cmd`` took: ``wall`` time, or ``cpu`` time (user + system of the process).

    CPU time counts the guest's time under KVM_RUN too, and is much less disturbed by other
    load on a 2-core host; it suits single-VP round-trip benchmarks (nothing else runs).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed with status {code}: {err.decode()[-500:]}")
    return usage.ru_utime + usage.ru_stime if clock == "cpu" else dt


def vsmtrace_cmd() -> list[str]:
    return [sys.executable, "-m", "vsmtrace.cli"]
