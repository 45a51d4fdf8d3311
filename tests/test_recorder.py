"""Recorder tests: schema round trips, crash safety, live reading, bad input. No KVM needed."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from click.testing import CliRunner
from vsmtrace.recorder.errors import TraceError, TraceFormatError
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.schema import COLUMN_BY_NAME, COLUMNS, KIND_FIELDS, METADATA_KEY, SCHEMA_VERSION, arrow_schema
from vsmtrace.recorder.writer import TraceWriter, seal_trace
from vsmtrace.vmm.events import EventKind as K

from vsmtrace.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]

# One event per kind, every field filled with a value that exercises its type's range.
SAMPLES: list[tuple[K, int, int, int | None, dict[str, Any]]] = [
    (K.VP_START, 0, 0, 0x100000, {"detail": {"entry": "multiboot"}}),
    (K.EXIT, 1, 0, 0xFFFF_FFFF_FFFF_FFF0, {"exit_reason": "INTERNAL_ERROR", "exit_code": 17, "suberror": 1, "detail": '{"ndata": 2}', "gprs": bytes(range(144)), "entry_flags": 1}),
    (K.PIO, 0, 0, 0x1000, {"address": 0x3F8, "size": 1, "is_write": True, "data": 0x41}),
    (K.MMIO, 0, 1, 0x2000, {"address": 0xFEE0_00B0, "size": 4, "is_write": False, "data": 0xFFFF_FFFF_FFFF_FFFF}),
    (K.MSR, 3, 1, 0x3000, {"msr": 0x4000_0070, "value": 1 << 63, "is_write": True, "fault": False}),
    (K.CPUID, 0, 0, 0x4000, {"leaf": 0x4000_0000, "subleaf": 0, "eax": 0x4000_0006, "ebx": 0x7263694D, "ecx": 0xFFFF_FFFF, "edx": 0}),
    (K.INTERRUPT, 0, 1, None, {"vector": 0xFF, "source": "intercept"}),
    (K.TIMER, 2, 0, None, {"timer": "stimer0", "deadline_ns": -5}),
    (
        K.HYPERCALL,
        0,
        0,
        0x5000,
        {
            "code": 0xFFFF, "name": "HvCallModifyVtlProtectionMask", "control": 0x0004_0000_0001_004C, "fast": False,
            "rep_count": 4095, "rep_start": 1, "reps_done": 4095, "status": 0x11, "status_name": "HV_STATUS_INVALID_VTL_STATE",
            "input_gpa": 0x7000, "output_gpa": 0x8000, "input": bytes(range(24)), "output": b"", "regs_in": b"\x00" * 8,
            "regs_out": bytes(range(112)), "duration_ns": 12_345,
        },
    ),
    (K.VTL_SWITCH, 0, 0, 0x6000, {"from_vtl": 0, "to_vtl": 1, "reason": "call", "args": (0x11, 1 << 63, 0, 7)}),
    (K.INTERCEPT, 0, 0, 0x7000, {"access": "execute", "gpa": 0x20_0000, "gva": None, "insn_bytes": b"\xe8\x00\x00\x00\x00", "message": bytes(256)}),
    (K.PROTECTION, 0, 1, 0x8000, {"target_vtl": 0, "gpa_start": 0x20_0000, "pages": 1 << 40, "old_mask": None, "new_mask": 0x5}),
    (K.SYNIC_MESSAGE, 0, 1, None, {"sint": 15, "message_type": 0x8000_0001, "message": b"\x01" * 256}),
    (K.VTL_ENABLE, 0, 0, 0x9000, {"target_vtl": 1, "target_vp": 0xFFFF_FFFF, "detail": {"scope": "vp"}}),
    (K.SERIAL, 0, 0, 0x1000, {"data": bytearray(b"hello\n")}),
    (K.GUEST_EXIT, 0, 0, 0xA000, {"exit_status": -1, "message": "triple fault ✗"}),
    (K.ERROR, 0, 1, 0xB000, {"message": "VMM bug in HvCallGetVpRegisters", "detail": {"exception": "KeyError"}}),
    (K.LIMITATION, 0, 0, 0, {"message": "execute not enforced", "detail": {"limitation": "execute_unenforced_on_readable_pages"}}),
    (K.VP_STOP, 0, 0, 0xC000, {"reason": "guest-exit"}),
    (
        K.EMULATION,
        1,
        1,
        0xD000,
        {"entry": "hypercall", "emu_order": 7, "emu_args": b'{"code": 17}', "emu_io": b'[["get_register", ["rcx"], 17]]', "emu_result": b"0"},
    ),
]


def _write(path: Path, events=SAMPLES, **kw: Any) -> TraceWriter:
    w = TraceWriter(path, {"vm_config": {"smp": 4, "memory_mib": 64}, "kvm_capabilities": {"SYNC_REGS": 1}}, **kw)
    for kind, vp, vtl, rip, fields in events:
        w.emit(kind, vp, vtl, rip, **fields)
    w.close()
    return w


def _expected_cell(kind: K, field: str, value: Any) -> Any:
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, tuple):
        return list(value)
    if field == "detail" and isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _rows(trace_path: Path) -> list[dict[str, Any]]:
    return open_trace(trace_path).table().to_pylist()


# ----------------------------------------------------------------------------- schema


def test_samples_cover_every_kind_and_every_column() -> None:
    assert {k for k, *_ in SAMPLES} == set(K)
    used = {KIND_FIELDS[k][f] for k, _, _, _, fields in SAMPLES for f in fields}
    assert used == {c.name for c in COLUMNS} - {"seq", "time_ns", "vp", "vtl", "rip", "kind"}


@pytest.mark.parametrize("seal", [True, False])
def test_every_kind_round_trips(tmp_path: Path, seal: bool) -> None:
    path = tmp_path / "t.vsmt"
    w = _write(path, seal=seal)
    assert w.stats.value_errors == 0, w.stats.first_value_error
    trace = open_trace(path)
    assert trace.sealed is seal and not trace.torn_tail
    table = trace.table()
    for f in arrow_schema():
        assert table.schema.field(f.name).type == f.type, f.name
    rows = table.to_pylist()
    assert [r["seq"] for r in rows] == list(range(len(SAMPLES)))
    for row, (kind, vp, vtl, rip, fields) in zip(rows, SAMPLES, strict=True):
        assert (row["kind"], row["vp"], row["vtl"], row["rip"]) == (kind.name, vp, vtl, rip)
        colmap = KIND_FIELDS[kind]
        for field, value in fields.items():
            assert row[colmap[field]] == _expected_cell(kind, field, value), (kind.name, field)
        filled = {colmap[f] for f, v in fields.items() if v is not None}
        for col in COLUMN_BY_NAME:
            if col not in filled and col not in ("seq", "time_ns", "vp", "vtl", "rip", "kind"):
                assert row[col] is None, (kind.name, col)
    times = [r["time_ns"] for r in rows]
    assert times == sorted(times) and times[0] >= 0
    # Polars sees one frame with the same values.
    df = trace.lazy().collect()
    assert df.height == len(SAMPLES)
    assert df.filter(pl.col("kind") == "HYPERCALL")["status_name"].cast(pl.String).to_list() == ["HV_STATUS_INVALID_VTL_STATE"]


def test_unknown_fields_and_kinds_are_rejected(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.vsmt", {})
    with pytest.raises(TypeError, match="unknown field.*adress"):
        w.emit(K.PIO, 0, 0, 0, adress=0x3F8)
    with pytest.raises(TypeError, match="unknown field.*message"):
        w.emit(K.PIO, 0, 0, 0, message=b"")  # a column, but not one PIO uses
    with pytest.raises(TypeError, match="unknown field.*serial_data"):
        w.emit(K.SERIAL, 0, 0, 0, serial_data=b"x")  # the column name is not the emit name
    with pytest.raises(TypeError, match="unknown event kind"):
        w.emit(99, 0, 0, 0)  # type: ignore[arg-type]
    w.emit(K.VP_START, 0, 0, 0)
    w.close()
    assert [r["kind"] for r in _rows(tmp_path / "t.vsmt")] == ["VP_START"]


def test_bad_values_become_null_and_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {})
    w.emit(K.PIO, 0, 0, 0, address=-1, size=1, is_write=1, data=5)
    w.emit(K.PIO, 0, 0, 0, address=0x60, size=1, is_write=False, data=6)
    w.emit(K.INTERRUPT, 0, 0, 0, vector=0x30, source=42)
    w.close()
    assert w.stats.value_errors == 2
    assert "address" in (w.stats.first_value_error or "")
    rows = _rows(path)
    assert [r["address"] for r in rows[:2]] == [None, 0x60]
    assert rows[0]["is_write"] is True and rows[0]["data"] == 5  # lenient 0/1 -> bool
    assert rows[2]["source"] is None and rows[2]["vector"] == 0x30


def test_emit_after_close_is_a_noop_and_close_is_idempotent(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.vsmt", {})
    w.emit(K.VP_START, 0, 0, 0)
    w.close()
    w.emit(K.VP_STOP, 0, 0, 0)
    w.close()
    assert not w.enabled and w.sealed
    assert len(_rows(tmp_path / "t.vsmt")) == 1


def test_metadata(tmp_path: Path) -> None:
    image = tmp_path / "guest.elf"
    image.write_bytes(b"\x7fELF" + bytes(100))
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {"guest_image": str(image), "vm_config": {"smp": 2}, "kvm_capabilities": {"X": 1}, "command_line": ["vsmtrace", "record"]})
    w.close()
    md = open_trace(path).metadata
    import hashlib

    assert md["schema_version"] == SCHEMA_VERSION
    assert md["guest_image"]["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert md["guest_image"]["name"] == "guest.elf"
    assert md["vm_config"] == {"smp": 2} and md["kvm_capabilities"] == {"X": 1}
    assert md["command_line"] == ["vsmtrace", "record"]
    assert md["host"]["release"] == os.uname().release
    assert md["start_time_utc"].endswith("+00:00")
    assert md["summary"]["events"] == 0 and md["sealed"] is True
    with pytest.raises(TraceError, match="JSON"):
        TraceWriter(tmp_path / "u.vsmt", {"vm_config": {"x": object()}})


def test_docs_describe_every_column_and_kind() -> None:
    doc = (REPO / "docs" / "trace-format.md").read_text()
    for c in COLUMNS:
        assert f"`{c.name}`" in doc, c.name
    for k in K:
        assert k.name in doc


# ----------------------------------------------------------------------------- concurrency and flushing


def _run_threads(worker: Callable[[int], None], count: int) -> None:
    """Run ``worker(vp)`` for vp in 0..count-1 on as many threads at once, and wait for all."""
    threads = [threading.Thread(target=worker, args=(vp,)) for vp in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_get_unique_consecutive_seqs(tmp_path: Path) -> None:
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {}, batch_rows=1000)
    n_threads, per = 6, 5000

    def worker(vp: int) -> None:
        for i in range(per):
            w.emit(K.MSR, vp, 0, i, msr=0x40000070, value=i, is_write=True)

    _run_threads(worker, n_threads)
    w.close()
    df = open_trace(path).lazy().collect()
    assert df.height == n_threads * per
    assert df["seq"].to_list() == list(range(n_threads * per))
    assert df["time_ns"].is_sorted()
    for vp in range(n_threads):  # each thread's events keep their order
        assert df.filter(pl.col("vp") == vp)["value"].to_list() == list(range(per))


def test_fast_path_and_emit_share_one_order(tmp_path: Path) -> None:
    """record_io rows (C columns) and emit rows (Python) from several threads: one seq order, merged by seq."""
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {}, batch_rows=700)
    n_threads, per = 4, 3000

    def worker(vp: int) -> None:
        for i in range(per):
            w.record_io(K.PIO if i % 2 else K.MMIO, vp, i % 2, 0x1000 + i, 0x3F8 + vp, 1 + i % 4, i % 3 == 0, i)
            if i % 5 == 0:
                w.emit(K.SERIAL, vp, 0, 0x2000 + i, data=bytes([i % 256]))
            if i % 11 == 0:
                w.emit(K.HYPERCALL, vp, 1, None, code=i, name=f"call{i % 3}", status=0, status_name="HV_STATUS_SUCCESS")

    _run_threads(worker, n_threads)
    w.close()
    trace = open_trace(path)
    assert trace.sealed
    df = trace.lazy().collect()
    io_rows = df.filter(pl.col("kind").cast(pl.String).is_in(["PIO", "MMIO"]))
    assert df.height == n_threads * (per + len(range(0, per, 5)) + len(range(0, per, 11)))
    assert df["seq"].to_list() == list(range(df.height))
    assert df["time_ns"].is_sorted()
    for vp in range(n_threads):  # each thread's events keep their order and values
        mine = io_rows.filter(pl.col("vp") == vp)
        assert mine["data"].to_list() == list(range(per))
        assert mine["rip"].to_list() == [0x1000 + i for i in range(per)]
        assert mine["is_write"].to_list() == [i % 3 == 0 for i in range(per)]
        assert mine["size"].to_list() == [1 + i % 4 for i in range(per)]
        assert set(mine["address"].to_list()) == {0x3F8 + vp}
        assert mine["kind"].cast(pl.String).to_list() == ["PIO" if i % 2 else "MMIO" for i in range(per)]
        serial = df.filter((pl.col("vp") == vp) & (pl.col("kind") == "SERIAL"))
        assert serial["serial_data"].to_list() == [bytes([i % 256]) for i in range(0, per, 5)]
    assert io_rows["serial_data"].null_count() == io_rows.height and io_rows["name"].null_count() == io_rows.height


def test_writer_seal_equals_a_seal_from_the_stream_alone(tmp_path: Path) -> None:
    """close() seals with what the writer knows (final dictionaries, columns with data): same file content
    as sealing the stream later without that knowledge."""
    paths = {}
    for name, seal in (("writer", True), ("stream", False)):
        path = paths[name] = tmp_path / f"{name}.vsmt"
        w = TraceWriter(path, {}, seal=seal, batch_rows=53, fsync_on_close=False)
        w.set_manual_time(0)
        for i, (kind, vp, vtl, rip, fields) in enumerate(SAMPLES * 12):
            w.set_manual_time(i * 10)
            w.emit(kind, vp, vtl, rip, **fields)
            w.record_io(K.PIO, vp, vtl, i, 0x80, 1, True, i)
            if i % 17 == 0:
                w.flush()
        w.close()
    seal_trace(paths["stream"], fsync=False)
    a, b = open_trace(paths["writer"]), open_trace(paths["stream"])
    assert a.sealed and b.sealed
    assert a.table().to_pylist() == b.table().to_pylist()


def test_an_event_reaches_disk_within_max_age(tmp_path: Path) -> None:
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {}, max_age_s=0.2)
    try:
        time.sleep(0.05)
        for attempt in range(3):  # three lone events, each must show up on its own
            t0 = time.monotonic()
            w.emit(K.PIO, 0, 0, attempt, address=0x3F8, size=1, is_write=True, data=attempt)
            while True:
                rows = open_trace(path).table().num_rows
                if rows == attempt + 1:
                    break
                assert time.monotonic() - t0 < 0.2 + 0.1, "event not on disk within max_age"
                time.sleep(0.005)
        assert w.stats.max_flush_lag_s <= 0.2
    finally:
        w.close()


def test_reading_a_trace_while_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "t.vsmt"
    w = TraceWriter(path, {}, batch_rows=500, max_age_s=0.05)
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            w.emit(K.TIMER, 0, 0, None, timer="apic-timer", deadline_ns=i)
            i += 1
            if i % 200 == 0:
                time.sleep(0.002)

    t = threading.Thread(target=produce)
    t.start()
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            trace = open_trace(path)
            assert not trace.sealed
            df = trace.lazy().collect()
            assert df["seq"].to_list() == list(range(df.height))
            assert df["deadline_ns"].to_list() == list(range(df.height))
            seen.append(df.height)
            time.sleep(0.05)
    finally:
        stop.set()
        t.join()
        w.close()
    assert seen == sorted(seen) and seen[-1] > seen[0] and seen[-1] > 0
    assert open_trace(path).sealed


# ----------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import os, sys, random
    from vsmtrace.recorder.writer import TraceWriter
    from vsmtrace.vmm.events import EventKind as K
    big = sys.argv[4] == "big"  # multi-MB uncompressed batches: kills often land inside a write
    w = TraceWriter(sys.argv[1], {"vm_config": {"child": True}}, batch_rows=int(sys.argv[2]), max_age_s=0.05,
                    compression=None if big else "zstd")
    rng = random.Random(int(sys.argv[3]))
    print("ready", flush=True)
    i = 0
    while True:
        w.emit(K.HYPERCALL, i % 4, i % 2, i, code=0x11, name="HvCallVtlCall", control=0x11, fast=True,
               status=0, regs_in=rng.randbytes(rng.randrange(0, 64)))
        w.emit(K.SERIAL, i % 4, 0, i, data=os.urandom(65536) if big else b"x" * (i % 50))
        w.record_io(K.PIO, i % 4, 0, i, 0x80, 1, True, i & 0xFF)
        i += 1
        if i % 500 == 0:
            print("flushed", w.stats.flushed_events, flush=True)
    """
)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_sigkill_at_random_times_leaves_every_flushed_batch_readable(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    torn = 0
    for trial in range(24):
        path = tmp_path / f"killed{trial}.vsmt"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(rng.choice([50, 300, 2000])), str(trial), "big" if trial % 2 else "small"],
            stdout=subprocess.PIPE, text=True, env=_child_env(), cwd=REPO,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        flushed = 0
        deadline = time.monotonic() + rng.uniform(0.05, 0.6)
        lines: list[str] = []

        def reader(out=proc.stdout, sink=lines) -> None:
            for line in out:
                sink.append(line)

        rt = threading.Thread(target=reader, daemon=True)
        rt.start()
        time.sleep(max(0.0, deadline - time.monotonic()))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        rt.join(5)
        for line in lines:
            parts = line.split()
            if line.endswith("\n") and len(parts) == 2 and parts[0] == "flushed":  # the kill can cut the last line
                flushed = int(parts[1])
        trace = open_trace(path)
        assert not trace.sealed and not trace.end_of_stream
        df = trace.lazy().collect()
        assert df.height >= flushed, f"trial {trial}: {flushed} events reported flushed, {df.height} readable"
        assert df["seq"].to_list() == list(range(df.height))
        if trace.torn_tail:
            torn += 1
            assert trace.torn_offset is not None and 0 < trace.torn_offset < trace.file_size
            # Cutting the file at the reported offset gives exactly the same events, and no tear.
            cut = tmp_path / "cut.vsmt"
            cut.write_bytes(path.read_bytes()[: trace.torn_offset])
            again = open_trace(cut)
            assert not again.torn_tail and again.table().num_rows == df.height
        # A recovered trace can be sealed for lazy scanning.
        seal_trace(path, fsync=False)
        assert open_trace(path).sealed and pl.scan_ipc(path).select(pl.len()).collect().item() == df.height
    print(f"{torn}/24 kills landed inside a batch write")


