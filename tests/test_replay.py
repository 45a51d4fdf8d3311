"""VMM replay (``vsmtrace replay``, ``replayer.engine.VmmReplayer``) against real recordings.

* every guest in guests/programs that runs to completion, on 1 and 2+ VPs: record with
  ``vsmtrace run --record``, then ``vsmtrace replay`` must print "replay verified";
* a trace with one perturbed value: the report names exactly that event and field;
* a VMM with an injected handler bug: the first divergence is the buggy hypercall;
* the state at an event matches what the guest printed at that point;
* traces that cannot be replayed: one ``vsmtrace: error:`` line, exit status 2.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pytest
from vsmtrace.recorder.reader import open_trace
from vsmtrace.replayer.engine import VmmReplayer, format_report
from vsmtrace.replayer.errors import ReplayError

from tests.conftest import ROOT, RunResult
from tests.guests import PROGRAMS_DIR

GUEST_TIMEOUT = 60  # seconds given to the guest (vsmtrace run --timeout)

# guest -> list of `vsmtrace run` argument lists (one recorded run each). Guests not
# listed here run with no arguments if they are hv_*/vsm_* guests (so new feature guests
# are replayed as soon as they exist); any other unlisted guest fails
# test_every_guest_is_replayed until it is added here or to NOT_REPLAYED.
RUNS: dict[str, list[list[str]]] = {
    "hello": [[]],
    "exitcode": [["--append", "exit=3"]],
    "bootinfo": [["--append", "a=b"]],
    "ports": [[]],
    "post_loop": [["--append", "n=5000"]],  # OUTs to port 0x80 recorded, and completed, in C
    "fwcfg": [[]],
    "raw64": [[]],
    "fault": [["--append", "fault=safe"], ["--append", "fault=gp"]],
    "stop": [["--append", "how=triple"]],
    "completions": [[]],
    "cpuid_bits": [[]],
    "ioapic": [["--smp", "2"]],
    "pc_testdev": [["--smp", "2"]],
    "smp": [["--smp", "2", "--append", "cpus=2"], ["--smp", "4", "--append", "cpus=4 x2apic=1"]],
    "ipi": [["--smp", "2", "--append", "cpus=2"], ["--smp", "3", "--append", "cpus=3 x2apic=1"]],
    "apic_timer": [["--append", f"mode={m}"] for m in ("oneshot", "periodic", "deadline")],
    "det_timer": [[], ["--deterministic", "--append", "mode=oneshot"]],
    "hv_cpuid": [[], ["--smp", "2", "--append", "cpus=2"]],
    "hv_synic": [[], ["--hv-disable", "post-messages", "--hv-disable", "signal-events", "--append", "privileges=off"]],
    "hv_hypercall": [[], ["--hv-disable", "xmm-input", "--append", "xmm=off"]],
    "hv_ipi": [["--smp", "3", "--append", "cpus=3"], ["--smp", "4", "--append", "cpus=4"]],
    "hv_tlbflush": [["--smp", "2"]],
    "hv_crash": [[]],
    "hv_replay": [[], ["--smp", "3", "--append", "cpus=3 loop=50"]],
    "vsm_smp": [["--smp", "2"]],
    "vsm_deadlock": [["--smp", "2"]],
    "vsm_state": [[], ["--smp", "2"]],
    "cpuid_apic": [["--smp", "2"]],
    "hv_refcount": [["--smp", "2", "--append", "cpus=2 rounds=500"]],
    "hv_testdev": [["--smp", "2"], ["--smp", "2", "--no-vsm"]],
    "msr_latency": [["--smp", "2", "--append", "cpus=2 n=200"]],
}
NOT_REPLAYED: dict[str, str] = {  # guest -> why
    "reset": "a recording ends at the guest's reset (status 8): recorded and replayed in tests/test_reset.py",
    "echo": "waits for a line on the serial port (fed from stdin in test_foundation); it makes no Hyper-V call",
    "pvh": "a PVH kernel only when built with pvh_note.S (tests/test_pvh.py); it makes no Hyper-V call",
}
CPUID_ONLY = {"hv_cpuid"}  # Hyper-V guests that only read CPUID (checked against vm_config, no emulation entry)


def guest_names() -> list[str]:
    return sorted(p.stem for p in PROGRAMS_DIR.glob("*.c"))


def run_cases() -> list[Any]:
    cases = []
    for name in guest_names():
        runs = RUNS.get(name) or ([[]] if name.startswith(("hv_", "vsm_")) else [])
        for args in runs:
            smp = args[args.index("--smp") + 1] if "--smp" in args else "1"
            cases.append(pytest.param(name, args, id=f"{name}-{smp}vp-{'-'.join(a.lstrip('-') for a in args if a != '--smp')[:40] or 'default'}"))
    return cases


def record(vsmtrace: Callable[..., RunResult], kernel: Path, trace: Path, args: list[str]) -> RunResult:
    """``vsmtrace run --record``; the guest must end by itself (not the timeout), the trace sealed."""
    r = vsmtrace(["run", "--timeout", str(GUEST_TIMEOUT), "--record", str(trace), *args, str(kernel)], timeout=GUEST_TIMEOUT + 60)
    assert r.status != 124, f"guest timed out\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.status & 1 or r.status == 4, f"status {r.status}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"  # debug-exit, or a guest fault stop
    assert open_trace(trace).sealed
    return r


def replay(vsmtrace: Callable[..., RunResult], trace: Path, *args: str, timeout: float = 300) -> RunResult:
    return vsmtrace(["replay", "--no-progress", str(trace), *args], timeout=timeout)


# -- every guest: record, replay, verified ---------------------------------------------------------


def test_every_guest_is_replayed() -> None:
    """No guest is skipped silently: each one is in RUNS, is an hv_*/vsm_* guest, or says why not."""
    unlisted = [g for g in guest_names() if g not in RUNS and g not in NOT_REPLAYED and not g.startswith(("hv_", "vsm_"))]
    assert not unlisted, f"add these guests to RUNS in tests/test_replay.py: {unlisted}"


@pytest.mark.parametrize(("name", "args"), run_cases())
def test_record_then_replay_verified(kvm, guest, vsmtrace, tmp_path: Path, name: str, args: list[str]) -> None:  # type: ignore[no-untyped-def]
    kernel = guest(name, raw64=name == "raw64")
    trace = tmp_path / f"{name}.arrow"
    record(vsmtrace, kernel, trace, args)
    r = replay(vsmtrace, trace)
    assert r.status == 0, f"{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    m = re.search(r"^replay verified: (\d+) emulation entries reproduced bit for bit \(\d+ events in the trace\)"
                  r"(?:; (\d+) Hyper-V CPUID leaves as recorded)?$", r.stdout, re.M)  # fmt: skip
    assert m is not None, r.stdout
    if "--no-hyperv" not in args:
        assert int(m.group(2) or 0) == 11, "the Hyper-V CPUID leaves were not checked"
    if name.startswith(("hv_", "vsm_")) and name not in CPUID_ONLY:
        assert int(m.group(1)) > 0, "a Hyper-V guest with no emulation entry recorded: nothing was replayed"
    assert r.stderr == ""


# -- one recorded hv_replay trace shared by the tests below ----------------------------------------------


@pytest.fixture(scope="module")
def hv_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """hv_replay on 2 VPs with a short loop: (trace, guest stdout)."""
    from tests.conftest import kvm_problem, run_vsmtrace
    from tests.guests import build_guest

    problem = kvm_problem()
    if problem is not None:
        import os

        if os.environ.get("VSMTRACE_REQUIRE_KVM"):
            pytest.fail(f"KVM test cannot run: {problem}")
        pytest.skip(f"needs KVM: {problem}")
    trace = tmp_path_factory.mktemp("replay") / "hv_replay.arrow"
    r = record(run_vsmtrace, build_guest("hv_replay"), trace, ["--smp", "2", "--append", "cpus=2 loop=3"])
    assert r.status == 1 and "hv_replay done" in r.stdout, r.stdout
    return trace, r.stdout


def load(path: Path) -> pa.Table:
    return open_trace(path).table()


def write(table: pa.Table, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``table`` as a sealed-format trace (Arrow IPC file), optionally with other vsmtrace metadata."""
    schema = table.schema
    if metadata is not None:
        schema = schema.with_metadata({b"vsmtrace": json.dumps(metadata).encode()})
        table = table.cast(schema)
    with ipc.new_file(str(path), schema) as w:
        w.write_table(table)
    return path


