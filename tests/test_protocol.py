"""The record/replay protocol round trip, without KVM.

The emulation (HyperV + Vsm, built by ``vmm.emulation.build_emulation``) runs over
in-memory fakes of the VP interface, wrapped by the recording side
(``emulation_io.recorded_ports``) and writing a real trace; the replayer then rebuilds
it over the trace backend and must reproduce every entry. If either side's names
(``vmm.protocol``) drift from the other's, the replay diverges: the tests below make
one side use another name and check that it does.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vsmtrace.recorder.writer import TraceWriter
from vsmtrace.replayer import engine, trace_backend
from vsmtrace.replayer.engine import VmmReplayer
from vsmtrace.replayer.errors import ReplayError
from vsmtrace.vmm import emulation_io, protocol
from vsmtrace.vmm.emulation import EmulationPorts, build_emulation
from vsmtrace.vmm.emulation_io import Boundary, recorded_ports
from vsmtrace.vmm.hyperv import HypervPolicy, hyperv_cpuid_leaves
from vsmtrace.vmm.hyperv.errors import GpFault
from vsmtrace.vmm.hyperv.hvdef import (
    HV_PARTITION_ID_SELF,
    HV_VP_INDEX_SELF,
    HvInputEnablePartitionVtl,
    HvInputEnableVpVtl,
    HvInputGetSetVpRegisters,
    HvInputModifyVtlProtectionMask,
    HvMessage,
    HvMessageHeader,
    HvMsr,
    HvRegisterAssoc,
    HvRegisterName,
    HvStimerConfig,
    HypercallCode,
    HypercallControl,
    VsmPartitionConfig,
)
from vsmtrace.vmm.protocol import SERVICE_INPUTS, Entry, Op, Service, VsmOp
from vsmtrace.vmm.timers import ManualTimerService
from vsmtrace.vmm.vsm.services import EntryReason

from tests.test_vsm_unit import (
    HC_PAGE,
    IN_PAGE,
    OS_ID,
    OUT_PAGE,
    RAM_SIZE,
    FakeApic,
    FakePartition,
    FakeServices,
    sample_context,
)

TSC_HZ = 2_500_000_000
APIC_HZ = 1_000_000_000
ASSIST_VTL1 = 0x13000
SIMP = [0x30000, 0x31000]
SINT_VECTOR = 0x50
VPS = 2
VTLS = 2


class ClockedPartition(FakePartition):
    """The VSM fakes' partition with a reference clock that moves."""

    now = 0

    def reference_time(self) -> int:
        return self.now


