"""A sweep over every subcommand with what users actually hand it: no traceback, no status 1, ever.

Bad paths, directories, foreign files, empty files, traces cut short or with
mistyped columns, read-only outputs, and two SIGINTs a few milliseconds apart (what
`timeout -s INT` plus an impatient Ctrl-C send). Each case must end with one
`vsmtrace: ...` line and a documented status: 2 for bad input, 130 for an interrupt,
0 when the input was fine after all (a torn trace is readable). The SIGINT cases
include real `vsmtrace run --record` runs of a test guest, whose trace must come out
sealed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from tests.conftest import ROOT, RunResult, run_in_process, run_vsmtrace
from tests.guests import build_guest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every kind of input, good and bad, made once."""
    from tests.conftest import _require_kvm

    _require_kvm()
    d = tmp_path_factory.mktemp("sweep")
    good = d / "good.arrow"
    r = run_vsmtrace(["run", str(build_guest("vsm_enable")), "--record", str(good), "--timeout", "120"], timeout=240)
    assert r.guest_exit_code == 0, r
    table = ipc.open_file(good).read_all()
    foreign = d / "foreign.txt"
    foreign.write_text("not a trace\n" * 20)
    empty = d / "empty.arrow"
    empty.touch()
    header_only = d / "header.arrow"
    header_only.write_bytes(good.read_bytes()[:100])
    torn = d / "torn.arrow"
    with pa.OSFile(str(torn), "wb") as f, ipc.new_stream(f, table.schema) as w:
        for b in table.to_batches(max_chunksize=200):
            w.write_batch(b)
    torn.write_bytes(torn.read_bytes()[:-1500])
    mistyped = d / "mistyped.arrow"
    bad = table.set_column(table.schema.get_field_index("vp"), "vp", table["vp"].cast(pa.string()))
    bad = bad.replace_schema_metadata(table.schema.metadata)
    with pa.OSFile(str(mistyped), "wb") as f, ipc.new_file(f, bad.schema) as w:
        w.write_table(bad)
    plain_arrow = d / "plain.arrow"
    with pa.OSFile(str(plain_arrow), "wb") as f, ipc.new_file(f, pa.schema([("x", pa.int64())])) as w:
        w.write_table(pa.table({"x": [1, 2, 3]}))
    return {
        "good": good, "missing": d / "missing.arrow", "directory": d, "foreign": foreign, "empty": empty,
        "header_only": header_only, "torn": torn, "mistyped": mistyped, "plain_arrow": plain_arrow,
    }  # fmt: skip


#: Each subcommand as a user runs it on a trace; TRACE is replaced by the input under test, OUT by a fresh path.
TRACE_COMMANDS = {
    "info": ["info", "TRACE"],
    "info-json": ["info", "--json", "TRACE"],
    "seal": ["seal", "TRACE"],
    "report": ["report", "TRACE", "--out", "OUT"],
    "export-chrome": ["export", "TRACE", "-o", "OUT"],
    "export-parquet": ["export", "TRACE", "--format", "parquet", "-o", "OUT"],
    "diff-a": ["diff", "TRACE", "GOOD"],
    "diff-b": ["diff", "GOOD", "TRACE"],
    "replay": ["replay", "TRACE"],
    "replay-state": ["replay", "TRACE", "--state", "5"],
    "replay-json": ["replay", "TRACE", "--json"],
    "replay-reexecute": ["replay", "TRACE", "--reexecute"],
}
#: Inputs that are readable traces (a torn one included): the command may succeed.
READABLE = {"torn"}


def _args(template: list[str], trace: Path, good: Path, out: Path) -> list[str]:
    return [{"TRACE": str(trace), "GOOD": str(good), "OUT": str(out)}.get(a, a) for a in template]


def assert_clean(r: RunResult, allowed: tuple[int, ...]) -> None:
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert r.status in allowed, (r.status, r.stdout[-500:], r.stderr)
    if r.status == 2:
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vsmtrace: error: "), r.stderr


