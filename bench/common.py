"""Shared helpers for the benchmark scripts: building bench guests and timing runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vsmtrace.guests.build import build_guest
from vsmtrace.vmm.native import cache_dir as cache_base

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
GUEST_DIR = BENCH_DIR / "guests"
PROGRAMS_DIR = ROOT / "guests" / "programs"  # the guest programs the test suite boots too


def program_guest(name: str) -> Path:
    """Build one of the repository's guest programs (``guests/programs/<name>.c``) with the guest SDK."""
    return build_guest(name, source_dir=PROGRAMS_DIR)


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


def exits_guest(count: int, rounds: int = 1) -> Path:
    """bench/guests/exits.S: ``rounds`` rounds of ``count`` port-I/O exits, each timed by the guest."""
    src, ld = GUEST_DIR / "exits.S", GUEST_DIR / "exits.ld"
    return build(
        ["gcc", "-m32", "-nostdlib", "-static", "-no-pie", f"-DCOUNT={count}", f"-DROUNDS={rounds}",
         "-Wl,-T," + str(ld), "-Wl,--build-id=none", "-o", "{out}", str(src)],
        [src, ld],
        f"exits-{count}x{rounds}.elf",
    )  # fmt: skip


def exits_driver() -> Path:
    src = BENCH_DIR / "exits_driver.c"
    return build(["gcc", "-O2", "-o", "{out}", str(src)], [src], "exits_driver")


def floor_guest() -> Path:
    """bench/guests/floor.S: the guest side of every round trip bench/floor times."""
    src, ld = GUEST_DIR / "floor.S", GUEST_DIR / "exits.ld"
    return build(
        ["gcc", "-m32", "-nostdlib", "-static", "-no-pie", "-Wl,-T," + str(ld), "-Wl,--build-id=none",
         "-o", "{out}", str(src)],
        [src, ld],
        "floor.elf",
    )  # fmt: skip


def floor_driver() -> Path:
    src = BENCH_DIR / "floor.c"
    return build(["gcc", "-O2", "-Wall", "-o", "{out}", str(src)], [src], "floor_driver")


def tick_lines(text: str) -> tuple[dict[str, list[int]], int | None]:
    """``T <kind> <ticks>`` lines (per-round RDTSC ticks) by kind, and ``tsc_khz`` if printed.

    Guests print ticks in decimal after a kind; the exits guest prints 16 hex digits and
    no kind (its kind is ``exit``).
    """
    rounds: dict[str, list[int]] = {}
    khz = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "T":
            rounds.setdefault(parts[1], []).append(int(parts[2]))
        elif len(parts) == 2 and parts[0] == "T":
            rounds.setdefault("exit", []).append(int(parts[1], 16))
        elif len(parts) == 2 and parts[0] == "tsc_khz":
            khz = int(parts[1])
    return rounds, khz


def run_rounds(cmd: list[str], what: str) -> tuple[dict[str, list[int]], int | None]:
    """Run one process whose guest (or driver) prints per-round ticks; exit on failure."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    rounds, khz = tick_lines(r.stdout)
    if r.returncode not in (0, 1) or not rounds:
        sys.exit(f"{what} failed (status {r.returncode}): {r.stderr.strip()[-500:] or r.stdout.strip()[-500:]}")
    return rounds, khz


def floor_rounds(mode: str, n: int, rounds: int) -> tuple[list[float], int]:
    """bench/floor's C loop: ticks per round trip of ``mode`` for each round, and the TSC rate."""
    got, khz = run_rounds([str(floor_driver()), str(floor_guest()), mode, str(n), str(rounds)], f"bench/floor {mode}")
    assert khz, "the floor driver prints the TSC rate"
    return [t / n for t in got[mode]], khz


def floor_vmm_cmd(kernel: Path | str, append: str) -> list[str]:
    """bench/floor_vmm: ``kernel`` booted by vsmtrace with its timed round trips served in C."""
    return [sys.executable, str(BENCH_DIR / "floor_vmm"), str(kernel), append]


#: The environment timed commands run in: as an installed vsmtrace runs. A shell with
#: PYTHONDONTWRITEBYTECODE set (some CI and container images set it) makes every run compile
#: every module from source (0.2 s of a recording's start-up on the development host), which
#: no pip install pays: pip writes the bytecode at install time.
TIMED_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], clock: str = "wall", output: list[str] | None = None) -> float:
    """Seconds ``cmd`` took: ``wall`` time, or ``cpu`` time (user + system of the process).

    CPU time counts the guest's time under KVM_RUN too, and is much less disturbed by other
    load on a 2-core host; it suits single-VP round-trip benchmarks (nothing else runs).
    With ``output``, what the command printed on stdout is appended to it (through a file,
    so neither pipe can fill while the other is read).
    """
    with tempfile.TemporaryFile() if output is not None else open(os.devnull, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=TIMED_ENV)
        assert proc.stderr is not None
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        dt = time.perf_counter() - t0
        if output is not None:
            out.seek(0)
            output.append(out.read().decode(errors="replace"))
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    if code not in (0, 1):
        sys.exit(f"{' '.join(cmd)} failed with status {code}: {err.decode()[-500:]}")
    return usage.ru_utime + usage.ru_stime if clock == "cpu" else dt


def vsmtrace_cmd() -> list[str]:
    return [sys.executable, "-m", "vsmtrace"]