class Recording:
    """The live side, as the KVM backends wire it, over fakes: every entry goes through the boundary."""

    def __init__(self, path: Path) -> None:
        self.policy = HypervPolicy().with_vsm()
        leaves = [[leaf, sub, 0, a, b, c, d] for leaf, sub, a, b, c, d in hyperv_cpuid_leaves(self.policy.normalized(), VPS)]
        metadata = {
            "vm_config": {
                "vps": VPS, "vtls": VTLS, "memory_mib": RAM_SIZE >> 20, "ram_bytes": RAM_SIZE,
                "hyperv_policy": {**dataclasses.asdict(self.policy), "future_field": 1},  # a field this version does not know
                "tsc_hz": TSC_HZ, "apic_timer_hz": APIC_HZ, "cpuid_policy": {"extra_leaves": leaves},
            },
        }  # fmt: skip
        self.sink = TraceWriter(path, metadata)
        self.services = FakeServices()
        self.part = ClockedPartition(self.services, VPS, VTLS)
        self.timers = ManualTimerService()
        self.boundary = Boundary(self.sink, threading.RLock())
        ports = EmulationPorts(
            partition=self.part, timers=self.timers, apic=FakeApic(), tlb=self.services, tsc_page=lambda: None,
            sink=self.sink, vsm=self.services,
        )  # fmt: skip
        emulation = build_emulation(
            self.policy, recorded_ports(ports, self.boundary), vtl_count=VTLS, tsc_hz=TSC_HZ, apic_hz=APIC_HZ,
            ram_ranges=[(0, RAM_SIZE)],
        )  # fmt: skip
        self.hv, self.vsm = emulation.hv, emulation.vsm
        assert self.vsm is not None
        self.boundary.lock = self.hv.lock
        self.entries = 0

    def entry(self, name: str, vp: int, vtl: int, args: list[Any], fn: Callable[[], Any]) -> Any:
        self.entries += 1
        return self.boundary.entry(name, vp, vtl, args, fn)

    def wrmsr(self, vp: int, vtl: int, msr: int, value: int) -> None:
        hv = self.hv
        self.entry(Entry.MSR_WRITE, vp, vtl, [vp, vtl, msr, value], lambda: hv.msr_write(vp, vtl, msr, value))

    def rdmsr(self, vp: int, vtl: int, msr: int) -> int:
        hv = self.hv
        return int(self.entry(Entry.MSR_READ, vp, vtl, [vp, vtl, msr], lambda: hv.msr_read(vp, vtl, msr)))

    def hypercall(self, vp: int, vtl: int, code: HypercallCode, data: bytes, rep: int = 0) -> int:
        self.part.ram[IN_PAGE : IN_PAGE + len(data)] = data
        regs = self.part.vps[vp].regs[vtl]
        regs.update(rcx=HypercallControl.encode(code, rep_count=rep), rdx=IN_PAGE, r8=OUT_PAGE, rax=0)
        hv = self.hv
        self.entry(Entry.HYPERCALL, vp, vtl, [vp, vtl], lambda: hv.hypercall(vp, vtl))
        return int(regs["rax"]) & 0xFFFF  # type: ignore[arg-type]

    def run(self) -> None:
        """A little of everything the machine calls into the emulation for."""
        hv, vsm = self.hv, self.vsm
        assert vsm is not None
        for vtl in range(VTLS):
            self.wrmsr(0, vtl, HvMsr.HV_X64_MSR_GUEST_OS_ID, OS_ID)
            self.wrmsr(0, vtl, HvMsr.HV_X64_MSR_HYPERCALL, HC_PAGE[vtl] | 1)  # writes the hypercall page
        assert self.rdmsr(1, 0, HvMsr.HV_X64_MSR_VP_INDEX) == 1
        self.part.now = 1234
        assert self.rdmsr(0, 0, HvMsr.HV_X64_MSR_TIME_REF_COUNT) == 1234  # an input: reference_time
        assert self.rdmsr(0, 0, HvMsr.HV_X64_MSR_TPR) == 0  # an input of the APIC service
        with pytest.raises(GpFault):  # a recorded exception
            self.rdmsr(0, 0, 0x400000FF)
        # VSM: VTL1 for the partition and VP0, its assist page, an entry, protections, a return
        assert self.hypercall(0, 0, HypercallCode.HvCallEnablePartitionVtl, HvInputEnablePartitionVtl(HV_PARTITION_ID_SELF, 1, 0).pack()) == 0
        context = HvInputEnableVpVtl(HV_PARTITION_ID_SELF, 0, 1, sample_context()).pack()
        assert self.hypercall(0, 0, HypercallCode.HvCallEnableVpVtl, context) == 0
        self.wrmsr(0, 1, HvMsr.HV_X64_MSR_VP_ASSIST_PAGE, ASSIST_VTL1 | 1)
        self.entry(Entry.VTL_ENTRY, 0, 1, [0, 1, EntryReason.VTL_CALL, 0], lambda: vsm.on_vtl_entry(0, 1, EntryReason.VTL_CALL, 0))
        config = int(VsmPartitionConfig.ENABLE_VTL_PROTECTION) | (0xF << 1)
        registers = HvInputGetSetVpRegisters(HV_PARTITION_ID_SELF, HV_VP_INDEX_SELF, 0).pack()
        registers += HvRegisterAssoc(HvRegisterName.HvRegisterVsmPartitionConfig, struct.pack("<QQ", config, 0)).pack()
        assert self.hypercall(0, 1, HypercallCode.HvCallSetVpRegisters, registers, rep=1) == 0
        protect = HvInputModifyVtlProtectionMask(HV_PARTITION_ID_SELF, 0x1, 0).pack() + struct.pack("<QQ", 0x50, 0x51)
        assert self.hypercall(0, 1, HypercallCode.HvCallModifyVtlProtectionMask, protect, rep=2) == 0
        flush = struct.pack("<QQQ", 0, 0, 0b11)  # address space, flags, processor mask: VP0 and VP1
        assert self.hypercall(0, 1, HypercallCode.HvCallFlushVirtualAddressSpace, flush) == 0  # tlb.flush_vps
        # SynIC of VP0 at both VTLs; a synthetic timer that fires (a timer entry); EOIs
        for vtl in range(VTLS):
            self.wrmsr(0, vtl, HvMsr.HV_X64_MSR_SCONTROL, 1)
            self.wrmsr(0, vtl, HvMsr.HV_X64_MSR_SIMP, SIMP[vtl] | 1)
            self.wrmsr(0, vtl, HvMsr.HV_X64_MSR_SINT0, SINT_VECTOR)
        self.entry(Entry.VINA, 0, 1, [0, 1], lambda: vsm.notify_lower_vtl_interrupt(0, 1))
        self.wrmsr(0, 0, HvMsr.HV_X64_MSR_STIMER0_COUNT, 1000)
        self.wrmsr(0, 0, HvMsr.HV_X64_MSR_STIMER0_CONFIG, HvStimerConfig.ENABLE | (1 << HvStimerConfig.SINT_SHIFT))
        assert self.timers.advance_to(1 << 40) == 1  # the expiry is an entry of its own
        self.entries += 1
        for cmd in (1, 3):  # QEMU's Hyper-V test device: route SINT0 of VP 0, then assert it
            word = cmd << 16
            self.entry(Entry.TEST_DEVICE, 0, 0, [word], lambda word=word: hv.test_device_command(word))
        self.entry(Entry.AUTO_EOI, 0, 0, [0, 0, SINT_VECTOR], lambda: hv.is_auto_eoi(0, 0, SINT_VECTOR))
        self.entry(Entry.EOI, 0, 0, [0, 0], lambda: hv.on_apic_eoi(0, 0))
        message = HvMessage(HvMessageHeader(0x80000000, 16, 0, 0), bytes(range(16)))
        packed = message.pack()
        self.entry(Entry.POST_INTERCEPT, 0, 1, [0, 1, packed], lambda: hv.post_intercept(0, 1, message))
        self.sink.close()