@pytest.mark.parametrize("what", ["missing", "directory", "foreign", "empty", "header_only", "torn", "mistyped", "plain_arrow"])
@pytest.mark.parametrize("command", sorted(TRACE_COMMANDS))
def test_bad_traces(inputs: dict[str, Path], tmp_path: Path, command: str, what: str) -> None:
    if command == "replay-reexecute" and what == "torn":
        pytest.skip("re-executing a (non-deterministic) guest trace: covered by tests/test_reexecute.py")
    trace = inputs[what]
    if command == "seal" and what in READABLE:
        trace = tmp_path / "copy.arrow"
        trace.write_bytes(inputs[what].read_bytes())
    r = run_in_process(_args(TRACE_COMMANDS[command], trace, inputs["good"], tmp_path / "out"))
    if what not in READABLE:
        assert_clean(r, (2,))
    elif command.startswith("diff"):
        assert_clean(r, (0, 1))  # 1 = the documented "they diverge" (the torn one ends early)
    else:
        assert_clean(r, (0, 2))


@pytest.mark.parametrize(
    "template",
    [
        ["report", "GOOD", "--out", "RO/fig"],
        ["report", "GOOD", "--out", "RO"],
        ["export", "GOOD", "-o", "RO/t.json"],
        ["export", "GOOD", "--format", "parquet", "-o", "RO/t.parquet"],
        ["run", "KERNEL", "--record", "RO/t.arrow", "--timeout", "30"],
        ["run", "KERNEL", "--serial", "RO/serial.log", "--timeout", "30"],
        ["demo", "--out", "RO/demo"],
        ["seal", "RO/none.arrow"],
    ],
    ids=lambda t: "-".join(a for a in t if a.isalpha() or a.startswith("--"))[:40],
)
def test_readonly_outputs(inputs: dict[str, Path], readonly_dir: Path, template: list[str]) -> None:
    kernel = build_guest("hello")
    args = [a.replace("RO", str(readonly_dir)).replace("GOOD", str(inputs["good"])).replace("KERNEL", str(kernel)) for a in template]
    assert_clean(run_vsmtrace(args, timeout=300), (2,))


# -- two rapid SIGINTs ---------------------------------------------------------------------------------------


def _wait_until_running(pid: int, timeout: float = 120) -> None:
    """Wait until the command itself runs: it has loaded Arrow's native library (recording and replay do).

    Before that the interpreter is still starting (site-packages, .pth files): a Ctrl-C
    there is Python's own business, not vsmtrace's, and no program can answer it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libarrow" in Path(f"/proc/{pid}/maps").read_text():
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.005)


def _interrupt(args: list[str], *, after: float | None = None, ready: bytes | None = None, gap: float = 0.005) -> RunResult:
    """Start `vsmtrace ARGS`, wait ``after`` seconds (once it runs) or for ``ready`` on stdout, send two SIGINTs ``gap`` apart."""
    p = subprocess.Popen([sys.executable, "-m", "vsmtrace", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert p.stdout is not None
    if after is not None:
        _wait_until_running(p.pid)
    if ready is not None:
        seen = b""
        deadline = time.monotonic() + 120
        while ready not in seen and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            seen += line
        assert ready in seen, seen
        time.sleep(0.3)
    if after is not None:
        time.sleep(after)
    p.send_signal(signal.SIGINT)
    time.sleep(gap)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    return RunResult(p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


def assert_interrupted(r: RunResult) -> None:
    assert "Traceback" not in r.stderr and "Aborted!" not in r.stderr, r.stderr
    assert r.status == 130, (r.status, r.stderr)
    assert r.stderr.splitlines()[0] == "vsmtrace: interrupted", r.stderr


@pytest.mark.parametrize("gap", [0.001, 0.005, 0.015, 0.030])
def test_two_sigints_during_a_recording_leave_a_sealed_trace(tmp_path: Path, gap: float) -> None:
    from vsmtrace.recorder.reader import open_trace

    trace = tmp_path / "t.arrow"
    kernel = build_guest("stop")
    r = _interrupt(["run", str(kernel), "--record", str(trace), "--append", "how=spin", "--timeout", "120"],
                   ready=b"stop test: spin", gap=gap)  # fmt: skip
    assert_interrupted(r)
    t = open_trace(trace)
    assert t.sealed, t.state
    seqs = t.table(["seq"])["seq"].to_pylist()
    assert seqs == list(range(len(seqs))) and len(seqs) > 0
    kinds = t.table(["kind"])["kind"].cast(pa.string()).to_pylist()
    assert "VP_STOP" in kinds and "ERROR" in kinds  # the interrupt is in the trace, and the VP stopped in order
    info = run_vsmtrace(["info", str(trace)])
    assert info.status == 0 and "state        sealed" in info.stdout


#: `vsmtrace self-interrupt`, a command added for the test, whose BODY sends the process one real SIGINT at a
#: chosen point; run as `python -m vsmtrace` runs (interrupts installed first, the group in script mode, and
#: the module run by ``-m``: only then does CPython's exit look at an escaped KeyboardInterrupt).
_SELF_INTERRUPT = """
import os, signal, sys
from vsmtrace import interrupts
interrupts.install()
from vsmtrace.cli import main

