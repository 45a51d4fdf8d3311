"""Property tests (Hypothesis) of the layers below the fuzz guest (docs/fuzzing.md).

* the hypercall control word decodes every 64-bit value losslessly, and the dispatcher answers
  any control word and any registers with a defined status (or #UD), never an exception, and
  never writes a page VTL1 denied the caller;
* the Get/SetVpRegisters name/value decoder answers any name and value with a value or a
  HandlerError status, through the hypercall and directly;
* the intercept-message packer always yields one 256-byte message whose fields decode back;
* the trace reader answers random bytes and truncated or bit-flipped real traces with a trace
  or its own one-line TraceFormatError, and ``vsmtrace info`` with one error line.
No KVM: the emulation runs on the in-memory fakes of tests/test_vsm_unit.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from vsmtrace.recorder.errors import TraceFormatError
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.writer import TraceWriter
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.hyperv.handlers.common import HandlerError
from vsmtrace.vmm.hyperv.hvdef import (
    HV_MESSAGE_SIZE,
    HV_PAGE_SIZE,
    HvMessageType,
    HvRegisterName,
    HvStatus,
    HypercallCode,
    HypercallControl,
    HypercallControlBits,
    X86Exception,
)
from vsmtrace.vmm.vp import Access, CpuMode, Segment
from vsmtrace.vmm.vsm import registers
from vsmtrace.vmm.vsm.intercept_message import build_intercept

from tests.conftest import run_vsmtrace
from tests.test_vsm_unit import IN_PAGE, OUT_PAGE, RAM_SIZE, Env

U64 = st.integers(0, (1 << 64) - 1)
STATUSES = {int(s) for s in HvStatus}
DENIED_PAGE = 0x30000  # VTL1 makes this page no-access for VTL0 in every dispatcher example
GPRS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- control word ----------------------------------------------------------------------------


@given(U64)
def test_control_word_decodes_losslessly(value: int) -> None:
    c = HypercallControl.decode(value)
    b = HypercallControlBits
    rebuilt = HypercallControl.encode(c.code, fast=c.fast, var_header_qwords=c.var_header_qwords,
                                      rep_count=c.rep_count, rep_start=c.rep_start)  # fmt: skip
    rebuilt |= c.reserved | (b.NESTED if c.nested else 0)
    assert rebuilt == value
    assert c.reserved & ~b.RESERVED == 0 and 0 <= c.rep_count <= 0xFFF and 0 <= c.rep_start <= 0xFFF


@given(U64, st.integers(0, 0xFFF))
def test_rep_start_rewrite_touches_only_rep_start(value: int, start: int) -> None:
    new = HypercallControl.with_rep_start(value, start)
    assert HypercallControl.decode(new).rep_start == start
    assert new & ~(0xFFF << 48) == value & ~(0xFFF << 48)


# --- the dispatcher on any input ---------------------------------------------------------------

CODES = st.one_of(st.sampled_from([int(c) for c in HypercallCode]), st.integers(0, 0xFFFF))
CONTROL = st.builds(
    lambda code, fast, var, reps, start, noise: HypercallControl.encode(code, fast=fast, var_header_qwords=var,
                                                                        rep_count=reps, rep_start=start) | noise,
    CODES, st.booleans(), st.integers(0, 0x3FF) | st.just(0), st.integers(0, 0xFFF) | st.integers(0, 4),
    st.integers(0, 0xFFF) | st.just(0), st.sampled_from([0, 1 << 27, 1 << 31, 1 << 44, 1 << 60]),
)  # fmt: skip
GPA = st.one_of(
    st.sampled_from([IN_PAGE, OUT_PAGE, DENIED_PAGE]).flatmap(lambda p: st.integers(p, p + HV_PAGE_SIZE - 1)),
    st.integers(RAM_SIZE - 64, RAM_SIZE + 64),
    U64,
)  # fmt: skip


def _vsm_env() -> Env:
    e = Env()
    e.boot_vtl1()
    assert e.enable_protections() == HvStatus.HV_STATUS_SUCCESS
    assert e.protect([DENIED_PAGE >> 12], 0)[0] == HvStatus.HV_STATUS_SUCCESS
    e.part.ram[DENIED_PAGE : DENIED_PAGE + HV_PAGE_SIZE] = bytes(range(256)) * 16
    return e


@SETTINGS
@given(control=CONTROL, rdx=GPA, r8=GPA, xmm=st.lists(U64 | st.just(0), min_size=6, max_size=6),
       rax=U64, data=st.binary(max_size=256), in_vtl1=st.booleans())  # fmt: skip
def test_dispatcher_answers_any_call(control: int, rdx: int, r8: int, xmm: list[int], rax: int, data: bytes,
                                     in_vtl1: bool) -> None:  # fmt: skip
    e = _vsm_env()
    vtl = 1 if in_vtl1 else 0
    e.part.ram[IN_PAGE : IN_PAGE + len(data)] = data
    vp = e.part.vps[0]
    vp.vtl = vtl
    vp.regs[vtl].update(rcx=control, rdx=rdx, r8=r8, rax=rax)
    for i, v in enumerate(xmm):
        vp.xmm[vtl][i] = v | (v << 64)
    before = bytes(e.part.ram[DENIED_PAGE : DENIED_PAGE + HV_PAGE_SIZE])
    exceptions = len(vp.exceptions)
    outcome = e.hv.hypercall(0, vtl)  # must not raise, whatever the input
    if outcome.status is not None:
        result = int(vp.regs[vtl]["rax"])  # type: ignore[arg-type]
        if not outcome.retry:
            assert result & 0xFFFF == int(outcome.status) and int(outcome.status) in STATUSES
            assert (result >> 32) & 0xFFF <= HypercallControl.decode(control).rep_count
    elif outcome.vtl_action is None:
        assert outcome.exception in (X86Exception.UD, X86Exception.GP) and len(vp.exceptions) == exceptions + 1
    if vtl == 0:
        assert bytes(e.part.ram[DENIED_PAGE : DENIED_PAGE + HV_PAGE_SIZE]) == before


# --- Get/SetVpRegisters names and values --------------------------------------------------------

NAMES = st.one_of(st.sampled_from([int(n) for n in HvRegisterName]), st.integers(0, 0xFFFFFFFF))


@SETTINGS
@given(names=st.lists(NAMES, min_size=1, max_size=4), target=st.integers(0, 0xFF), vp_index=st.sampled_from([0, 1, 2, 0xFFFFFFFE, 0xFFFFFFFF]),
       values=st.lists(st.binary(min_size=16, max_size=16), min_size=4, max_size=4), caller_vtl=st.integers(0, 1))  # fmt: skip
def test_register_hypercalls_answer_any_name_and_value(names: list[int], target: int, vp_index: int,
                                                       values: list[bytes], caller_vtl: int) -> None:  # fmt: skip
    e = _vsm_env()
    status, reps, _ = e.get(names, vp=vp_index, target=target, caller_vtl=caller_vtl)
    assert status in STATUSES and reps <= len(names)
    status, reps = e.set(list(zip(names, values, strict=False)), vp=vp_index, target=target, caller_vtl=caller_vtl)
    assert status in STATUSES and reps <= len(names)
    if caller_vtl == 0 and target & 0x1F == 0x11:  # VTL0 naming VTL1: never served
        assert status != HvStatus.HV_STATUS_SUCCESS


@SETTINGS
@given(name=NAMES, value=st.binary(min_size=16, max_size=16), vp=st.integers(0, 1), vtl=st.integers(0, 1))
def test_register_decoder_raises_only_its_status(name: int, value: bytes, vp: int, vtl: int) -> None:
    e = _vsm_env()
    try:
        got = registers.get_register(e.vsm, vp, vtl, name)
        assert len(got) == 16
    except HandlerError as exc:
        assert int(exc.status) in STATUSES
    try:
        registers.set_register(e.vsm, 0, 1, vp, vtl, name, value)
    except HandlerError as exc:
        assert int(exc.status) in STATUSES
        return
    if name in {int(n) for n in registers.ARCH_REGISTERS} and name != HvRegisterName.HvX64RegisterRflags:
        assert registers.get_register(e.vsm, vp, vtl, name)[:8] == value[:8]


# --- intercept messages ------------------------------------------------------------------------

SEGMENTS = st.builds(Segment, U64, st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))


@SETTINGS
@given(vp=st.integers(0, 63), vtl=st.integers(0, 1), access=st.sampled_from([Access.READ, Access.WRITE, Access.EXECUTE]),
       gpa=st.integers(0, (1 << 52) - 1), gva=st.none() | U64, insn=st.binary(max_size=24),
       regs=st.fixed_dictionaries({n: U64 for n in GPRS}), segs=st.fixed_dictionaries({"cs": SEGMENTS, "ds": SEGMENTS, "ss": SEGMENTS}),
       rip=U64, rflags=U64, length=st.integers(0, 15), cpl=st.integers(0, 3),
       mode=st.sampled_from(list(CpuMode)))  # fmt: skip
def test_intercept_message_packs_and_decodes(vp, vtl, access, gpa, gva, insn, regs, segs, rip, rflags, length, cpl, mode) -> None:  # type: ignore[no-untyped-def]
    msg = build_intercept(vp, vtl, access, gpa, gva, insn, regs, segs, rip=rip, rflags=rflags, insn_length=length,
                          cpl=cpl, mode=mode).pack()  # fmt: skip
    assert len(msg) == HV_MESSAGE_SIZE
    assert struct.unpack_from("<I", msg, 0)[0] == HvMessageType.HvMessageTypeGpaIntercept
    # Execute intercepts carry the seed's length 2 and no bytes; RFLAGS has RF set (docs/vsm.md, compatibility table).
    execute = access is Access.EXECUTE
    if execute:
        length, insn = 2, b""
    assert struct.unpack_from("<IBB", msg, 0x10) == (vp, length, {Access.READ: 0, Access.WRITE: 1, Access.EXECUTE: 2}[access])
    assert struct.unpack_from("<QQ", msg, 0x28) == (rip, rflags | 0x10000)
    assert msg[0x3C] == min(len(insn), 16) and msg[0x50 : 0x50 + min(len(insn), 16)] == insn[:16]
    assert msg[0x50 + min(len(insn), 16) : 0x60] == bytes(16 - min(len(insn), 16))
    assert struct.unpack_from("<QQ", msg, 0x40) == (gva or 0, gpa)
    assert struct.unpack_from("<QIHH", msg, 0x18) == (segs["cs"].base, segs["cs"].limit, segs["cs"].selector,
                                                      segs["cs"].attributes)  # fmt: skip
    order = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{i}" for i in range(8, 16)))
    assert struct.unpack_from("<16Q", msg, 0x80) == tuple(regs[n] for n in order)


# --- the trace reader on hostile files ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_trace(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A small real trace written by the recorder (sealed), as bytes."""
    path = tmp_path_factory.mktemp("trace") / "small.trace"
    w = TraceWriter(path, {"vm_config": {"smp": 2, "memory_mib": 64}, "kvm_capabilities": {"SYNC_REGS": 1}})
    for i in range(300):
        w.emit(EventKind.HYPERCALL, i % 2, i % 2, 0x1000 + i, code=0x46, name="HvCallGetPartitionId", control=0x46,
               fast=False, rep_count=0, rep_start=0, reps_done=0, status=0, status_name="HV_STATUS_SUCCESS",
               input=b"", output=bytes([i % 256]) * 8, regs_in=b"", regs_out=b"")  # fmt: skip
        w.emit(EventKind.MSR, 0, 0, 0x2000 + i, msr=0x40000020, value=i, is_write=False, fault=False)
    w.close()
    return path.read_bytes()