@pytest.fixture
def recorded(tmp_path: Path) -> Callable[[], tuple[Path, int]]:
    def record() -> tuple[Path, int]:
        path = tmp_path / "roundtrip.arrow"
        rec = Recording(path)
        rec.run()
        assert rec.sink.error is None
        return path, rec.entries

    return record


def test_round_trip_replays_every_entry(recorded: Callable[[], tuple[Path, int]]) -> None:
    path, entries = recorded()
    replayer = VmmReplayer(path)
    ops = {op for entry in replayer.entries for op, _args, _result in entry.io}
    # the trace exercises every kind of call across the boundary (else this test proves little)
    assert {e.entry for e in replayer.entries} == set(protocol.names(Entry).values())
    assert {Op.GET_REGISTER, Op.SET_REGISTER, Op.READ_GPA, Op.WRITE_GPA, Op.REFERENCE_TIME, Op.ASSERT_INTERRUPT,
            Op.TIMER_ARM, Op.EMIT, Op.CPL, Op.MODE, VsmOp.CREATE_VTL, VsmOp.LOAD_VP_CONTEXT,
            VsmOp.SET_PROTECTIONS, "tlb.flush_vps", "apic.read_tpr"} <= ops  # fmt: skip
    report = replayer.run()
    assert report.divergence is None, report.divergence
    assert report.entries == entries == len(replayer.entries)
    assert report.cpuid_leaves > 0
    state = replayer.state
    assert state.enabled_vtls == {0, 1}
    assert state.protection_runs(0) == [(0x50, 2, "R--")]


@pytest.mark.parametrize(
    ("side", "module", "vocabulary", "name"),
    [
        ("record", emulation_io, "Op", "GET_REGISTER"),  # the recording side names a VP call differently
        ("replay", trace_backend, "Op", "WRITE_GPA"),  # the replaying side does
        ("record", emulation_io, "Entry", "TIMER"),  # an entry recorded under another name
        ("replay", engine, "EntryName", "MSR_WRITE"),  # the replayer dispatches under another name
    ],
)
def test_one_side_renaming_a_call_is_caught(
    recorded: Callable[[], tuple[Path, int]], monkeypatch: pytest.MonkeyPatch, side: str, module: Any, vocabulary: str,
    name: str,
) -> None:  # fmt: skip
    original = getattr(module, vocabulary)
    drifted = type(vocabulary, (original,), {name: getattr(original, name) + "_v2"})
    if side == "record":
        monkeypatch.setattr(module, vocabulary, drifted)
        path, _ = recorded()
        monkeypatch.setattr(module, vocabulary, original)
    else:
        path, _ = recorded()
        monkeypatch.setattr(module, vocabulary, drifted)
    try:
        report = VmmReplayer(path).run()
    except ReplayError as exc:  # an entry name the replayer does not know is refused outright
        assert "unknown emulation entry" in str(exc)
        return
    assert report.divergence is not None