@main.command("self-interrupt")
def self_interrupt():
BODY
    raise AssertionError("the SIGINT did not stop the command")

sys.argv = ["vsmtrace", "self-interrupt"]
main()
"""


def _self_interrupt(tmp_path: Path, body: str) -> RunResult:
    script = _SELF_INTERRUPT.replace("BODY", "\n".join("    " + line for line in body.strip().splitlines()))
    (tmp_path / "self_interrupt.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "self_interrupt"], capture_output=True, timeout=120, cwd=ROOT, env=env)
    return RunResult(r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace"))


def test_ctrl_c_escaping_an_exec_of_a_string_is_130(tmp_path: Path) -> None:
    """A Ctrl-C that lands in code ``exec`` runs from a string (each dataclass's ``__init__``, ``__repr__``...
    while vsmtrace imports) makes CPython note an unhandled KeyboardInterrupt, and at exit kill the process
    with SIGINT (-2) although vsmtrace handled it: status 130 all the same."""
    r = _self_interrupt(tmp_path, 'exec("os.kill(os.getpid(), signal.SIGINT)\\nfor _ in range(1000):\\n    pass\\n")')
    assert_interrupted(r)
    assert r.stderr == "vsmtrace: interrupted\n", r.stderr


def test_ctrl_c_inside_set_name_is_130(tmp_path: Path) -> None:
    """Python 3.11 wraps what ``__set_name__`` raises (dataclass fields call it) in a RuntimeError: a Ctrl-C
    that lands there is still `vsmtrace: interrupted`, not an internal error (status 6)."""
    body = """
class Descriptor:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass

class Holder:
    field = Descriptor()
"""
    r = _self_interrupt(tmp_path, body)
    assert_interrupted(r)
    assert r.stderr == "vsmtrace: interrupted\n", r.stderr


def test_ctrl_c_that_python_turns_into_another_error_is_130(tmp_path: Path) -> None:
    """A KeyboardInterrupt that lands while an import builds an ImportError's message comes out as
    TypeError("expected a message argument"), with no trace of the interrupt (seen once in 200 stress runs):
    once a Ctrl-C raised, any failure is `vsmtrace: interrupted`. The body loses the KeyboardInterrupt and
    raises that TypeError the way CPython does, outside any ``except`` (so with no ``__context__``)."""
    body = """
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass
except KeyboardInterrupt:
    pass
raise TypeError("expected a message argument")
"""
    r = _self_interrupt(tmp_path, body)
    assert_interrupted(r)
    assert r.stderr == "vsmtrace: interrupted\n", r.stderr


_SWALLOWED = """
import weakref

class Obj:
    pass

def callback(ref):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass

obj = Obj()
ref = weakref.ref(obj, callback)
del obj
"""


def test_ctrl_c_swallowed_by_a_weakref_callback_while_starting_stops_the_command(tmp_path: Path) -> None:
    """A KeyboardInterrupt raised in a weakref callback (importlib's module locks have one) is only reported
    by Python ("Exception ignored in ..."): a Ctrl-C swallowed so while vsmtrace imports still stops the
    command before it starts, with one line and status 130."""
    script = _SELF_INTERRUPT.replace("sys.argv = ", _SWALLOWED + "\nsys.argv = ").replace("BODY", "    pass")
    (tmp_path / "self_interrupt.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "self_interrupt"], capture_output=True, timeout=120, cwd=ROOT, env=env)
    r = RunResult(p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))
    assert_interrupted(r)
    assert r.stderr == "vsmtrace: interrupted\n", r.stderr


def test_second_ctrl_c_after_a_swallowed_one_interrupts(tmp_path: Path) -> None:
    """The Ctrl-C after one Python swallowed raises again (it used to be only counted: `run` went on)."""
    body = _SWALLOWED + """
os.kill(os.getpid(), signal.SIGINT)
for _ in range(10**7):
    pass
"""
    r = _self_interrupt(tmp_path, body)
    assert_interrupted(r)
    assert r.stderr == "vsmtrace: interrupted\n", r.stderr


def test_second_sigint_inside_the_first_ones_handler_still_interrupts() -> None:
    """Two quick Ctrl-Cs: the second can run the SIGINT handler again, nested inside the first one's run
    (Python calls a pending handler at the next bytecode boundary, even within a handler). The first must
    still raise KeyboardInterrupt. The second signal is sent from inside the first handler's call to
    ``signal.signal`` to make that moment certain."""
    script = """
import os, signal
from vsmtrace import interrupts
interrupts.install()
real_signal = signal.signal

def signal_then_a_second_sigint(signum, handler):
    signal.signal = real_signal
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        pass
    return real_signal(signum, handler)

signal.signal = signal_then_a_second_sigint
try:
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10**7):
        pass