def metadata_of(path: Path) -> dict[str, Any]:
    return json.loads(load(path).schema.metadata[b"vsmtrace"])


def set_value(table: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    index = table.schema.get_field_index(column)
    values = table.column(column).to_pylist()
    values[row] = value
    return table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type))


def emulation_rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.filter(pc.equal(pc.cast(table.column("kind"), pa.string()), "EMULATION"))
    return rows.select(["seq", "entry", "emu_args", "emu_io", "emu_result"]).to_pylist()


def partition_id_entry(table: pa.Table) -> tuple[int, list[Any]]:
    """(seq, io log) of the first fast HvCallGetPartitionId entry (control 0x10046)."""
    for r in emulation_rows(table):
        io = json.loads(r["emu_io"])
        if r["entry"] == "hypercall" and ["get_register", [0, 0, "rcx"], 0x10046] in io:
            return r["seq"], io
    raise AssertionError("no fast HvCallGetPartitionId in the trace")


def report_of(path: Path) -> str:
    return format_report(VmmReplayer(path).run())


# -- perturbations: the report names exactly the changed event and field -------------------------------


def test_perturbed_hypercall_status(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """HYPERCALL.status of one event changed: divergence at that event, field status."""
    table = load(hv_trace[0])
    seq, io = partition_id_entry(table)
    hypercall_seq = next(op[2] for op in io if op[0] == "emit")
    assert table.column("kind")[hypercall_seq].as_py() == "HYPERCALL"
    bad = write(set_value(table, "status", hypercall_seq, 5), tmp_path / "status.arrow")
    r = replay(vsmtrace, bad)
    assert r.status == 1, r.stdout
    assert f"DIVERGENCE at event {hypercall_seq} (HYPERCALL), field status:" in r.stdout
    assert "  recorded: 5\n  replayed: 0\n" in r.stdout
    assert f"emitted while replaying emulation entry 'hypercall' of event {seq}" in r.stdout


def _perturb_io(table: pa.Table, seq: int, io: list[Any], index: int, value: Any) -> pa.Table:
    io = json.loads(json.dumps(io))
    io[index][1 if io[index][0].startswith("set_") else 2] = value  # an output's args, or an input's result
    return set_value(table, "emu_io", seq, json.dumps(io, separators=(",", ":")).encode())


def test_perturbed_output_in_io_log(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The recorded RDX output (the partition id) of one entry changed: divergence at that entry, that io slot."""
    table = load(hv_trace[0])
    seq, io = partition_id_entry(table)
    index = io.index(["set_register", [0, 0, "rdx", 1], None])
    bad = write(_perturb_io(table, seq, io, index, [0, 0, "rdx", 7]), tmp_path / "out.arrow")
    r = replay(vsmtrace, bad)
    assert r.status == 1
    assert f"DIVERGENCE at event {seq} (EMULATION), field hypercall: io[{index}]:" in r.stdout
    assert "recorded: \"set_register(0, 0, 'rdx', 7)\"" in r.stdout
    assert "replayed: \"set_register(0, 0, 'rdx', 1)\"" in r.stdout


def test_perturbed_input_in_io_log(kvm, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An input (RCX, the control word) changed: the replayed emulation takes the other path and
    the divergence is reported at that entry, at the first output that differs."""
    table = load(hv_trace[0])
    seq, io = partition_id_entry(table)
    index = io.index(["get_register", [0, 0, "rcx"], 0x10046])
    bad = write(_perturb_io(table, seq, io, index, 0x10047), tmp_path / "in.arrow")  # an unknown call code
    report = VmmReplayer(bad).run()
    assert report.divergence is not None
    assert report.divergence.seq == seq and report.divergence.kind == "EMULATION"
    assert report.divergence.field.startswith("hypercall: io[")
    assert int(report.divergence.field.split("[")[1].rstrip("]")) > index
    assert report.entries == _order(table, seq)  # every entry before it replayed identically


def _order(table: pa.Table, seq: int) -> int:
    return int(table.column("emu_order")[seq].as_py())


def test_perturbed_event_kind(kvm, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An emitted MSR event recorded as another kind: divergence at that event, field kind."""
    table = load(hv_trace[0])
    kinds = pc.cast(table.column("kind"), pa.string()).to_pylist()
    msr_seq = next(op[2] for r in emulation_rows(table) if r["entry"] == "msr_read" for op in json.loads(r["emu_io"]) if op[0] == "emit")
    assert kinds[msr_seq] == "MSR"
    kinds[msr_seq] = "CPUID"
    index = table.schema.get_field_index("kind")
    field = table.schema.field(index)
    bad = write(table.set_column(index, field, pa.array(kinds).dictionary_encode().cast(field.type)), tmp_path / "kind.arrow")
    d = VmmReplayer(bad).run().divergence
    assert d is not None and (d.seq, d.field, d.recorded, d.replayed) == (msr_seq, "kind", "CPUID", "MSR")


def test_perturbed_entry_result(kvm, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The recorded return value of an MSR read entry changed: divergence at that entry, field 'msr_read result'."""
    table = load(hv_trace[0])
    row = next(r for r in emulation_rows(table) if r["entry"] == "msr_read" and json.loads(r["emu_args"])[2] == 0x40000083)  # SIMP
    recorded = json.loads(row["emu_result"])
    bad = write(set_value(table, "emu_result", row["seq"], json.dumps(recorded ^ 0x1000).encode()), tmp_path / "res.arrow")
    text = report_of(bad)
    assert text.startswith(f"DIVERGENCE at event {row['seq']} (EMULATION), field msr_read result:\n")
    assert f"recorded: {recorded ^ 0x1000}\n  replayed: {recorded}\n" in text


def test_perturbed_cpuid_leaf_in_vm_config(kvm, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CPUID leaves are set once at VM creation (no exit, no event): replay checks them against vm_config."""
    md = metadata_of(hv_trace[0])
    leaves = md["vm_config"]["cpuid_policy"]["extra_leaves"]
    features = next(e for e in leaves if e[0] == 0x40000003)
    recorded_ebx = features[4]
    features[4] ^= 1 << 12  # AccessVsm
    text = report_of(write(load(hv_trace[0]), tmp_path / "cpuid.arrow", md))
    assert text.startswith("DIVERGENCE in the recorded VM configuration, field cpuid 0x40000003.0 ebx:\n")
    assert f"replayed: {recorded_ebx}" in text


def test_unperturbed_copy_still_verifies(kvm, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The rewrite itself changes nothing (so the tests above see only their perturbation)."""
    copy = write(load(hv_trace[0]), tmp_path / "copy.arrow")
    assert report_of(copy).startswith("replay verified:")


# -- an injected handler bug: first divergence at the buggy hypercall ---------------------------------


def test_injected_handler_bug_found_at_first_call(kvm, hv_trace, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from vsmtrace.vmm.hyperv.handlers import misc
    from vsmtrace.vmm.hyperv.hvdef import HvOutputGetPartitionId
    from vsmtrace.vmm.hyperv.hypercall import HypercallResult

    def buggy_get_partition_id(hv: Any, inp: Any) -> HypercallResult:
        return HypercallResult(output=HvOutputGetPartitionId(hv.partition_id + 1).pack())

    table = load(hv_trace[0])
    seq, io = partition_id_entry(table)
    monkeypatch.setattr(misc, "get_partition_id", buggy_get_partition_id)
    report = VmmReplayer(hv_trace[0]).run()
    d = report.divergence
    assert d is not None
    assert (d.seq, d.kind, d.entry) == (seq, "EMULATION", "hypercall")
    assert d.recorded == "set_register(0, 0, 'rdx', 1)" and d.replayed == "set_register(0, 0, 'rdx', 2)"
    assert report.entries == _order(table, seq)  # every entry before it replayed identically


def test_injected_status_bug(kvm, hv_trace, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A wrong status from HvCallGetVpIndexFromApicId: divergence at its first call."""
    from vsmtrace.vmm.hyperv.handlers import misc
    from vsmtrace.vmm.hyperv.hvdef import HvStatus
    from vsmtrace.vmm.hyperv.hypercall import HypercallResult

    monkeypatch.setattr(misc, "get_vp_index_from_apic_id", lambda hv, inp: HypercallResult(HvStatus.HV_STATUS_INVALID_PARAMETER))
    table = load(hv_trace[0])
    first = next(
        r["seq"] for r in emulation_rows(table)
        if r["entry"] == "hypercall" and any(op[:2] == ["get_register", [0, 0, "rcx"]] and op[2] & 0xFFFF == 0x9A for op in json.loads(r["emu_io"]))
    )  # fmt: skip
    d = VmmReplayer(hv_trace[0]).run().divergence
    assert d is not None and d.entry_seq == first


# -- state at an event = what the guest printed there ----------------------------------------------------


def serial_lines(table: pa.Table) -> list[tuple[int, str]]:
    """(seq of the SERIAL event that ended the line, line text) for the guest's console output."""
    rows = table.filter(pc.equal(pc.cast(table.column("kind"), pa.string()), "SERIAL")).select(["seq", "serial_data"]).to_pylist()
    out, line = [], b""
    for r in rows:
        line += r["serial_data"] or b""
        if line.endswith(b"\n"):
            out.append((r["seq"], line.decode().rstrip("\n")))
            line = b""
    return out


def state_json(vsmtrace, trace: Path, seq: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = replay(vsmtrace, trace, "--state", str(seq), "--json")
    assert r.status == 0, r.stderr
    return json.loads(r.stdout)


def test_state_matches_guest_output(kvm, vsmtrace, hv_trace) -> None:  # type: ignore[no-untyped-def]
    trace, _stdout = hv_trace
    lines = serial_lines(load(trace))
    seen = 0
    for seq, text in lines:
        if m := re.fullmatch(r"guest_os_id=0x([0-9a-f]+) hypercall=0x([0-9a-f]+)", text):
            msrs = state_json(vsmtrace, trace, seq)["partition"]["msrs"]["vtl0"]
            assert (msrs["guest_os_id"], msrs["hypercall"]) == (int(m.group(1), 16), int(m.group(2), 16))
            seen += 1
        elif m := re.fullmatch(r"partition_id=0x([0-9a-f]+)", text):
            state = state_json(vsmtrace, trace, seq)
            rdx = state["vps"]["vp0"]["vtl0"]["registers"]["rdx"]
            assert rdx["value"] == int(m.group(1), 16) == state["partition"]["partition_id"]
            assert rdx["seq"] < seq  # written by the hypercall before the guest printed it
            seen += 1
        elif m := re.fullmatch(r"cpu (\d+) vp_index=(\d+) scontrol=0x(\w+) simp=0x(\w+) siefp=0x(\w+) sint2=0x(\w+)", text):
            cpu, vp_index, scontrol, simp, siefp, sint2 = (int(m.group(1)), int(m.group(2)), *(int(g, 16) for g in m.groups()[2:]))
            synic = state_json(vsmtrace, trace, seq)["vps"][f"vp{vp_index}"]["vtl0"]["synic"]
            assert vp_index == cpu
            assert (synic["scontrol"], synic["simp"], synic["siefp"], synic["sints"][2]) == (scontrol, simp, siefp, sint2)
            seen += 1
        elif m := re.fullmatch(r"stimer0 config=0x(\w+) count=(\d+)", text):
            timer = state_json(vsmtrace, trace, seq)["vps"]["vp0"]["vtl0"]["synic"]["stimers"][0]
            assert (timer["config"], timer["count"]) == (int(m.group(1), 16), int(m.group(2)))
            assert timer["deadline"] is not None  # armed
            seen += 1
    assert seen == 5, lines  # guest_os_id, partition_id, 2 SynIC lines, stimer0


def test_state_text_and_api(kvm, vsmtrace, hv_trace) -> None:  # type: ignore[no-untyped-def]
    """--state without --json; state_at() equals the state states() passes through; states() is incremental."""
    trace = hv_trace[0]
    table = load(trace)
    seq, _ = partition_id_entry(table)
    r = replay(vsmtrace, trace, "--state", str(seq))
    assert r.status == 0
    assert f"state after event {seq} " in r.stdout and "partition id 0x1" in r.stdout
    assert re.search(rf"^    rdx +0x1  \(event {seq}\)$", r.stdout, re.M)
    at = VmmReplayer(trace).state_at(seq).to_dict()
    walked = VmmReplayer(trace)
    count = 0
    for s, state in walked.states():
        count += 1
        if s == seq:
            snapshot = state.to_dict()
            break
    assert count == walked.state.entries and count == _order(table, seq) + 1
    assert snapshot["vps"] == at["vps"] and snapshot["partition"] == at["partition"]


def test_state_folds_the_logs_it_has_not_seen(kvm, hv_trace) -> None:  # type: ignore[no-untyped-def]
    """Registers come from the replayed entries' logs, whenever the state is read: during states() or after run()."""
    trace = hv_trace[0]
    seq, _ = partition_id_entry(load(trace))
    walked = VmmReplayer(trace)
    for s, state in walked.states():
        if s == seq:
            assert state.registers[(0, 0)]["rdx"] == (1, seq)  # the partition id the entry wrote
            break
    ran = VmmReplayer(trace)
    assert ran.run().divergence is None
    last = ran.entries[-1]
    assert all(s <= ran.state.seq for regs in ran.state.registers.values() for _, s in regs.values())
    assert ran.state.seq == last.seq and ran.state.entries == len(ran.entries)


def test_break_at_stops_before_the_entry(kvm, hv_trace, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """--break-at SEQ calls breakpoint() (so PYTHONBREAKPOINT applies) before that entry runs."""
    import sys

    trace = hv_trace[0]
    seq, io = partition_id_entry(load(trace))
    emitted = next(op[2] for op in io if op[0] == "emit")
    stops: list[tuple[int, int]] = []
    replayer = VmmReplayer(trace, break_at=emitted)  # the HYPERCALL event: stops before the entry that emitted it
    monkeypatch.setattr(sys, "breakpointhook", lambda *a, **k: stops.append((replayer.cursor.seq, replayer.state.entries)))
    report = replayer.run()
    assert report.divergence is None
    assert stops == [(seq, _order(load(trace), seq))]
    assert f"stopping before entry 'hypercall' of event {seq}" in capsys.readouterr().out


def test_break_at_cli_honours_pythonbreakpoint(kvm, hv_trace) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    trace = hv_trace[0]
    seq, _ = partition_id_entry(load(trace))
    env = {**os.environ, "PYTHONBREAKPOINT": "0"}  # breakpoints off: the replay goes on
    r = subprocess.run([sys.executable, "-m", "vsmtrace.cli", "replay", "--no-progress", "--break-at", str(seq), str(trace)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"stopping before entry 'hypercall' of event {seq}" in r.stdout and "replay verified" in r.stdout


def test_progress_bar(kvm, vsmtrace, hv_trace) -> None:  # type: ignore[no-untyped-def]
    r = vsmtrace(["replay", "--progress", str(hv_trace[0])], timeout=300)
    assert r.status == 0 and "replay verified" in r.stdout
    assert re.search(r"replay: +\d+%.*entry", r.stderr), r.stderr


# -- traces that cannot be replayed: one line, status 2 ---------------------------------------------------


def assert_one_line_error(r: RunResult, *needles: str) -> None:
    assert r.status == 2, (r.status, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsmtrace: error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_truncated_sealed_trace(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = hv_trace[0].read_bytes()
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(replay(vsmtrace, cut), "no complete events", "truncated")


def test_torn_stream_replays_its_complete_prefix(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A recording cut short (killed VMM: a stream with a torn tail) replays up to the cut, and says so."""
    table = load(hv_trace[0])
    stream = tmp_path / "stream.arrow"
    with ipc.new_stream(str(stream), table.schema) as w:
        for batch in table.to_batches(max_chunksize=100):
            w.write_batch(batch)
    data = stream.read_bytes()
    stream.write_bytes(data[: int(len(data) * 0.6)])
    r = replay(vsmtrace, stream)
    assert r.status == 0, r.stdout + r.stderr
    assert "replay verified:" in r.stdout and "note: the trace is truncated (recovered: torn tail at byte" in r.stdout
    entries = int(re.search(r"verified: (\d+) emulation", r.stdout).group(1))  # type: ignore[union-attr]
    assert 0 < entries < len(VmmReplayer(hv_trace[0]).entries)


def test_foreign_file(vsmtrace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "notes.txt"
    f.write_text("not a trace\n" * 20)
    assert_one_line_error(replay(vsmtrace, f), "not an Arrow IPC trace")


def test_missing_file_and_directory(vsmtrace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert_one_line_error(replay(vsmtrace, tmp_path / "nope.arrow"), "no such file")
    assert_one_line_error(replay(vsmtrace, tmp_path), "is a directory")


def test_newer_schema_version(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    md = metadata_of(hv_trace[0]) | {"schema_version": 99}
    assert_one_line_error(replay(vsmtrace, write(load(hv_trace[0]), tmp_path / "v99.arrow", md)), "99")


def test_trace_without_vm_config(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    md = {k: v for k, v in metadata_of(hv_trace[0]).items() if k != "vm_config"}
    assert_one_line_error(replay(vsmtrace, write(load(hv_trace[0]), tmp_path / "nocfg.arrow", md)), "VM configuration")


def test_trace_without_emulation_events(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """HYPERCALL events but no EMULATION rows: the inputs are missing, not "verified with 0 entries"."""
    table = load(hv_trace[0])
    kept = table.filter(pc.not_equal(pc.cast(table.column("kind"), pa.string()), "EMULATION"))
    kept = kept.set_column(0, kept.schema.field(0), pa.array(range(kept.num_rows), kept.schema.field(0).type))
    assert_one_line_error(replay(vsmtrace, write(kept, tmp_path / "noemu.arrow")), "missing inputs", "HYPERCALL")


def test_trace_missing_one_entry(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = load(hv_trace[0])
    seq, _ = partition_id_entry(table)
    kept = table.filter(pc.not_equal(table.column("seq"), seq))
    assert_one_line_error(replay(vsmtrace, write(kept, tmp_path / "gap.arrow")), "missing inputs", f"#{_order(table, seq)}")


def test_trace_without_emulation_columns(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = load(hv_trace[0])
    old = table.drop_columns(["emu_io"])
    assert_one_line_error(replay(vsmtrace, write(old, tmp_path / "old.arrow")), "emu_io")


def test_damaged_io_log(kvm, vsmtrace, hv_trace, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    table = load(hv_trace[0])
    seq, _ = partition_id_entry(table)
    bad = write(set_value(table, "emu_io", seq, b'[["get_register",'), tmp_path / "json.arrow")
    assert_one_line_error(replay(vsmtrace, bad), f"event {seq}", "unreadable I/O log")


def test_state_of_missing_event(kvm, vsmtrace, hv_trace) -> None:  # type: ignore[no-untyped-def]
    n = load(hv_trace[0]).num_rows
    assert_one_line_error(replay(vsmtrace, hv_trace[0], "--state", str(n + 10)), f"event {n + 10}")


def test_replay_error_is_an_exception_for_the_api(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such file"):
        VmmReplayer(tmp_path / "missing.arrow")


def test_vp_calls_compare_arguments_as_recorded_encodings() -> None:
    """The unencoded fast path accepts only what encodes to itself; anything else is encoded and decided as recorded."""
    from vsmtrace.replayer.errors import Divergence
    from vsmtrace.replayer.trace_backend import OpCursor, ReplayPartition
    from vsmtrace.vmm.vp import Access

    cursor = OpCursor()
    partition = ReplayPartition(1, cursor)
    vp = partition.vp(0)
    cursor.start(7, "hypercall", [["set_register", [0, 0, "rax", 4], None]])
    with pytest.raises(TypeError, match="cannot encode float"):  # 4.0 == 4, but a float is no register value
        vp.set_register(0, "rax", 4.0)
    cursor.start(7, "hypercall", [["read_gpa", [0, 4096, 2, 2], {"b": "0001"}], ["write_gpa", [0, 4096, {"b": "0102"}], None]])
    assert partition.read_gpa(0, 4096, 2, Access.WRITE) == b"\x00\x01"
    partition.write_gpa(0, 4096, bytearray(b"\x01\x02"))
    cursor.finish()
    cursor.start(7, "hypercall", [["get_register", [0, 0, "rip"], 16]])
    with pytest.raises(Divergence) as raised:
        vp.get_register(1, "rip")
    assert (raised.value.field, raised.value.recorded, raised.value.replayed) == (
        "hypercall: io[0]", "get_register(0, 0, 'rip')", "get_register(0, 1, 'rip')"
    )