def _stream_with_batches(tmp_path: Path, n_batches: int) -> tuple[Path, TraceWriter]:
    path = tmp_path / "stream.vsmt"
    w = TraceWriter(path, {}, seal=False)
    for b in range(n_batches):
        for i in range(50):
            w.emit(K.INTERCEPT, 0, 0, b * 1000 + i, access="write", gpa=i << 12, insn_bytes=b"\x89\x07", message=bytes([b]) * 256)
        w.flush()
    w.close()
    return path, w


def test_truncation_at_any_offset_yields_complete_batches_and_reports_the_tear(tmp_path: Path) -> None:
    path, _ = _stream_with_batches(tmp_path, 4)
    data = path.read_bytes()
    full = open_trace(path)
    assert full.end_of_stream and not full.torn_tail and full.table().num_rows == 200
    # Batch boundaries from the complete file: a cut exactly there is not a tear.
    offsets = sorted({full.file_size} | set(rng_offsets(len(data))))
    cut = tmp_path / "cut.vsmt"
    failed, opened = [], []
    for off in offsets:
        cut.write_bytes(data[:off])
        try:
            t = open_trace(cut)
        except TraceFormatError as e:
            assert ("truncated" in str(e) or "empty" in str(e)) and "\n" not in str(e)
            failed.append(off)
            continue
        opened.append(off)
        n = t.table().num_rows
        assert n % 50 == 0 and n <= 200
        assert [r["seq"] for r in t.table().select(["seq"]).to_pylist()] == list(range(n))
        if off < len(data) - 8:
            assert t.torn_tail or t.torn_offset is None  # a cut on a message boundary is a clean (killed) stream
            if t.torn_tail:
                assert t.torn_offset is not None and t.torn_offset <= off
    assert max(failed) < min(opened), "only a cut inside the schema message may make a trace unreadable"


