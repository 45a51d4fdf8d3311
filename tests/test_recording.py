"""Recording real guests: every event kind appears, with values the guest itself confirms."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from vsmtrace.recorder import open_trace

from tests.conftest import ROOT, build_guest, run_vsmtrace

pytestmark = pytest.mark.kvm

DEMO_SOURCE = ROOT / "guests" / "vbs_demo.c"


def _record(tmp: Path, name: str, kernel: Path, *args: str) -> tuple[pl.DataFrame, str, int]:
    trace = tmp / f"{name}.arrow"
    result = run_vsmtrace(["run", "--timeout", "120", "--record", str(trace), *args, str(kernel)], timeout=200)
    frame = pl.from_arrow(open_trace(trace).table())
    assert isinstance(frame, pl.DataFrame)
    return frame, result.stdout, result.status


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, str]:
    from tests.conftest import kvm_problem

    if kvm_problem() is not None:
        pytest.skip(f"needs KVM: {kvm_problem()}")
    kernel = build_guest("vbs_demo", sources=[str(DEMO_SOURCE)])
    frame, stdout, status = _record(tmp_path_factory.mktemp("rec"), "demo", kernel, "--smp", "2")
    assert status == 1, stdout[-2000:]
    return frame, stdout


def kinds(frame: pl.DataFrame) -> set[str]:
    return set(frame["kind"].cast(pl.String).unique().to_list())


def of(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    return frame.filter(pl.col("kind").cast(pl.String) == kind)


def test_demo_trace_has_every_vsm_kind(demo: tuple[pl.DataFrame, str]) -> None:
    frame, _ = demo
    expected = {
        "VP_START", "VP_STOP", "EXIT", "PIO", "MMIO", "MSR", "CPUID", "INTERRUPT", "HYPERCALL", "VTL_SWITCH",
        "INTERCEPT", "PROTECTION", "SYNIC_MESSAGE", "VTL_ENABLE", "GUEST_EXIT", "SERIAL", "EMULATION",
    }  # fmt: skip
    assert expected <= kinds(frame), expected - kinds(frame)
    assert frame["seq"].to_list() == list(range(frame.height))


def test_serial_events_are_the_console(demo: tuple[pl.DataFrame, str]) -> None:
    frame, stdout = demo
    lines = of(frame, "SERIAL")["serial_data"].to_list()
    assert b"".join(lines).decode() == stdout
    # one event per console line (vmm.console_output), each with the VP that printed it
    assert [line.decode() for line in lines] == stdout.splitlines(keepends=True)
    exit_row = of(frame, "GUEST_EXIT").row(0, named=True)
    assert exit_row["exit_status"] == 0


def test_secure_calls_match_the_guest_summary(demo: tuple[pl.DataFrame, str]) -> None:
    frame, stdout = demo
    m = re.search(r"get_random=(\d+) seal_key=(\d+) verify_image=(\d+), VP1 attest=(\d+)", stdout)
    assert m is not None
    calls = of(frame, "VTL_SWITCH").filter(pl.col("reason") == "call")
    service = calls.with_columns(pl.col("args").list.get(0).alias("service"))
    count = dict(service.group_by("service").len().iter_rows())
    assert count.get(0x1001) == int(m.group(1))
    assert count.get(0x1002) == int(m.group(2))
    assert count.get(0x1003) == int(m.group(3))
    assert count.get(0x1004) == int(m.group(4))
    vp1 = service.filter(pl.col("service") == 0x1004)["vp"].unique().to_list()
    assert vp1 == [1]
    returns = of(frame, "VTL_SWITCH").filter(pl.col("reason") == "return")
    assert returns.height >= calls.height


def test_intercepts_name_the_addresses_the_guest_printed(demo: tuple[pl.DataFrame, str]) -> None:
    frame, stdout = demo
    secret = int(re.search(r"reading the secure kernel's secret at (0x[0-9a-f]+)", stdout).group(1), 16)  # type: ignore[union-attr]
    code = int(re.search(r"patching kernel code at (0x[0-9a-f]+)", stdout).group(1), 16)  # type: ignore[union-attr]
    icpt = of(frame, "INTERCEPT").sort("seq")
    assert icpt.select("access", "gpa").rows() == [("read", secret), ("write", code)]
    for row in icpt.iter_rows(named=True):
        assert row["vp"] == 0 and row["vtl"] == 0
        assert len(row["message"]) == 256 and row["insn_bytes"]
        assert int.from_bytes(row["message"][0:4], "little") == 0x80000001  # HvMessageTypeGpaIntercept
    # VTL1 answered each one by injecting #GP into VTL0.
    gp = of(frame, "INTERRUPT").filter((pl.col("source") == "exception") & (pl.col("vector") == 13))
    assert gp.height == 2 and set(gp["vtl"].to_list()) == {0}
    prot = of(frame, "PROTECTION")
    assert (secret & ~0xFFF) in prot.filter(pl.col("new_mask") == 0)["gpa_start"].to_list()
    assert (code & ~0xFFF) in prot.filter(pl.col("new_mask") == 5)["gpa_start"].to_list()


def test_cpuid_events_show_the_hyperv_interface(demo: tuple[pl.DataFrame, str]) -> None:
    frame, _ = demo
    leaf = of(frame, "CPUID").filter((pl.col("leaf") == 0x40000000) & (pl.col("vp") == 0) & (pl.col("vtl") == 0))
    row = leaf.row(0, named=True)
    vendor = b"".join(row[r].to_bytes(4, "little") for r in ("ebx", "ecx", "edx"))
    assert vendor == b"Microsoft Hv"


def test_hypercalls_and_vtl_enable(demo: tuple[pl.DataFrame, str]) -> None:
    frame, _ = demo
    hc = of(frame, "HYPERCALL")
    names = set(hc["name"].cast(pl.String).to_list())
    assert {"HvCallEnablePartitionVtl", "HvCallEnableVpVtl", "HvCallVtlCall", "HvCallVtlReturn",
            "HvCallModifyVtlProtectionMask", "HvCallStartVirtualProcessor"} <= names  # fmt: skip
    enable = of(frame, "VTL_ENABLE")
    assert set(enable["target_vtl"].to_list()) == {1}
    assert {0, 1} <= set(enable["target_vp"].drop_nulls().to_list())


def test_stimer_and_crash_kinds(tmp_path: Path) -> None:
    frame, _, status = _record(tmp_path, "stimer", build_guest("hv_stimer"))
    assert "TIMER" in kinds(frame)
    timers = of(frame, "TIMER")
    assert set(timers["timer"].cast(pl.String).to_list()) <= {f"stimer{i}" for i in range(4)}
    frame, stdout, status = _record(tmp_path, "crash", build_guest("hv_crash"))
    assert status == 4
    errors = of(frame, "ERROR")
    assert errors.height >= 1 and "crash" in errors["text"][0]


def test_trace_survives_sigkill_of_a_real_run(tmp_path: Path) -> None:
    """Killing the VMM mid-run leaves every flushed batch readable and the tail reported."""
    kernel = build_guest("apic_timer")
    trace = tmp_path / "killed.arrow"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vsmtrace.cli", "run", "--record", str(trace), "--append", "mode=periodic count=50000000",
         str(kernel)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not trace.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    header = trace.stat().st_size  # schema and metadata only
    while trace.stat().st_size < header + 4096 and time.monotonic() < deadline:
        time.sleep(0.02)  # batches are reaching the disk while the guest runs
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    t = open_trace(trace)
    assert not t.sealed
    frame = pl.from_arrow(t.table())
    assert isinstance(frame, pl.DataFrame) and frame.height > 0
    assert frame["seq"].to_list() == list(range(frame.height))
    info = run_vsmtrace(["info", str(trace)])
    assert info.status == 0 and ("unsealed" in info.stdout or "recovered" in info.stdout)


def _port_events(sink: object, kernel: Path) -> bool:
    """Run ``kernel`` in-process (as ``vsmtrace run`` does, Hyper-V on) into ``sink``; did KVM_RUN record in C?"""
    import io

    from vsmtrace.vmm.builder import build_machine
    from vsmtrace.vmm.config import MachineConfig
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    machine = build_machine(MachineConfig(kernel=kernel, serial_out=io.BytesIO(), hyperv=HypervPolicy()))
    machine.sink = sink  # type: ignore[assignment]
    try:
        machine.boot()
        assert machine.run() == 1
        return machine.vps[0].vcpus[0].exit_recorder is not None
    finally:
        machine.close()


def test_port_exits_recorded_inside_kvm_run_match_the_python_path(tmp_path: Path) -> None:
    """OUTs to device ports are recorded by vsm_kvm_run_recorded (C), INs and the rest by Python:
    the trace must hold exactly the events, values and order that Python alone produces."""
    from vsmtrace.recorder.writer import TraceWriter
    from vsmtrace.vmm.events import EventKind, ListSink

    kernel = build_guest("ports")
    python_only = ListSink()  # no native_io: every PIO event goes through record_io in Python
    assert not _port_events(python_only, kernel)
    writer = TraceWriter(tmp_path / "ports.arrow", {})
    assert _port_events(writer, kernel)
    writer.close()

    shown = (EventKind.PIO, EventKind.SERIAL, EventKind.GUEST_EXIT)
    expected = [
        (kind.name, vp, vtl, rip, fields.get("address"), fields.get("size"), fields.get("is_write"), fields.get("data"))
        for kind, vp, vtl, rip, fields in python_only.events
        if kind in shown
    ]
    rows = open_trace(tmp_path / "ports.arrow").table().to_pylist()
    got = [
        (r["kind"], r["vp"], r["vtl"], r["rip"], r["address"], r["size"], r["is_write"], r["data"] if r["kind"] == "PIO" else r["serial_data"])
        for r in rows
        if r["kind"] in {k.name for k in shown}
    ]
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    assert got == expected
    writes = {e[4] for e in got if e[0] == "PIO" and e[6]}
    reads = {e[4] for e in got if e[0] == "PIO" and not e[6]}
    assert {0x80, 0x20, 0xA0, 0x3F8} <= writes and 0x1234 in reads  # both paths were exercised
