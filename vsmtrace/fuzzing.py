"""The fuzzing campaign: run the adversarial guest (``guests/fuzz/fuzz.c``) and judge every run.

One run boots the fuzz guest on N VPs with a seed and an iteration count, records it, and
then applies the oracles (docs/fuzzing.md):

* the VMM ends with the guest's own exit (status 1 = exit code 0): never its internal-error
  status 6, never a Python traceback, never a guest fault or exception the fuzzer did not
  ask for, never a hang (a watchdog on the guest's ``fuzz`` progress lines);
* isolation: every ``fuzz check`` line of the guest is ``ok`` (canaries intact, probes
  intercepted, no secret word in VTL0 memory), and no VTL0-visible value in the trace
  (hypercall input/output/register output of VTL0 calls, VTL0 MSR reads) holds a secret word;
* the trace replays bit for bit (``vsmtrace replay``).

Every failure carries the seed, the VP count and the last iteration each VP reported, and a
command line that reproduces it. The VMM runs as a subprocess (``vmm_command``), so a test can
run it with a deliberately planted bug.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

EXIT_GUEST_OK = 1  # isa-debug-exit with code 0
EXIT_GUEST_REPORTED = 3  # isa-debug-exit with code 1: a check in the guest failed
EXIT_VMM_ERROR = 6
CHECKS = (
    "canaries_placed", "secret_read_intercepted", "ro_write_intercepted", "nx_exec_intercepted",
    "vtl1_canaries_intact", "no_secret_in_vtl0_memory", "ro_canary_unchanged_from_vtl0",
)  # fmt: skip
DEFAULT_MEMORY_MIB = 64
MAX_VPS = 4  # the guest's VSM framework has 4 VP slots
REPORT_EVERY = 25  # progress line per VP every this many iterations (the failure names the last one)
NSECRET = 512
SECRET_TAG = 0x5EC
REG_SECRET_MASK = 0x00007FFFFFFFFFF0
SECRET_REGISTERS = 5  # VTL1 MSRs holding secret_word(key, 0..4) & REG_SECRET_MASK
_U64 = (1 << 64) - 1
_PROGRESS = re.compile(r"^fuzz vp=(\d+) (?:iter|done iters)=(\d+)", re.M)
_CHECK = re.compile(r"^fuzz check (\S+) (ok|FAIL.*)$", re.M)


def mix64(z: int) -> int:
    """splitmix64's finaliser, as the guest computes it."""
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def secret_key(seed: int) -> int:
    return mix64(seed ^ 0x5EC2E75EC2E7)


def secret_words(seed: int) -> list[bytes]:
    """Every secret the guest's VTL1 holds for ``seed`` (page words and register values), as 8 LE bytes."""
    key = secret_key(seed)
    words = [(mix64((key + i) & _U64) & 0xFFFFFFFF00000000) | (SECRET_TAG << 20) | i for i in range(NSECRET)]
    regs = [w & REG_SECRET_MASK for w in words[:SECRET_REGISTERS]]
    return [w.to_bytes(8, "little") for w in words + regs]


def build_fuzz_guest() -> Path:
    """The fuzz guest, built with the guest SDK (cached by content)."""
    from vsmtrace.guests.build import SDK_DIR, build_guest

    return build_guest("fuzz", source_dir=SDK_DIR / "fuzz")


def default_vmm_command() -> list[str]:
    return [sys.executable, "-m", "vsmtrace.cli"]


@dataclass
class Failure:
    """One oracle that did not hold, with what reproduces it."""

    seed: int
    vps: int
    iters: int
    kind: str  # vmm-error, traceback, hang, guest-fault, guest-check, isolation, trace, replay, harness
    detail: str
    last_iter: dict[int, int] = field(default_factory=dict)

    def reproduce(self) -> str:
        spare = 1 if self.vps < MAX_VPS else 0
        build = "python -c 'from vsmtrace.fuzzing import build_fuzz_guest; print(build_fuzz_guest())'"
        return (f'vsmtrace run "$({build})" --smp {self.vps + spare} '  # the guest: built from the SDK's fuzz/fuzz.c
                f"--memory {DEFAULT_MEMORY_MIB} --append 'seed={self.seed} iters={self.iters} cpus={self.vps} spare={spare}'")  # fmt: skip

    def line(self) -> str:
        where = " ".join(f"vp{vp}@{it}" for vp, it in sorted(self.last_iter.items())) or "before the first report"
        return (f"FAIL seed={self.seed} vps={self.vps} iters={self.iters}: {self.kind}: {self.detail} "
                f"(last progress: {where}); reproduce: {self.reproduce()}")  # fmt: skip