def rng_offsets(size: int) -> list[int]:
    r = random.Random(7)
    return list(range(0, 64)) + [r.randrange(size) for _ in range(300)] + list(range(size - 64, size))


def test_sealed_and_unsealed_give_identical_events(tmp_path: Path) -> None:
    events = SAMPLES * 40
    path, _ = tmp_path / "a.vsmt", None
    w = TraceWriter(path, {}, seal=False, batch_rows=97)
    for kind, vp, vtl, rip, fields in events:
        w.emit(kind, vp, vtl, rip, **fields)
    w.close()
    sealed = tmp_path / "b.vsmt"
    shutil.copy(path, sealed)
    seal_trace(sealed, fsync=False)
    a, b = open_trace(path), open_trace(sealed)
    assert not a.sealed and b.sealed and a.batch_count > b.batch_count  # sealing coalesces batches
    assert a.table().to_pylist() == b.table().to_pylist()
    da, db = a.lazy().collect(), b.lazy().collect()
    cast = [pl.col(c).cast(pl.String) for c, t in da.schema.items() if t == pl.Categorical]
    assert da.with_columns(cast).equals(db.with_columns(cast))
    assert da.schema == db.schema


@pytest.mark.parametrize("seal", [True, False])
def test_reading_some_columns(tmp_path: Path, seal: bool) -> None:
    """``table(columns)`` decodes only those columns (schema order, metadata kept); unknown names are left out."""
    path = tmp_path / "t.vsmt"
    _write(path, SAMPLES * 3, seal=seal)
    trace = open_trace(path)
    full = trace.table()
    some = trace.table(["emu_io", "seq", "no_such_column", "kind"])
    assert some.column_names == ["seq", "kind", "emu_io"]
    assert some.schema.metadata == full.schema.metadata
    assert some.to_pylist() == full.select(["seq", "kind", "emu_io"]).to_pylist()
    with pytest.raises(ValueError, match="none of the columns"):
        trace.table(["no_such_column"])


