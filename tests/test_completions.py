"""Instructions KVM's emulator lacks, completed by the VMM (vmm/emulation_completions.py).

The guest (guests/programs/completions.c) checks the architectural result itself
(trap-class #BP after int3, fwait as a no-op or a fault-class #MF); the trace
shows that the VMM completed exactly the instructions the guest executed that
KVM could not emulate, and nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path

import iced_x86
import polars as pl
import pytest
from vsmtrace.recorder import open_trace
from vsmtrace.vmm.emulation_completions import COMPLETIONS, x87_exception_pending

from tests.conftest import build_guest, run_vsmtrace

CHECKS = ["int3_once", "int3_trap_rip", "fwait_clean", "fwait_masked", "fwait_mf_once", "fwait_mf_rip", "fwait_after"]


def test_table_is_keyed_by_decoded_instruction() -> None:
    decode = iced_x86.Decoder(64, b"\xcc\x9b\xcd\x03\xf3\x0f\xb8\xc1", ip=0x1000)
    codes = [decode.decode().code for _ in range(4)]
    assert codes[0] in COMPLETIONS and COMPLETIONS[codes[0]].mnemonic == "int3"
    assert codes[1] in COMPLETIONS and COMPLETIONS[codes[1]].mnemonic == "fwait"
    assert codes[2] not in COMPLETIONS  # int 3 (CD 03) is a different instruction: KVM emulates it
    assert codes[3] not in COMPLETIONS  # popcnt: still an error that names it


def test_x87_pending_needs_flag_and_clear_mask() -> None:
    assert not x87_exception_pending(0x037F, 0)
    assert not x87_exception_pending(0x037F, 0x0004)  # ZE flagged, masked
    assert x87_exception_pending(0x037B, 0x0004)  # ZE flagged, unmasked
    assert not x87_exception_pending(0x037B, 0x0001)  # IE flagged but masked


@pytest.mark.kvm
def test_guest_sees_int3_and_fwait_completed(tmp_path: Path) -> None:
    trace = tmp_path / "completions.arrow"
    r = run_vsmtrace(["run", "--timeout", "60", "--record", str(trace), str(build_guest("completions"))])
    out = r.stdout.splitlines()
    assert out == [f"ok {c}" for c in CHECKS] + ["PASSED: 0 failed"], r.stdout + r.stderr
    assert r.status == 1, r.stderr

    frame = pl.from_arrow(open_trace(trace).table())
    assert isinstance(frame, pl.DataFrame)
    kind = pl.col("kind").cast(pl.String)
    failures = frame.filter((kind == "EXIT") & (pl.col("exit_reason").cast(pl.String) == "INTERNAL_ERROR"))
    # one int3 and four fwaits; fninit, fxsave and fxrstor are emulated by KVM and never reach the table
    assert failures.height == 5
    assert failures["suberror"].to_list() == [1] * 5
    exceptions = frame.filter((kind == "INTERRUPT") & (pl.col("source").cast(pl.String) == "exception"))
    assert exceptions["vector"].to_list() == [3, 16]


@pytest.mark.kvm
def test_unknown_instruction_still_stops_with_its_name(guest) -> None:
    r = run_vsmtrace(["run", "--timeout", "60", "--append", "how=popcnt", str(guest("stop"))])
    assert r.stdout.splitlines() == ["stop test: popcnt"]
    assert r.status == 4
    assert re.fullmatch(
        r"vsmtrace: KVM cannot emulate `popcnt rax,rcx` \(instruction emulation failed\) "
        r"at VP 0 VTL0 rip=0x[0-9a-f]+; rebuild the guest without this instruction\n",
        r.stderr,
    ), r.stderr