@dataclass
class RunResult:
    """One fuzz run, judged."""

    seed: int
    vps: int
    iters: int
    status: int | None
    seconds: float
    iterations: int  # completed, summed over VPs
    codes: set[int] = field(default_factory=set)  # hypercall codes the VMM served (any VTL)
    statuses: set[int] = field(default_factory=set)  # result statuses it returned
    failures: list[Failure] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    trace: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


def _reader(stream, lines: queue.Queue) -> None:  # type: ignore[no-untyped-def]
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace"))
    lines.put(None)


def _run_vmm(cmd: list[str], watchdog_s: float, deadline_s: float, cwd: Path | None) -> tuple[int | None, str, str, str | None]:
    """Run the VMM; returns (status, stdout, stderr, why it was killed or None)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=cwd, start_new_session=True)  # fmt: skip
    out_lines: queue.Queue = queue.Queue()
    err_chunks: list[bytes] = []
    t_out = threading.Thread(target=_reader, args=(proc.stdout, out_lines), daemon=True)
    t_err = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    t_out.start()
    t_err.start()
    out: list[str] = []
    started = last_progress = time.monotonic()
    killed: str | None = None
    eof = False
    while not eof:
        try:
            line = out_lines.get(timeout=0.5)
        except queue.Empty:
            line = ""
        if line is None:
            eof = True
            break
        if line:
            out.append(line)
            if line.startswith("fuzz "):
                last_progress = time.monotonic()
        now = time.monotonic()
        if now - last_progress > watchdog_s:
            killed = f"hang: no progress line for {watchdog_s:.0f} s"
        elif now - started > deadline_s:
            killed = f"hang: still running after {deadline_s:.0f} s"
        if killed:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            break
    status = proc.wait()
    t_out.join(timeout=5)
    t_err.join(timeout=5)
    while not out_lines.empty():
        line = out_lines.get_nowait()
        if line:
            out.append(line)
    return (None if killed else status), "".join(out), b"".join(err_chunks).decode(errors="replace"), killed


def _last_iters(stdout: str) -> dict[int, int]:
    last: dict[int, int] = {}
    for vp, it in _PROGRESS.findall(stdout):
        last[int(vp)] = int(it)
    return last


def scan_trace(trace: Path, seed: int) -> tuple[set[int], set[int], list[str]]:
    """(hypercall codes, statuses, leaks): secret words in anything the trace shows VTL0 received."""
    import pyarrow.compute as pc

    from vsmtrace.recorder.reader import open_trace

    t = open_trace(trace).table(["kind", "vtl", "seq", "code", "status", "input", "output", "regs_out", "msr",
                                 "value", "is_write"])  # fmt: skip
    kinds = t.column("kind").cast("string")
    calls = t.filter(pc.equal(kinds, "HYPERCALL"))
    codes = {c for c in calls.column("code").to_pylist() if c is not None}
    statuses = {s for s in calls.column("status").to_pylist() if s is not None}
    secrets = secret_words(seed)
    leaks: list[str] = []
    vtl0 = calls.filter(pc.equal(calls.column("vtl"), 0))
    for col in ("input", "output", "regs_out"):
        for seq, code, blob in zip(vtl0.column("seq").to_pylist(), vtl0.column("code").to_pylist(),
                                   vtl0.column(col).to_pylist(), strict=True):  # fmt: skip
            if blob and any(w in blob for w in secrets):
                leaks.append(f"VTL0 hypercall {code:#x} (event {seq}) {col} holds a secret word")
    msrs = t.filter(pc.and_(pc.equal(kinds, "MSR"), pc.equal(t.column("vtl"), 0)))
    secret_values = {int.from_bytes(w, "little") for w in secrets}
    for seq, msr, value, is_write in zip(msrs.column("seq").to_pylist(), msrs.column("msr").to_pylist(),
                                         msrs.column("value").to_pylist(), msrs.column("is_write").to_pylist(),
                                         strict=True):  # fmt: skip
        if not is_write and value in secret_values:
            leaks.append(f"VTL0 RDMSR {msr:#x} (event {seq}) returned a secret word")
    return codes, statuses, leaks


def run_one(
    seed: int,
    iters: int,
    vps: int,
    workdir: Path,
    *,
    watchdog_s: float = 60.0,
    vmm_command: Sequence[str] | None = None,
    replay: bool = True,
    keep_trace: bool = False,
    cwd: Path | None = None,
) -> RunResult:
    """Run the fuzz guest once and apply every oracle."""
    kernel = build_fuzz_guest()
    workdir.mkdir(parents=True, exist_ok=True)
    trace = workdir / f"fuzz-s{seed}-v{vps}-i{iters}.trace"
    trace.unlink(missing_ok=True)
    base = list(vmm_command or default_vmm_command())
    deadline = 120.0 + iters * vps * 0.25
    spare = 1 if vps < MAX_VPS else 0  # one VP more that is never started: VTL1 loads random state into it
    cmd = [*base, "run", str(kernel), "--smp", str(vps + spare), "--memory", str(DEFAULT_MEMORY_MIB),
           "--append", f"seed={seed} iters={iters} cpus={vps} spare={spare} report={REPORT_EVERY}", "--record", str(trace),
           "--timeout", f"{deadline + 30:.0f}"]  # fmt: skip
    began = time.monotonic()
    status, stdout, stderr, killed = _run_vmm(cmd, watchdog_s, deadline, cwd)
    seconds = time.monotonic() - began
    last = _last_iters(stdout)
    done = sum(int(n) for n in re.findall(r"^fuzz vp=\d+ done iters=(\d+)", stdout, re.M)) or sum(
        it for it in last.values()
    )
    result = RunResult(seed, vps, iters, status, seconds, done, stdout=stdout, stderr=stderr, trace=trace)

    def fail(kind: str, detail: str) -> None:
        result.failures.append(Failure(seed, vps, iters, kind, detail, last))

    err_line = next((ln for ln in stderr.splitlines() if ln.startswith("vsmtrace:") and "WARNING" not in ln), "")
    if killed:
        fail("hang", killed)
    elif status == EXIT_VMM_ERROR:
        fail("vmm-error", err_line or "exit status 6")
    elif status == EXIT_GUEST_REPORTED:
        fail("guest-check", "the guest's own checks failed (fuzz FAIL / check lines below)")
    elif status != EXIT_GUEST_OK:
        tail = next((ln for ln in reversed(stdout.splitlines()) if ln.strip()), "")
        fail("guest-fault", f"exit status {status}: {err_line or tail}")
    if "Traceback (most recent call last)" in stderr:
        fail("traceback", stderr.strip().splitlines()[-1])
    checks = dict(_CHECK.findall(stdout))
    for name, verdict in checks.items():
        if verdict != "ok":
            fail("isolation", f"guest check {name}: {verdict}")
    for line in re.findall(r"^fuzz vp=\d+ FAIL .*$", stdout, re.M):
        fail("isolation", line)
    if status == EXIT_GUEST_OK:
        missing = [c for c in CHECKS if c not in checks]
        if missing:
            fail("harness", f"guest never reported checks {missing}")
    if trace.exists():
        try:
            codes, statuses, leaks = scan_trace(trace, seed)
        except Exception as exc:  # noqa: BLE001 - a trace the reader refuses is itself a finding
            fail("trace", f"cannot read the trace: {type(exc).__name__}: {exc}")
        else:
            result.codes, result.statuses = codes, statuses
            for leak in leaks:
                fail("isolation", leak)
        if replay and not killed:
            r = subprocess.run([*default_vmm_command(), "replay", str(trace)], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip
            if r.returncode != 0:
                lines = r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["?"]
                msg = " ".join(ln.strip() for ln in lines[:3])  # "DIVERGENCE at event N (...)", recorded, replayed
                fail("replay", f"`vsmtrace replay` exit {r.returncode}: {msg}")
    else:
        fail("harness", "no trace was written")
    if result.ok and not keep_trace:
        trace.unlink(missing_ok=True)
    return result


@dataclass
class CampaignResult:
    runs: list[RunResult]
    seconds: float

    @property
    def failures(self) -> list[Failure]:
        return [f for r in self.runs for f in r.failures]

    @property
    def iterations(self) -> int:
        return sum(r.iterations for r in self.runs)

    @property
    def codes(self) -> set[int]:
        return set().union(*(r.codes for r in self.runs)) if self.runs else set()

    @property
    def statuses(self) -> set[int]:
        return set().union(*(r.statuses for r in self.runs)) if self.runs else set()


def campaign(
    seeds: Sequence[int],
    vp_counts: Sequence[int],
    iters: int,
    workdir: Path,
    *,
    vmm_command: Sequence[str] | None = None,
    watchdog_s: float = 60.0,
    cwd: Path | None = None,
    on_run=None,  # type: ignore[no-untyped-def]
    stop_after_s: float | None = None,
) -> CampaignResult:
    """Every seed on every VP count; ``on_run(result)`` after each run; stop starting runs after ``stop_after_s``."""
    began = time.monotonic()
    runs: list[RunResult] = []
    for seed in seeds:
        for vps in vp_counts:
            if stop_after_s is not None and time.monotonic() - began > stop_after_s:
                return CampaignResult(runs, time.monotonic() - began)
            r = run_one(seed, iters, vps, workdir, vmm_command=vmm_command, watchdog_s=watchdog_s, cwd=cwd)
            runs.append(r)
            if on_run is not None:
                on_run(r)
    return CampaignResult(runs, time.monotonic() - began)