# ----------------------------------------------------------------------------- write errors


def test_unwritable_destinations_raise_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        TraceWriter(tmp_path / "nope" / "t.vsmt", {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceError, match="not a directory"):
        TraceWriter(tmp_path / "file" / "t.vsmt", {})
    with pytest.raises(TraceError, match="is a directory"):
        TraceWriter(tmp_path, {})
    with pytest.raises(TraceError, match="MiB free"):
        TraceWriter(tmp_path / "t.vsmt", {}, min_free_bytes=1 << 62)
    if Path("/dev/full").exists():
        with pytest.raises(TraceError, match="No space left on device"):
            TraceWriter("/dev/full", {}, min_free_bytes=0)


ENOSPC_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from vsmtrace.recorder.writer import TraceWriter
    from vsmtrace.vmm.events import EventKind as K
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    errors = []
    w = TraceWriter(sys.argv[1], {}, batch_rows=100, on_error=errors.append)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.RLIM_INFINITY))
    for i in range(20000):
        w.emit(K.SYNIC_MESSAGE, 0, 1, i, sint=0, message_type=1, message=bytes(range(256)) * 2)
    w.close()
    print(json.dumps({"error": str(w.error), "enabled": w.enabled, "callbacks": len(errors),
                      "flushed": w.stats.flushed_events, "dropped": w.stats.dropped, "sealed": w.sealed}))
    """
)


def test_write_error_during_run_stops_cleanly_and_keeps_what_was_recorded(tmp_path: Path) -> None:
    path = tmp_path / "full.vsmt"
    out = subprocess.run([sys.executable, "-c", ENOSPC_CHILD, str(path)], capture_output=True, text=True, env=_child_env(), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert "trace recording stopped" in res["error"] and "File too large" in res["error"]
    assert res["enabled"] is False and res["callbacks"] == 1 and res["sealed"] is False
    assert res["dropped"] > 0
    trace = open_trace(path)
    n = trace.table().num_rows
    assert 0 < n >= res["flushed"] and trace.table()["seq"].to_pylist() == list(range(n))


# ----------------------------------------------------------------------------- bad input


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good, _ = _stream_with_batches(tmp_path, 1)
    data = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}
    (tmp_path / "empty.vsmt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.vsmt", "empty file")
    (tmp_path / "trunc.vsmt").write_bytes(data[:100])
    cases["truncated"] = (tmp_path / "trunc.vsmt", "truncated")
    (tmp_path / "tiny.vsmt").write_bytes(data[:3])
    cases["tiny"] = (tmp_path / "tiny.vsmt", "truncated")
    (tmp_path / "foreign.txt").write_text("hello, I am not a trace\n")
    cases["foreign"] = (tmp_path / "foreign.txt", "not an Arrow IPC trace")
    plain = pa.table({"x": [1, 2, 3]})
    with ipc.new_stream(str(tmp_path / "plain.arrows"), plain.schema) as w:
        w.write_table(plain)
    cases["arrow-without-metadata"] = (tmp_path / "plain.arrows", "not a vsmtrace trace")
    newer = arrow_schema({"schema_version": SCHEMA_VERSION + 1})
    with ipc.new_file(str(tmp_path / "newer.vsmt"), newer) as w:
        pass
    cases["newer"] = (tmp_path / "newer.vsmt", f"schema version {SCHEMA_VERSION + 1} is newer")
    junk_md = plain.schema.with_metadata({METADATA_KEY: b"{not json"})
    with ipc.new_file(str(tmp_path / "junk.vsmt"), junk_md) as w:
        pass
    cases["corrupt-metadata"] = (tmp_path / "junk.vsmt", "corrupt vsmtrace metadata")
    cases["directory"] = (tmp_path, "is a directory")
    cases["missing"] = (tmp_path / "missing.vsmt", "no such file")
    return cases


def test_bad_input_raises_one_line_trace_format_errors(tmp_path: Path) -> None:
    for name, (path, fragment) in _bad_files(tmp_path).items():
        with pytest.raises(TraceFormatError) as exc:
            open_trace(path)
        msg = str(exc.value)
        assert fragment in msg and "\n" not in msg and str(path) in msg, (name, msg)


def test_vsmtrace_info_on_bad_input_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    for name, (path, fragment) in _bad_files(tmp_path).items():
        result = runner.invoke(cli_main, ["info", str(path)])
        assert result.exit_code == 2, (name, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), name
        err = result.stderr if hasattr(result, "stderr") else result.output
        lines = [line for line in err.splitlines() if line]
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, (name, err)


def test_vsmtrace_info_cli_subprocess(tmp_path: Path) -> None:
    """The real entry point: no traceback on stderr, exit 2 for a foreign file."""
    bad = tmp_path / "foreign.bin"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    out = subprocess.run([sys.executable, "-m", "vsmtrace.cli", "info", str(bad)], capture_output=True, text=True, env=_child_env(), cwd=REPO)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_vsmtrace_info_reports_sealed_and_recovered(tmp_path: Path) -> None:
    path = tmp_path / "t.vsmt"
    _write(path)
    result = CliRunner().invoke(cli_main, ["info", str(path)])
    assert result.exit_code == 0, result.output
    assert "sealed" in result.output and f"events       {len(SAMPLES)}" in result.output
    assert "HYPERCALL" in result.output and "bytes/event" in result.output
    assert re.search(r"^  smp +4$", result.output, re.M), result.output  # the VM config as aligned key/value lines
    stream, _ = _stream_with_batches(tmp_path, 3)
    data = stream.read_bytes()
    torn = tmp_path / "torn.vsmt"
    torn.write_bytes(data[: len(data) - 300])
    result = CliRunner().invoke(cli_main, ["info", str(torn)])
    assert result.exit_code == 0, result.output
    assert "recovered: torn tail at byte" in result.output and "events       100" in result.output


def test_emit_returns_the_sequence_number(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.vsmt", {}, batch_rows=3)
    seqs = [w.emit(K.PIO, 0, 0, i, address=0x80, size=1, is_write=True, data=i) for i in range(10)]
    w.close()
    assert seqs == list(range(10)) and w.emit(K.PIO, 0, 0, 0) is None
    assert [r["data"] for r in _rows(tmp_path / "t.vsmt")] == list(range(10))
