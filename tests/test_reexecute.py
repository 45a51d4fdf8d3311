"""Guest re-execution (`vsmtrace replay --reexecute`) of `vsmtrace run --deterministic` traces, on real KVM.

VSM guests (two VTLs on one VP) are re-executed too: VTL switches, protection changes and
secure memory intercepts are driven from the trace and every exit is checked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from vsmtrace.recorder.reader import open_trace
from vsmtrace.vmm.cpu_state import MSR_IA32_TSC

from tests.conftest import _require_kvm, run_vsmtrace
from tests.guests import build_guest

pytestmark = pytest.mark.kvm

CASES = [
    ("hello", ""),
    ("det_timer", "mode=periodic"),
    ("det_timer", "mode=oneshot"),
    ("det_timer", "mode=periodic x2apic=1"),
    ("hv_stimer", ""),
    ("ports", ""),
    ("fwcfg", ""),
    ("bootinfo", "alpha=1 beta=two"),
    ("hv_cpuid", ""),
    ("hv_msr", ""),
    ("hv_hypercall", ""),
    ("hv_synic", ""),
    ("hv_replay", "loop=3"),
    ("fault", "fault=safe"),  # rdmsr_safe(IA32_TSC): the virtual TSC, through an MSR exit
]
#: Guests that end with a nonzero isa-debug-exit code (the RAM hash is still taken there): name, cmdline, code.
FAILING_GUESTS = [
    ("exitcode", "exit=42", 42),
    ("fault", "fault=ud", 0x40 + 6),  # fault.c: the runtime's unhandled-exception exit, 0x40 + vector
    ("fault", "fault=gp", 0x40 + 13),  # #GP injected by the VMM for an unknown MSR
    ("fault", "fault=pf", 0x40 + 14),
    ("fault", "fault=de", 0x40 + 0),
]
#: Guests the VMM stops (no isa-debug-exit, so no RAM hash): every recorded exit is re-executed.
STOPPED_GUESTS = [("stop", "how=triple"), ("stop", "how=cli_hlt"), ("hv_crash", ""), ("hv_crash", "message=0")]
GUEST_FAULT_STATUS = 4  # `vsmtrace run`: the guest faulted
#: Two-VTL guests that run on one VP (vsm_smp needs two).
VSM_GUESTS = ["vsm_enable", "vsm_state", "vsm_interrupts", "vsm_protect", "vsm_misc", "vsm_vina"]
VSM_KINDS = ("VTL_SWITCH", "PROTECTION", "INTERCEPT")
PATTERN = (0x1122334455667788).to_bytes(8, "little")  # vsm_protect.c: what its data page holds before each write
VALUE = (0x0101010101010101).to_bytes(8, "little")  # vsm_protect.c: what VTL0 tries to write


def record(vsmtrace, kernel: Path, trace: Path, append: str = "", *extra: str):  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--deterministic", "--memory", "32", "--append", append, "--timeout", "60",
                  "--record", str(trace), *extra, str(kernel)], timeout=120)  # fmt: skip
    assert r.status & 1 == 1 and r.guest_exit_code == 0, (r.status, r.stdout[-500:], r.stderr)
    return r


def reexecute(vsmtrace, trace: Path):  # type: ignore[no-untyped-def]
    r = vsmtrace(["replay", "--reexecute", str(trace)], timeout=120)
    assert r.status == 0, r.stdout + r.stderr
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


@pytest.mark.parametrize(("name", "append", "code"), FAILING_GUESTS, ids=[f"{n}-{a}" for n, a, _ in FAILING_GUESTS])
def test_guest_with_an_error_exit_reexecutes(vsmtrace, guest, tmp_path: Path, name: str, append: str, code: int) -> None:
    trace = tmp_path / "t.vsmt"
    r = vsmtrace(["run", "--deterministic", "--memory", "32", "--append", append, "--timeout", "60", "--record", str(trace),
                  str(guest(name))], timeout=120)  # fmt: skip
    assert r.guest_exit_code == code, (r.status, r.stdout[-500:], r.stderr)
    detail = guest_exit_detail(trace)
    r = reexecute(vsmtrace, trace)
    assert f"re-execution reproduced the trace: {detail['exits']} exits" in r.stdout
    assert f"guest exit status {code}; guest RAM identical" in r.stdout


@pytest.mark.parametrize(("name", "append"), STOPPED_GUESTS, ids=[f"{n}-{a or 'default'}" for n, a in STOPPED_GUESTS])
def test_stopped_guest_reexecutes_every_recorded_exit(vsmtrace, guest, tmp_path: Path, name: str, append: str) -> None:
    trace = tmp_path / "t.vsmt"
    r = vsmtrace(["run", "--deterministic", "--memory", "32", "--append", append, "--timeout", "60", "--record", str(trace),
                  str(guest(name))], timeout=120)  # fmt: skip
    assert r.status == GUEST_FAULT_STATUS, (r.status, r.stdout[-500:], r.stderr)
    exits = kinds(trace)["EXIT"]
    r = reexecute(vsmtrace, trace)
    assert "re-execution reproduced the trace: " in r.stdout and "guest RAM" not in r.stdout, r.stdout
    assert 0 < int(r.stdout.split(": ")[1].split()[0]) <= exits


def test_raw64_guest_reexecutes(vsmtrace, guest, tmp_path: Path) -> None:
    trace = tmp_path / "t.vsmt"
    record(vsmtrace, guest("raw64", raw64=True), trace)
    assert "guest RAM identical" in reexecute(vsmtrace, trace).stdout


def test_tsc_msr_is_virtual_and_recorded(vsmtrace, guest, tmp_path: Path) -> None:
    """fault=safe reads IA32_TSC: KVM would answer with host cycles, unseen; --deterministic records the virtual TSC."""
    a, b = tmp_path / "a.vsmt", tmp_path / "b.vsmt"
    for trace in (a, b):
        record(vsmtrace, guest("fault"), trace, "fault=safe")
    rows = open_trace(a).table().to_pylist()
    (read,) = [r for r in rows if r["kind"] == "MSR" and r["msr"] == MSR_IA32_TSC]
    assert not read["fault"] and 0 < read["value"] < 10**9  # virtual time is a fraction of a second of TSC ticks
    assert guest_exit_detail(a) == guest_exit_detail(b)


def test_rdtsc_divergence_names_rdtsc(vsmtrace, guest, tmp_path: Path) -> None:
    """hv_time reads RDTSC: re-execution cannot reproduce it and says so, with the instruction's address."""
    trace = tmp_path / "t.vsmt"
    vsmtrace(["run", "--deterministic", "--memory", "32", "--timeout", "60", "--record", str(trace), str(guest("hv_time"))], timeout=120)
    r = vsmtrace(["replay", "--reexecute", str(trace)], timeout=120)
    assert r.status == 1, r.stdout + r.stderr
    assert "first divergence: event " in r.stdout
    assert "likely cause: RDTSC: the code that was running reads the raw TSC (rdtsc at 0x" in r.stdout, r.stdout


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
    assert "likely cause" not in r.stdout  # det_timer never reads the TSC: nothing to blame on RDTSC


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