except KeyboardInterrupt:
    print("interrupted", interrupts.count())
else:
    print("not interrupted", interrupts.count())
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, cwd=ROOT, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "interrupted 2\n", (r.stdout, r.stderr)


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trace whose replay lasts over a second (10,000 hypercall round trips): the Ctrl-C tests' signals
    must find the replay still running (a short one, since replay stopped importing pandas, was over)."""
    from tests.conftest import _require_kvm

    _require_kvm()
    trace = tmp_path_factory.mktemp("long") / "long.arrow"
    r = run_vsmtrace(["run", str(build_guest("hv_replay")), "--append", "loop=10000", "--record", str(trace), "--timeout", "120"],
                     timeout=240)  # fmt: skip
    assert r.guest_exit_code == 0, r
    return trace


@pytest.mark.parametrize("after", [0.0, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("command", ["run", "replay"])
def test_ctrl_c_while_starting_is_130(long_trace: Path, tmp_path: Path, command: str, after: float) -> None:
    args = {
        "run": ["run", str(build_guest("stop")), "--append", "how=spin", "--record", str(tmp_path / "t.arrow"), "--timeout", "120"],
        "replay": ["replay", str(long_trace)],
    }[command]
    r = _interrupt(args, after=after)
    if command == "replay" and r.status == 0:
        pytest.skip("the replay finished before the signal")
    assert_interrupted(r)


@pytest.mark.parametrize("command", sorted(TRACE_COMMANDS))
def test_two_sigints_to_every_command(inputs: dict[str, Path], tmp_path: Path, command: str) -> None:
    trace = inputs["good"]
    if command == "seal":
        trace = tmp_path / "copy.arrow"
        trace.write_bytes(inputs["good"].read_bytes())
    r = _interrupt(_args(TRACE_COMMANDS[command], trace, inputs["good"], tmp_path / "out"), after=0.05)
    assert "Traceback" not in r.stderr and "Aborted!" not in r.stderr, r.stderr
    assert r.status in (0, 2, 130), (r.status, r.stderr)  # 0: it finished first; 2: --reexecute refuses this trace
    if r.status == 130:
        assert r.stderr.splitlines()[0] == "vsmtrace: interrupted", r.stderr
    if command == "seal":
        from vsmtrace.recorder.reader import open_trace

        open_trace(trace)  # still a readable trace, whatever moment the signal came


def test_sigint_ignored_by_the_parent_still_interrupts(tmp_path: Path) -> None:
    """A background job inherits SIGINT ignored: `vsmtrace run` must still stop on it."""
    p = subprocess.Popen(
        [sys.executable, "-m", "vsmtrace", "run", str(build_guest("stop")), "--append", "how=idle", "--timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    assert p.stdout is not None
    assert p.stdout.readline() == b"stop test: idle\n"
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.decode() == "vsmtrace: interrupted\n"


def test_a_ctrl_c_during_the_polars_import_waits_for_its_end() -> None:
    """Polars swaps the process's SIGINT handler while it imports; ``interrupts.install()`` holds SIGINT back
    for that import wherever it happens (the CLI no longer imports Polars for commands that never use it):
    a Ctrl-C sent in the middle of it reaches Python's handler once the import is over, not before."""
    script = """
import os, signal, sys, time
from vsmtrace import interrupts
interrupts.install()
assert "polars" not in sys.modules
seen = []

class SigintInsidePolars:  # consulted for every module Polars imports while its body runs
    def find_spec(self, name, path=None, target=None):
        if name == "polars.functions":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.02)
            for _ in range(1000):
                pass
            seen.append(interrupts.count())
        return None

sys.meta_path.insert(1, SigintInsidePolars())
with interrupts.deferred(lambda n: None):
    import polars  # noqa: F401
    for _ in range(1000):
        pass
    print(seen, interrupts.count(), signal.getsignal(signal.SIGINT) is interrupts._handler)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, cwd=ROOT, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[0] 1 True\n", (r.stdout, r.stderr)
