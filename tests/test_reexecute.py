"""Guest re-execution (`vsmtrace replay --reexecute`) of `vsmtrace run --deterministic` traces, on real KVM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from recorder.reader import open_trace

pytestmark = pytest.mark.kvm

CASES = [
    ("hello", ""),
    ("det_timer", "mode=periodic"),
    ("det_timer", "mode=oneshot"),
    ("det_timer", "mode=periodic x2apic=1"),
    ("hv_stimer", ""),
]


def record(vsmtrace, kernel: Path, trace: Path, append: str = "", *extra: str):  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--deterministic", "--memory", "32", "--append", append, "--timeout", "60",
                  "--record", str(trace), *extra, str(kernel)], timeout=120)  # fmt: skip
    assert r.status & 1 == 1 and r.guest_exit_code == 0, (r.status, r.stdout[-500:], r.stderr)
    return r


def guest_exit_detail(trace: Path) -> dict:
    rows = open_trace(trace).table().to_pylist()
    (row,) = [r for r in rows if r["kind"] == "GUEST_EXIT"]
    return json.loads(row["detail"])


@pytest.mark.parametrize(("name", "append"), CASES, ids=[f"{n}-{a or 'default'}" for n, a in CASES])
def test_reexecution_reproduces_every_exit_and_ram(vsmtrace, guest, tmp_path: Path, name: str, append: str) -> None:
    trace = tmp_path / "t.vsmt"
    record(vsmtrace, guest(name), trace, append)
    md = open_trace(trace).metadata
    assert md["vm_config"]["deterministic"] is True and md["vm_config"]["clock_quantum_ns"] > 0
    detail = guest_exit_detail(trace)
    r = vsmtrace(["replay", "--reexecute", str(trace)], timeout=120)
    assert r.status == 0, r.stdout + r.stderr
    assert f"re-execution reproduced the trace: {detail['exits']} exits" in r.stdout
    assert "guest RAM identical" in r.stdout


def test_deterministic_recordings_are_identical(vsmtrace, guest, tmp_path: Path) -> None:
    """Same guest, same inputs: two recordings end with the same RAM after the same exits in virtual time."""
    kernel = guest("det_timer")
    a, b = tmp_path / "a.vsmt", tmp_path / "b.vsmt"
    ra = record(vsmtrace, kernel, a, "mode=oneshot")
    rb = record(vsmtrace, kernel, b, "mode=oneshot")
    assert ra.stdout == rb.stdout
    assert guest_exit_detail(a) == guest_exit_detail(b)


def test_nondeterministic_trace_is_refused(vsmtrace, guest, tmp_path: Path) -> None:
    trace = tmp_path / "live.vsmt"
    r = vsmtrace(["run", "--memory", "32", "--record", str(trace), str(guest("hello"))])
    assert r.guest_exit_code == 0, r.stderr
    r = vsmtrace(["replay", "--reexecute", str(trace)])
    assert r.status == 2
    assert r.stderr.startswith("vsmtrace: error: trace was not recorded with --deterministic: ")
    assert len(r.stderr.strip().splitlines()) == 1


def test_deterministic_needs_one_vp(vsmtrace, guest) -> None:
    r = vsmtrace(["run", "--deterministic", "--smp", "2", str(guest("hello"))])
    assert r.status == 2
    assert r.stderr.strip() == "vsmtrace: error: --deterministic needs --smp 1 (got 2): with several VPs, their interleaving is not decided at exits"


def test_changed_or_missing_image_is_refused(vsmtrace, guest, tmp_path: Path) -> None:
    kernel = tmp_path / "hello.elf"
    shutil.copy(guest("hello"), kernel)
    trace = tmp_path / "t.vsmt"
    record(vsmtrace, kernel, trace)
    with kernel.open("ab") as f:
        f.write(b"\0")
    r = vsmtrace(["replay", "--reexecute", str(trace)])
    assert r.status == 2 and "changed since recording" in r.stderr, r.stderr
    kernel.unlink()
    r = vsmtrace(["replay", "--reexecute", str(trace)])
    assert r.status == 2 and "is missing" in r.stderr, r.stderr


def rewrite(trace: Path, out: Path, row_index: int, column: str, value: int) -> None:
    table = open_trace(trace).table()
    values = table.column(column).to_pylist()
    values[row_index] = value
    i = table.schema.get_field_index(column)
    table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    with pa.OSFile(str(out), "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)


def test_perturbed_input_diverges_at_the_next_exit(vsmtrace, guest, tmp_path: Path) -> None:
    trace = tmp_path / "t.vsmt"
    record(vsmtrace, guest("det_timer"), trace, "mode=oneshot")
    rows = open_trace(trace).table().to_pylist()
    # apic_enable() reads IA32_APIC_BASE and writes it back with the enable bit: change what the read returned
    target = next(i for i, r in enumerate(rows) if r["kind"] == "MSR" and not r["is_write"] and r["msr"] == 0x1B)
    expected = next(r["seq"] for r in rows[target:] if r["kind"] == "EXIT" and r["gprs"] is not None)
    bad = tmp_path / "bad.vsmt"
    rewrite(trace, bad, target, "value", rows[target]["value"] ^ 0x100)
    r = vsmtrace(["replay", "--reexecute", str(bad)], timeout=120)
    assert r.status == 1, r.stdout + r.stderr
    assert f"first divergence: event {expected} (EXIT)" in r.stdout, r.stdout


def test_dump_memory_at_an_event(vsmtrace, guest, tmp_path: Path) -> None:
    kernel = guest("hello")
    trace = tmp_path / "t.vsmt"
    record(vsmtrace, kernel, trace)
    rows = open_trace(trace).table().to_pylist()
    first_exit = next(r["seq"] for r in rows if r["kind"] == "EXIT")
    out = tmp_path / "mem.bin"
    r = vsmtrace(["replay", "--reexecute", str(trace), "--dump-memory", f"{first_exit}:0x100000:4096:{out}"])
    assert r.status == 0, r.stdout + r.stderr
    data = out.read_bytes()
    assert len(data) == 4096
    assert (0x1BADB002).to_bytes(4, "little") in data  # the loaded kernel's Multiboot header
    r = vsmtrace(["replay", "--reexecute", str(trace), "--dump-memory", "nonsense"])
    assert r.status == 2 and "SEQ:GPA:LEN" in r.stderr
