"""VTL switches answered in C while recording (issue 18; docs/architecture.md, "Exit paths in C").

A recording machine keeps the C fast path for VTL calls and fast returns; C records each switch
as one native record, which the trace writer expands into the rows the Python switch records
(vmm/backends/recorded_switch.py). These tests run guests/programs/vsm_fast_switch.c, whose own
checks cover what crosses each switch, and check that:

- the switches were answered in C while recording, and the trace has every one of them;
- the trace's hypercall, switch and emulation rows are the Python path's, row for row, but for
  times (the same guest recorded with ``--no-fast-paths``);
- replay reproduces every entry, and a record that claims what the emulation would not have
  done is a divergence (replay checks these rows, it does not take them on trust);
- the store and the writer keep one numbering of seqs and entry orders with native records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.writer import TraceWriter
from vsmtrace.replayer.engine import VmmReplayer
from vsmtrace.vmm.backends import recorded_switch
from vsmtrace.vmm.backends.hyperv import HypervBackend
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.machine import Machine
from vsmtrace.vmm.trace_metadata import machine_metadata

from tests.test_fast_paths import ran, vsm_guest

GUEST_OK = 1
CALLS = 200
#: Columns that say when, not what: a row answered in C is stamped when C stored it.
TIMING = ("time_ns", "duration_ns")
SWITCH_KINDS = ("HYPERCALL", "VTL_SWITCH", "EMULATION")


@contextmanager
def recorded(config: MachineConfig, path: Path, **writer_options: Any) -> Iterator[tuple[Machine, int, str]]:
    """Run ``config`` recording to ``path`` as ``vsmtrace run --record`` does; the trace is sealed after the block."""
    writers: list[TraceWriter] = []

    def attach(m: Machine) -> None:
        m.sink = TraceWriter(path, machine_metadata(m), **writer_options)
        writers.append(m.sink)

    try:
        with ran(config, attach=attach) as got:
            yield got
    finally:
        for writer in writers:
            writer.close()
    assert writers[0].error is None, writers[0].error


def switch_rows(path: Path) -> list[dict[str, Any]]:
    rows = open_trace(path).table().to_pylist()
    return [
        {k: v for k, v in r.items() if k not in TIMING and v is not None} for r in rows if r["kind"] in SWITCH_KINDS
    ]


@pytest.mark.kvm
def test_a_recording_answers_vtl_switches_in_c_and_traces_each(kvm, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "fast.arrow"
    with recorded(vsm_guest(guest("vsm_fast_switch"), f"n={CALLS} protect=1"), trace) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        assert "FAIL" not in text and "PASSED" in text, text[-3000:]
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is not None
        calls, returns = backend.fastpath.switches()[0]
        assert calls >= CALLS + 1 and returns == CALLS + 1, (calls, returns)
        assert sum(backend.fastpath.served().values()) == 0  # no hypercall but the switches is answered in C
    rows = open_trace(trace).table().to_pylist()
    switches = [r for r in rows if r["kind"] == "VTL_SWITCH"]
    assert sum(r["reason"] == "call" for r in switches) >= calls
    assert sum(r["reason"] == "return" for r in switches) >= returns
    hypercalls = [r["name"] for r in rows if r["kind"] == "HYPERCALL"]
    assert hypercalls.count("HvCallVtlCall") >= calls and hypercalls.count("HvCallVtlReturn") >= returns
    seqs = [r["seq"] for r in rows]
    assert seqs == list(range(len(rows)))  # one numbering, no gap where C stood in
    report = VmmReplayer(trace).run()
    assert report.divergence is None, report.divergence
    entries = [r for r in rows if r["kind"] == "EMULATION"]
    assert report.entries == len(entries)
    assert sorted(r["emu_order"] for r in entries) == list(range(len(entries)))


@pytest.mark.kvm
def test_two_vps_record_their_switches_from_c_at_once(kvm, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """guests/programs/vsm_smp.c: both VPs make VTL calls; records of both interleave in one store and replay."""
    trace = tmp_path / "smp.arrow"
    config = dataclasses.replace(vsm_guest(guest("vsm_smp"), ""), smp=2)
    with recorded(config, trace) as (m, status, text):
        assert status == GUEST_OK, text[-3000:]
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is not None
        per_vp = backend.fastpath.switches()
        assert per_vp[0][0] > 0 and per_vp[1][0] > 0, per_vp
    rows = open_trace(trace).table().to_pylist()
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    calls = [r["vp"] for r in rows if r["kind"] == "VTL_SWITCH" and r["reason"] == "call"]
    assert calls.count(0) >= per_vp[0][0] and calls.count(1) >= per_vp[1][0]
    report = VmmReplayer(trace).run()
    assert report.divergence is None, report.divergence


@pytest.mark.kvm
def test_a_writer_that_falls_behind_gets_the_next_switch_in_python(kvm, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Backpressure: once the store says LATE (here after 4 x 16 events), C hands the next switch to Python,
    whose event makes the VP thread flush and wait; C takes over again after. Nothing is lost or reordered."""
    trace = tmp_path / "late.arrow"
    with recorded(vsm_guest(guest("vsm_fast_switch"), f"n={CALLS} protect=0"), trace, batch_rows=16) as (m, status, text):
        assert status == GUEST_OK and "PASSED" in text, text[-3000:]
        backend = m.extension(HypervBackend)
        assert backend is not None and backend.fastpath is not None
        in_c = sum(backend.fastpath.switches()[0])
    rows = open_trace(trace).table().to_pylist()
    traced = sum(r["kind"] == "VTL_SWITCH" and r["reason"] in ("call", "return") for r in rows)
    # Python's switches: 4 with the default batch (the guest's non-fast returns, the switch with an interrupt
    # pending), here also one after each LATE (~1,400 events in 64-event steps).
    assert in_c > CALLS and traced - in_c >= 12, (in_c, traced)
    assert [r["seq"] for r in rows] == list(range(len(rows)))
    report = VmmReplayer(trace).run()
    assert report.divergence is None, report.divergence