# -- VSM guests ----------------------------------------------------------------------------------


def kinds(trace: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in open_trace(trace).table().column("kind").to_pylist():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


@pytest.mark.parametrize("name", VSM_GUESTS)
def test_vsm_guest_reexecutes_every_exit(vsmtrace, guest, tmp_path: Path, name: str) -> None:
    trace = tmp_path / "t.vsmt"
    r = record(vsmtrace, guest(name), trace, "", "--smp", "1")
    assert "FAIL" not in r.stdout, r.stdout[-2000:]
    assert kinds(trace).get("VTL_SWITCH", 0) > 0
    detail = guest_exit_detail(trace)
    r = vsmtrace(["replay", "--reexecute", str(trace)], timeout=120)
    assert r.status == 0, r.stdout + r.stderr
    assert f"re-execution reproduced the trace: {detail['exits']} exits" in r.stdout
    assert "guest RAM identical" in r.stdout


@pytest.fixture(scope="module")
def protect_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vsm_protect recorded once: protections, and intercepts of reads, writes and fetches."""
    _require_kvm()
    trace = tmp_path_factory.mktemp("protect") / "protect.vsmt"
    record(run_vsmtrace, build_guest("vsm_protect"), trace)
    counts = kinds(trace)
    assert all(counts.get(k, 0) > 0 for k in VSM_KINDS), counts
    return trace


def test_vsm_recordings_are_identical(vsmtrace, protect_trace: Path, tmp_path: Path) -> None:
    """Two deterministic recordings of a VSM guest: same exits, same virtual time, same RAM."""
    again = tmp_path / "again.vsmt"
    record(vsmtrace, build_guest("vsm_protect"), again)
    assert guest_exit_detail(again) == guest_exit_detail(protect_trace)


def test_intercepts_of_every_access_kind_are_reexecuted(protect_trace: Path) -> None:
    from vsmtrace.replayer.reexecute import Reexecutor

    accesses = {r["access"] for r in open_trace(protect_trace).table().to_pylist() if r["kind"] == "INTERCEPT"}
    assert accesses == {"read", "write", "execute"}
    report = Reexecutor(protect_trace).run()
    assert report.divergence is None, report.divergence
    assert report.ram_checked and report.exit_status == 0


def test_dump_after_a_protected_write_shows_the_unwritten_value(vsmtrace, protect_trace: Path, tmp_path: Path) -> None:
    rows = open_trace(protect_trace).table().to_pylist()
    # acc_write: `mov [rdi], rsi` into the read-only data page, VALUE over PATTERN
    at = next(i for i, r in enumerate(rows) if r["kind"] == "INTERCEPT" and r["access"] == "write" and r["insn_bytes"] == bytes.fromhex("488937"))
    intercept = rows[at]
    after = next(r for r in rows[at:] if r["kind"] == "EXIT" and r["gprs"] is not None)
    assert after["vtl"] == 1  # the next exit is in VTL1, which handles the intercept
    dumps = {seq: tmp_path / f"{seq}.bin" for seq in (intercept["seq"], after["seq"])}
    args = [a for seq, path in dumps.items() for a in ("--dump-memory", f"{seq}:{intercept['gpa']}:8:{path}")]
    r = vsmtrace(["replay", "--reexecute", str(protect_trace), *args], timeout=120)
    assert r.status == 0, r.stdout + r.stderr
    for path in dumps.values():
        assert path.read_bytes() == PATTERN != VALUE


def rewrite_io(trace: Path, out: Path, edit) -> int:  # type: ignore[no-untyped-def]
    """Rewrite the first emulation entry whose I/O log ``edit`` changes (returns True); its sequence number."""
    table = open_trace(trace).table()
    rows = table.to_pylist()
    for index, row in enumerate(rows):
        if row["kind"] != "EMULATION":
            continue
        io = json.loads(row["emu_io"])
        if edit(row, io):
            rewrite(trace, out, index, "emu_io", json.dumps(io).encode())
            return row["seq"]
    raise AssertionError("nothing to perturb")


def test_perturbed_vtl_return_diverges_at_the_next_exit(vsmtrace, protect_trace: Path, tmp_path: Path) -> None:
    """A non-fast VTL return's RAX (from VTL1's assist page) changed: VTL0 takes another path."""

    def edit(row, io) -> bool:  # type: ignore[no-untyped-def]
        for op, args, _ in io:
            if op == "vsm.request_transition" and args[0]["f"]["return_rax_rcx"] is not None:
                args[0]["f"]["return_rax_rcx"][0] ^= 0x10
                return True
        return False

    bad = tmp_path / "bad.vsmt"
    seq = rewrite_io(protect_trace, bad, edit)
    rows = open_trace(protect_trace).table().to_pylist()
    expected = next(r["seq"] for r in rows if r["seq"] > seq and r["kind"] == "EXIT" and r["gprs"] is not None)
    r = vsmtrace(["replay", "--reexecute", str(bad)], timeout=120)
    assert r.status == 1, r.stdout + r.stderr
    assert f"first divergence: event {expected} (EXIT)" in r.stdout, r.stdout


def test_perturbed_protection_diverges_at_the_protection(vsmtrace, protect_trace: Path, tmp_path: Path) -> None:
    """VTL1's "no access" on the data page replayed as "all access": reported at the PROTECTION event."""

    def edit(row, io) -> bool:  # type: ignore[no-untyped-def]
        for op, args, _ in io:
            if op == "vsm.set_protections" and args[1][0]["f"]["allowed"] == 0:
                args[1][0]["f"]["allowed"] = 7
                return True
        return False

    bad = tmp_path / "bad.vsmt"
    seq = rewrite_io(protect_trace, bad, edit)
    rows = open_trace(protect_trace).table().to_pylist()
    protection = max(r["seq"] for r in rows if r["kind"] == "PROTECTION" and r["seq"] < seq)
    r = vsmtrace(["replay", "--reexecute", str(bad)], timeout=120)
    assert r.status == 1, r.stdout + r.stderr
    assert f"first divergence: event {protection} (PROTECTION), field new_mask: recorded --- at page" in r.stdout, r.stdout
    assert "re-executed rwx" in r.stdout


def test_more_than_one_vp_is_refused(vsmtrace, protect_trace: Path, tmp_path: Path) -> None:
    table = open_trace(protect_trace).table()
    md = json.loads(table.schema.metadata[b"vsmtrace"])
    md["vm_config"]["vps"] = 2
    table = table.replace_schema_metadata({b"vsmtrace": json.dumps(md).encode()})
    smp = tmp_path / "smp.vsmt"
    with pa.OSFile(str(smp), "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    r = vsmtrace(["replay", "--reexecute", str(smp)])
    assert r.status == 2, r.stdout + r.stderr
    assert "re-execution needs a 1-VP trace, this one has 2 VPs" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