def test_a_service_input_recorded_as_an_output_is_caught(
    recorded: Callable[[], tuple[Path, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    inputs = {**SERVICE_INPUTS, Service.APIC: frozenset()}  # read_tpr's result would not be recorded
    monkeypatch.setattr(emulation_io, "SERVICE_INPUTS", inputs)
    path, _ = recorded()
    report = VmmReplayer(path).run()
    assert report.divergence is not None and report.divergence.entry == Entry.MSR_READ


def test_vocabulary_values_are_the_trace_format() -> None:
    """Renaming a value breaks every recorded trace: it must be a deliberate, visible change."""
    assert protocol.names(Entry) == {
        "HYPERCALL": "hypercall", "MSR_READ": "msr_read", "MSR_WRITE": "msr_write", "EOI": "eoi", "AUTO_EOI": "auto_eoi",
        "TIMER": "timer", "VTL_ENTRY": "vtl_entry", "VINA": "vina", "POST_INTERCEPT": "post_intercept",
        "TEST_DEVICE": "test_device",
    }  # fmt: skip
    assert set(protocol.names(Op).values()) == {
        "active_vtl", "get_register", "set_register", "get_xmm", "set_xmm", "cpl", "mode", "inject_exception",
        "read_gpa", "write_gpa", "reference_time", "assert_interrupt", "timer.arm", "timer.cancel", "emit",
    }  # fmt: skip
    assert protocol.names(Service) == {"APIC": "apic", "TLB": "tlb", "VSM": "vsm", "CLOCK": "clock"}


def test_a_timer_cancelled_after_the_timer_thread_took_it_is_not_an_entry() -> None:
    """The live timer thread pops a due timer before it holds the emulation's lock; an entry
    that cancels it in between (Linux re-arming stimer0 on another VP) wins, and the late
    expiry is neither run nor recorded (the replay, which saw the cancel, would diverge)."""

    class Sink:
        enabled = True

        def __init__(self) -> None:
            self.entries: list[Any] = []

        def emit(self, kind: Any, vp: Any, vtl: Any, rip: Any, **fields: Any) -> int:
            self.entries.append(fields.get("entry"))
            return len(self.entries)

    class Inner:
        def __init__(self) -> None:
            self.fires: list[Callable[[], None]] = []

        def arm(self, deadline_ns: int, callback: Callable[[], None]) -> object:
            self.fires.append(callback)  # what the timer thread would call once due
            return object()

        def cancel(self, handle: object) -> None:
            pass

    sink, inner = Sink(), Inner()
    timers = emulation_io.RecordedTimers(inner, Boundary(sink, threading.RLock()))  # type: ignore[arg-type]
    ran: list[str] = []
    first = timers.arm(100, lambda: ran.append("first"))
    timers.arm(200, lambda: ran.append("second"))
    timers.cancel(first)
    inner.fires[0]()  # the cancelled timer, already taken by the timer thread
    inner.fires[1]()
    inner.fires[1]()  # a timer expires once
    assert ran == ["second"] and sink.entries == [Entry.TIMER]


# -- the I/O log's JSON --------------------------------------------------------------------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**130), 2**130) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@given(_JSON_VALUES)
def test_log_json_reads_back_as_the_standard_library_writes_it(value: Any) -> None:
    """orjson writes the logs (emulation_io.json_writer); anything encode() returns, integers beyond
    64 bits included (they go through the standard library), must read back as ``json`` wrote it:
    replay compares values, and traces written before orjson must keep replaying."""
    dumps = emulation_io.json_writer()
    assert json.loads(dumps(value)) == json.loads(json.dumps(value)) == value


def test_only_a_recording_machine_writes_log_json() -> None:
    class Quiet:
        enabled = False

    assert Boundary(Quiet(), threading.RLock()).dumps is None  # type: ignore[arg-type]