def _read_all(path: Path) -> None:
    """What every consumer does first: open, then read all batches (all columns and a selection)."""
    try:
        trace = open_trace(path)
        trace.table()
        trace.table(["kind", "vtl", "output"])
    except TraceFormatError as exc:
        assert "\n" not in str(exc) and str(exc)


@SETTINGS
@given(data=st.binary(max_size=4096), magic=st.sampled_from([b"", b"ARROW1\0\0", b"\xff\xff\xff\xff"]))
def test_reader_on_random_bytes(tmp_path_factory: pytest.TempPathFactory, data: bytes, magic: bytes) -> None:
    path = tmp_path_factory.mktemp("rnd") / "t.trace"
    path.write_bytes(magic + data)
    _read_all(path)


@SETTINGS
@given(cut=st.integers(0, 1 << 20), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), max_size=4),
       truncate=st.booleans())  # fmt: skip
def test_reader_on_damaged_real_trace(tmp_path_factory: pytest.TempPathFactory, real_trace: bytes, cut: int,
                                      flips: list[tuple[int, int]], truncate: bool) -> None:  # fmt: skip
    data = bytearray(real_trace)
    if truncate:
        data = data[: cut % len(data)]
    for at, bit in flips:
        if data:
            data[at % len(data)] ^= 1 << bit
    assume(bytes(data) != real_trace)
    path = tmp_path_factory.mktemp("dmg") / "t.trace"
    path.write_bytes(bytes(data))
    _read_all(path)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 1 << 20), flip=st.integers(0, 1 << 23))
