"""Exits answered in C while nothing records (issue 18; docs/architecture.md, "Exit paths in C").

Hypercalls: the guest (guests/programs/hv_fastpath.c) makes the calls the fast path may answer
and the variants of the same calls it must leave to the dispatcher, and checks every result
against the TLFS. It counts the calls C may answer: a run that records nothing must have
answered exactly those in C (not one more: a variant answered in C would also fail the
guest's check of its status), and a recorded run none, with every call in the trace.
VTL call and fast return: guests/programs/vsm_fast_switch.c checks what crosses each switch.
OUTs to a port whose writes change nothing (POST codes): completed in C, or recorded.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vsmtrace.vmm.backends.hyperv import HypervBackend
from vsmtrace.vmm.builder import build_machine
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.events import EventKind, EventSink, ListSink
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.hyperv.hvdef import (
    HV_APIC_ID_ELEMENT_SIZE,
    HV_PARTITION_ID_SELF,
    HV_VP_INDEX_ELEMENT_SIZE,
    HvInputGetVpIndexFromApicId,
    HvVpVtlControl,
    HypercallCode,
    HypercallControlBits,
    VtlReturnInput,
)
from vsmtrace.vmm.hyperv.hypercall_page import HV_HYPERCALL_TRAP_PORT
from vsmtrace.vmm.kvm.system import lib as kvm_lib
from vsmtrace.vmm.machine import Machine

from tests.conftest import run_vsmtrace

GUEST_OK = 1
SMP = 2
SPINS = 50


@contextmanager
def ran(
    config: MachineConfig, sink: EventSink | None = None, attach: Callable[[Machine], None] | None = None
) -> Iterator[tuple[Machine, int, str]]:
    """The machine of ``config`` after its guest ran, its exit status and serial output; closed after the block.

    ``attach`` is called with the built machine before it boots (to give it a sink that needs the machine).
    """
    out = io.BytesIO()
    m = build_machine(dataclasses.replace(config, timeout_s=120, serial_out=out), sink)
    if attach is not None:
        attach(m)
    try:
        m.boot()
        status = m.run()
        yield m, status, out.getvalue().decode(errors="replace")
    finally:
        m.close()


def hv_guest(kernel: Path) -> MachineConfig:
    return MachineConfig(kernel=kernel, smp=SMP, cmdline=f"cpus={SMP} spins={SPINS}", hyperv=HypervPolicy())


def eligible(text: str) -> int:
    found = re.search(r"^eligible (\d+)$", text, re.M)
    assert found, text[-2000:]
    return int(found.group(1))


@pytest.mark.kvm
def test_answers_exactly_the_eligible_calls_in_c(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    with ran(hv_guest(guest("hv_fastpath"))) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        assert "FAIL" not in text, text[-3000:]
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is not None
        served = backend.fastpath.served()
        assert sum(served.values()) == eligible(text) > SPINS, (served, eligible(text))
        assert served[(0, 0)] == eligible(text)  # the BSP made them all


@pytest.mark.kvm
def test_a_recorded_run_dispatches_every_call(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    sink = ListSink()
    with ran(hv_guest(guest("hv_fastpath")), sink) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        assert "FAIL" not in text, text[-3000:]
        assert all(v.fastpath is None for vp in m.vps for v in vp.vcpus)
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is None  # never even built
        calls = [e[4] for e in sink.events if e[0] == EventKind.HYPERCALL]
        spins = [
            c for c in calls if c["code"] == HypercallCode.HvCallNotifyLongSpinWait and c["status"] == 0 and c["fast"]
        ]
        lookups = [c for c in calls if c["code"] == HypercallCode.HvCallGetVpIndexFromApicId and c["status"] == 0]
        # The eligible calls (the spins, the raw traps' two spins, 36 + 1 + 1 lookups) all reach the trace.
        assert len(spins) + len(lookups) >= eligible(text) > SPINS


def test_c_constants_are_the_tlfs_layout() -> None:
    """The C side's copies of the ABI numbers (vmm/backends/_hypercall_fastpath_build.py) equal hvdef's."""
    from vsmtrace.vmm.backends.hypercall_fastpath import load

    lib = load().lib
    bits = HypercallControlBits
    assert (lib.VSM_HC_REP_COUNT_SHIFT, lib.VSM_HC_REP_START_SHIFT) == (bits.REP_COUNT_SHIFT, bits.REP_START_SHIFT)
    assert lib.VSM_HC_REP_MASK == bits.REP_COUNT_MASK == bits.REP_START_MASK
    assert lib.VSM_HC_APIC_HEADER_SIZE == HvInputGetVpIndexFromApicId.SIZE
    assert lib.VSM_HC_APIC_ELEMENT_SIZE == HV_APIC_ID_ELEMENT_SIZE
    assert lib.VSM_HC_VP_ELEMENT_SIZE == HV_VP_INDEX_ELEMENT_SIZE
    assert lib.VSM_HC_PARTITION_SELF == HV_PARTITION_ID_SELF
    assert lib.VSM_HC_TRAP_PORT == HV_HYPERCALL_TRAP_PORT
    assert (lib.VSM_HC_CODE_VTL_CALL, lib.VSM_HC_CODE_VTL_RETURN) == (
        HypercallCode.HvCallVtlCall,
        HypercallCode.HvCallVtlReturn,
    )
    assert lib.VSM_HC_VTL_RETURN_FAST == VtlReturnInput.FAST
    assert lib.VSM_HC_CONTROL_AREA_SIZE == HvVpVtlControl.SIZE
    assert lib.VSM_HC_SWITCH == kvm_lib.VSM_IO_SWITCH


# -- VTL call / fast VTL return answered in C ----------------------------------------------------------

CALLS = 200


def vsm_guest(kernel: Path, cmdline: str) -> MachineConfig:
    return MachineConfig(kernel=kernel, cmdline=cmdline, hyperv=HypervPolicy().with_vsm(), vtls=2)


@pytest.mark.kvm
@pytest.mark.parametrize("protect", ["0", "1"])
def test_vtl_call_and_fast_return_answered_in_c(kvm, guest, protect: str) -> None:  # type: ignore[no-untyped-def]
    """Shared GPRs and XMM both ways, VTL1's control area at every entry: as the guest checks them. With
    protect=1 VTL0 has a readable, non-executable page, so every return translates VTL0's resume RIP, and
    one return resumes on such a page: that one is Python's (the execute intercept VTL1 must get)."""
    with ran(vsm_guest(guest("vsm_fast_switch"), f"n={CALLS} protect={protect}")) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        assert "FAIL" not in text and "PASSED" in text, text[-3000:]
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is not None
        calls, returns = backend.fastpath.switches()[0]
        # VTL1 answers the loop's calls and the VSM_OP_USER request with fast returns; the service
        # loop's other returns are not fast, the return onto the non-executable page is Python's, and
        # so is the fast return after VTL1's PV IPI to VTL0 (VTL0 has an interrupt pending).
        assert returns == CALLS + 1, (calls, returns)
        assert calls >= CALLS + 1, (calls, returns)