@pytest.mark.kvm
def test_the_rows_c_records_are_the_python_paths(kvm, guest, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The same guest recorded twice, switches answered in C and in Python: the same rows but for times."""
    kernel = guest("vsm_fast_switch")
    found = {}
    for fast in (True, False):
        trace = tmp_path / f"{fast}.arrow"
        config = dataclasses.replace(vsm_guest(kernel, "n=40 protect=0"), fast_paths=fast)
        with recorded(config, trace) as (m, status, text):
            assert status == GUEST_OK and "PASSED" in text, text[-3000:]
            backend = m.extension(HypervBackend)
            assert backend is not None
            answered = backend.fastpath.switches()[0] if backend.fastpath is not None else (0, 0)
            assert (answered[0] >= 40) == fast, answered
        found[fast] = switch_rows(trace)
    fast_rows, python_rows = found[True], found[False]
    assert len(fast_rows) == len(python_rows)
    for a, b in zip(fast_rows, python_rows, strict=True):
        assert a == b


@pytest.mark.kvm
def test_replay_checks_what_c_recorded(kvm, guest, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A record expanded into a hypercall row the emulation would not emit is a divergence at that row."""
    expand = recorded_switch.RecordedSwitches.__call__

    def wrong(self: Any, record: tuple[int, ...]) -> list[Any]:
        events = expand(self, record)
        kind, vp, vtl, rip, fields = events[-2]
        assert kind == EventKind.HYPERCALL
        events[-2] = (kind, vp, vtl, rip, {**fields, "regs_in": b"\x99" * 16})
        return events

    monkeypatch.setattr(recorded_switch.RecordedSwitches, "__call__", wrong)
    trace = tmp_path / "wrong.arrow"
    with recorded(vsm_guest(guest("vsm_fast_switch"), "n=5 protect=0"), trace) as (_m, status, text):
        assert status == GUEST_OK, text[-3000:]
    report = VmmReplayer(trace).run()
    assert report.divergence is not None
    assert report.divergence.kind == "HYPERCALL" and report.divergence.field == "regs_in", report.divergence


# -- the store and the writer --------------------------------------------------------------------------


def _expand(record: tuple[int, ...]) -> list[Any]:
    """A stand-in decoder: word 1 says how many SERIAL events the record stands for."""
    return [(EventKind.SERIAL, 0, 0, None, {"data": f"n{record[4]}.{i}".encode()}) for i in range(record[4])]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 4), st.none()), min_size=1, max_size=40))
def test_native_records_and_python_rows_share_one_numbering(tmp_path_factory, plan: list[int | None]) -> None:
    """Python rows (None) and native records of n events, interleaved: the trace is in seq order, without
    gaps, each record's events in place; entry orders taken by Python and by records never repeat."""
    path = tmp_path_factory.mktemp("native") / "t.arrow"
    writer = TraceWriter(path, {}, batch_rows=7)
    writer.register_native(9, _expand)
    store = writer._store
    fn = store.lib.vsmt_native_record
    expected: list[str] = []
    orders: list[int] = []
    for i, n in enumerate(plan):
        if n is None:
            writer.emit(EventKind.SERIAL, 0, 0, None, data=f"p{i}".encode())
            expected.append(f"p{i}")
            orders.append(writer.entry_order())
        else:
            words = store.ffi.new("uint64_t[16]", [9, n])
            fn(store._ptr, n, 2, words)
            expected += [f"n{n}.{k}" for k in range(n)]
    writer.close()
    rows = open_trace(path).table().to_pylist()
    assert [r["seq"] for r in rows] == list(range(len(expected)))
    assert [r["serial_data"].decode() for r in rows] == expected
    assert len(set(orders)) == len(orders)


def test_the_c_sides_agree_on_the_record() -> None:
    """The fast path's copies of the store's numbers (two cffi modules that cannot share a header)."""
    from vsmtrace.recorder.store import load as store_module
    from vsmtrace.vmm.backends.hypercall_fastpath import load as fastpath_module

    store, fastpath = store_module().lib, fastpath_module().lib
    assert store.VSMT_LATE == fastpath.VSM_HC_RECORD_LATE == recorded_switch.STORE_LATE
    assert store.VSMT_NATIVE_WORDS == fastpath.VSM_HC_RECORD_WORDS == 16
    assert (fastpath.VSM_HC_RECORD_CALL, fastpath.VSM_HC_RECORD_RETURN) == (recorded_switch.CALL, recorded_switch.RETURN)


def test_a_record_of_unknown_tag_stops_the_recording_with_a_reason(tmp_path) -> None:
    writer = TraceWriter(tmp_path / "t.arrow", {})
    store = writer._store
    store.lib.vsmt_native_record(store._ptr, 1, 0, store.ffi.new("uint64_t[16]", [77]))
    writer.emit(EventKind.SERIAL, 0, 0, None, data=b"after")
    writer.close()
    assert writer.error is not None and "unknown tag 77" in str(writer.error)