def test_cli_info_on_damaged_trace_is_one_line(tmp_path: Path, real_trace: bytes, cut: int, flip: int) -> None:
    data = bytearray(real_trace[: max(1, cut % len(real_trace))])
    data[(flip >> 3) % len(data)] ^= 1 << (flip & 7)
    path = tmp_path / "t.trace"
    path.write_bytes(bytes(data))
    r = run_vsmtrace(["info", str(path)], timeout=60)
    assert "Traceback" not in r.stderr, r.stderr
    if r.status != 0:
        assert r.status == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith("vsmtrace: error:"), r.stderr


def test_column_metadata_not_utf8_is_one_line(tmp_path: Path, real_trace: bytes) -> None:
    """Regression (found by the property test above): a damaged byte in a column's own metadata
    (its doc text) made Polars panic in Rust inside `vsmtrace info`, a traceback instead of one line."""
    doc = b"Virtual processor index."
    assert doc in real_trace
    path = tmp_path / "t.trace"
    path.write_bytes(real_trace.replace(doc, b"\xff" + doc[1:]))  # the stream's schema and the footer's copy
    r = run_vsmtrace(["info", str(path)], timeout=60)
    assert r.status == 2 and "Traceback" not in r.stderr and "panicked" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "not valid UTF-8" in r.stderr, r.stderr


def test_reader_regression_every_position_flipped(tmp_path: Path, real_trace: bytes) -> None:
    """Regression: flips in a batch's metadata or body used to escape as ArrowInvalid/OSError."""
    path = tmp_path / "t.trace"
    for at in range(0, len(real_trace), 53):
        data = bytearray(real_trace)
        data[at] ^= 0x21
        path.write_bytes(bytes(data))
        _read_all(path)