@pytest.mark.kvm
def test_a_sink_without_native_records_switches_vtls_in_python(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """A recording sink that cannot take what C records (no ``native_record``, like --verbose's) gets every
    switch through Python; a trace writer's recording answers them in C (tests/test_recorded_switch.py)."""
    sink = ListSink()
    with ran(vsm_guest(guest("vsm_fast_switch"), f"n={CALLS} protect=1"), sink) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        assert "FAIL" not in text and "PASSED" in text, text[-3000:]
        assert all(v.fastpath is None for vp in m.vps for v in vp.vcpus) and m.vps[0].fast_run is None
        switches = [e[4] for e in sink.events if e[0] == EventKind.VTL_SWITCH]
        assert sum(1 for s in switches if s["reason"] == "call") >= CALLS + 1
        assert sum(1 for s in switches if s["reason"] == "return") >= CALLS + 1


# -- OUT to a port whose writes change nothing ----------------------------------------------------------

POSTS = 3000


def post_loop(kernel: Path, fast_paths: bool = True) -> MachineConfig:
    return MachineConfig(kernel=kernel, cmdline=f"n={POSTS}", fast_paths=fast_paths)


@pytest.mark.kvm
def test_post_codes_complete_in_c(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    with ran(post_loop(guest("post_loop"))) as (m, status, text):
        assert status == GUEST_OK and f"posted {POSTS}" in text, text[-2000:]
        fp = m.vps[0].vcpus[0].fastpath
        assert fp is not None and POSTS <= fp.outs_served < POSTS + 100, int(fp.outs_served)


@pytest.mark.kvm
def test_a_recorded_run_records_every_post_code(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    sink = ListSink()
    with ran(post_loop(guest("post_loop")), sink) as (m, status, text):
        assert status == GUEST_OK and f"posted {POSTS}" in text, text[-2000:]
        assert m.vps[0].vcpus[0].fastpath is None
        posts = [e for e in sink.events if e[0] == EventKind.PIO and e[4].get("port", e[4].get("address")) == 0x80]
        assert len(posts) >= POSTS


@pytest.mark.kvm
def test_fast_paths_off_sends_every_exit_to_python(kvm, guest) -> None:  # type: ignore[no-untyped-def]
    """MachineConfig.fast_paths=False (``vsmtrace run --no-fast-paths``): nothing is attached, the guest runs the same."""
    with ran(post_loop(guest("post_loop"), fast_paths=False)) as (m, status, text):
        assert status == GUEST_OK
        assert f"posted {POSTS}" in text
        assert all(v.fastpath is None for vp in m.vps for v in vp.vcpus)
    result = run_vsmtrace(["run", str(guest("post_loop")), "--no-fast-paths", "--append", "n=10"])
    assert result.status == GUEST_OK and "posted 10" in result.stdout, result.stderr


@pytest.mark.kvm
def test_recorded_post_codes_are_each_in_the_trace_once(kvm, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A recording completes OUTs to port 0x80 in C after recording them (vsm_kvm_run_recorded): every
    one is in the trace exactly once, in the guest's order (the data byte is the loop index)."""
    from vsmtrace.recorder.reader import open_trace

    trace = tmp_path / "post.arrow"
    result = run_vsmtrace(["run", str(guest("post_loop")), "--record", str(trace), "--append", f"n={POSTS}"], timeout=120)
    assert result.status == GUEST_OK and f"posted {POSTS}" in result.stdout, result.stderr
    rows = open_trace(trace).table().to_pylist()
    posts = [r["data"] for r in rows if r["kind"] == "PIO" and r["address"] == 0x80 and r["is_write"]]
    assert posts == [i & 0xFF for i in range(POSTS)]
