"""analysis/: derived tables against hand-counted synthetic traces, figures, Chrome export, diff, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import vsmtrace.analysis as A
from click.testing import CliRunner
from vsmtrace.analysis.chrome import HYPERCALL_TID_BASE, export_chrome
from vsmtrace.analysis.diff import diff_traces, format_diff
from vsmtrace.analysis.figures import FIGURES, write_figures
from vsmtrace.analysis.report import format_report, summarize
from vsmtrace.analysis.synthetic import synthetic_writer, write_realistic
from vsmtrace.analysis.tables import msr_mix
from vsmtrace.recorder.reader import open_trace
from vsmtrace.recorder.schema import COLUMN_BY_NAME, KIND_FIELDS
from vsmtrace.vmm.events import EventKind as K

from vsmtrace.cli import main

REPO = Path(__file__).resolve().parents[1]


def write_known(path: Path, *, rip_shift: int = 0, drop_last: bool = False, clock_scale: int = 1) -> Path:
    """The hand-counted trace used throughout (times in ns; see the expected values in each test)."""
    s = clock_scale
    with synthetic_writer(path) as w:
        e = w.emit
        e(K.VP_START, 0, 0, 0xFFF0, at=0 * s)
        e(K.HYPERCALL, 0, 0, 0x1000, at=100 * s, code=0x50, name="HvCallGetVpRegisters", status=0, status_name="HV_STATUS_SUCCESS", duration_ns=40)
        e(K.EXIT, 1, 0, 0x2000, at=120 * s, exit_reason="HLT", exit_code=5)
        e(K.HYPERCALL, 1, 0, 0x2004, at=150 * s, code=0x50, name="HvCallGetVpRegisters", status=6, status_name="HV_STATUS_ACCESS_DENIED")
        e(K.HYPERCALL, 0, 0, 0x1010, at=200 * s, code=0x11, name="HvCallVtlCall", fast=True, duration_ns=10)
        e(K.VTL_SWITCH, 0, 0, 0x1010, at=210 * s, from_vtl=0, to_vtl=1, reason="call", args=(7, 1, 2, 3))
        e(K.VTL_SWITCH, 1, 0, 0x2010, at=250 * s, from_vtl=0, to_vtl=1, reason="call", args=(7,))
        e(K.PROTECTION, 0, 1, 0x8000, at=300 * s, target_vtl=0, gpa_start=0x10000, pages=2, new_mask=0x1)
        e(K.HYPERCALL, 0, 1, 0x8010 + rip_shift, at=400 * s, code=0x12, name="HvCallVtlReturn", fast=True)
        e(K.VTL_SWITCH, 0, 1, 0x8010, at=410 * s, from_vtl=1, to_vtl=0, reason="return")
        e(K.INTERCEPT, 0, 0, 0x1020, at=500 * s, access="write", gpa=0x10010, gva=0xFFFF_0000_0001_0010)
        e(K.VTL_SWITCH, 0, 0, 0x1020, at=510 * s, from_vtl=0, to_vtl=1, reason="intercept")
        e(K.PROTECTION, 0, 1, 0x8020, at=600 * s, target_vtl=0, gpa_start=0x11000, pages=1, old_mask=0x1, new_mask=0xF)
        e(K.VTL_SWITCH, 0, 1, 0x8030, at=700 * s, from_vtl=1, to_vtl=0, reason="return")
        e(K.INTERRUPT, 0, 0, 0x1020, at=800 * s, vector=0x30, source="apic-timer")
        e(K.VTL_SWITCH, 1, 1, 0x9000, at=850 * s, from_vtl=1, to_vtl=0, reason="return")
        e(K.EXIT, 0, 0, 0x1030, at=900 * s, exit_reason="HLT", exit_code=5)
        e(K.ERROR, 1, 0, None, at=950 * s, message="boom")
        if not drop_last:
            e(K.VP_STOP, 0, 0, None, at=1000 * s, reason="guest-exit")
    return path


@pytest.fixture(scope="module")
def known(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_known(tmp_path_factory.mktemp("known") / "known.vsmt")


@pytest.fixture(scope="module")
def lf(known: Path) -> pl.LazyFrame:
    return A.load(known)


def rows(q: pl.LazyFrame) -> list[dict]:
    return q.collect().to_dicts()


# ----------------------------------------------------------------------------- schema additions


def test_additive_schema_columns_round_trip(tmp_path: Path) -> None:
    assert "args" in KIND_FIELDS[K.VTL_SWITCH] and "duration_ns" in KIND_FIELDS[K.HYPERCALL]
    assert COLUMN_BY_NAME["args"].type.value_type.bit_width == 64
    p = write_known(tmp_path / "t.vsmt")
    t = open_trace(p)
    assert t.sealed
    df = t.lazy().filter(pl.col("kind") == "VTL_SWITCH").select("args").collect()
    assert df["args"].to_list() == [[7, 1, 2, 3], [7], None, None, None, None]
    assert t.lazy().filter(pl.col("kind") == "HYPERCALL").select("duration_ns").collect()["duration_ns"].to_list() == [40, None, 10, None]
    assert "`args`" in (REPO / "docs" / "trace-format.md").read_text()


def test_load_fills_columns_missing_from_older_traces(lf: pl.LazyFrame) -> None:
    old = lf.drop("args", "duration_ns").collect()
    lf2 = A.load(old)
    assert lf2.collect_schema()["args"] == pl.List(pl.UInt64)
    t = A.vtl_transitions(lf2).collect()
    assert t["arg0"].null_count() == t.height == 3
    calls = A.hypercalls(lf2).collect()
    assert calls["latency_is_bound"].all()


# ----------------------------------------------------------------------------- derived tables (hand-counted)


def test_event_counts(lf: pl.LazyFrame) -> None:
    counts = dict(A.event_counts(lf).collect().iter_rows())
    assert counts == {"VTL_SWITCH": 6, "HYPERCALL": 4, "EXIT": 2, "PROTECTION": 2, "VP_START": 1, "INTERCEPT": 1, "INTERRUPT": 1,
                      "ERROR": 1, "VP_STOP": 1}  # fmt: skip


def test_vtl_transitions_pair_entries_with_returns(lf: pl.LazyFrame) -> None:
    t = rows(A.vtl_transitions(lf).select("vp", "reason", "from_vtl", "to_vtl", "call_time_ns", "return_time_ns", "latency_ns", "arg0", "arg1", "return_reason"))
    assert t == [
        {"vp": 0, "reason": "call", "from_vtl": 0, "to_vtl": 1, "call_time_ns": 210, "return_time_ns": 410, "latency_ns": 200, "arg0": 7, "arg1": 1, "return_reason": "return"},
        {"vp": 1, "reason": "call", "from_vtl": 0, "to_vtl": 1, "call_time_ns": 250, "return_time_ns": 850, "latency_ns": 600, "arg0": 7, "arg1": None, "return_reason": "return"},
        {"vp": 0, "reason": "intercept", "from_vtl": 0, "to_vtl": 1, "call_time_ns": 510, "return_time_ns": 700, "latency_ns": 190, "arg0": None, "arg1": None, "return_reason": "return"},
    ]  # fmt: skip
    lat = rows(A.transition_latency(A.vtl_transitions(lf)).select("vp", "reason", "count", "max_ns"))
    assert lat == [{"vp": 0, "reason": "call", "count": 1, "max_ns": 200}, {"vp": 0, "reason": "intercept", "count": 1, "max_ns": 190},
                   {"vp": 1, "reason": "call", "count": 1, "max_ns": 600}]  # fmt: skip
    sc = rows(A.secure_calls(A.vtl_transitions(lf)).select("service", "count", "mean_ns", "max_ns"))
    assert sc == [{"service": 7, "count": 2, "mean_ns": 400.0, "max_ns": 600}]


def test_unreturned_entry_has_null_latency(tmp_path: Path) -> None:
    with synthetic_writer(tmp_path / "u.vsmt") as w:
        w.emit(K.VTL_SWITCH, 0, 0, 1, at=10, from_vtl=0, to_vtl=1, reason="interrupt")
        w.emit(K.MSR, 0, 1, 2, at=30, msr=1, value=0, is_write=False)
    t = rows(A.vtl_transitions(A.load(tmp_path / "u.vsmt")).select("reason", "return_seq", "latency_ns"))
    assert t == [{"reason": "interrupt", "return_seq": None, "latency_ns": None}]


def test_vtl_stints_and_residency(lf: pl.LazyFrame) -> None:
    st = rows(A.vtl_stints(lf).select("vp", "vtl", "start_ns", "end_ns", "start_reason", "end_reason"))
    assert st == [
        {"vp": 0, "vtl": 0, "start_ns": 0, "end_ns": 210, "start_reason": "start", "end_reason": "call"},
        {"vp": 0, "vtl": 1, "start_ns": 210, "end_ns": 410, "start_reason": "call", "end_reason": "return"},
        {"vp": 0, "vtl": 0, "start_ns": 410, "end_ns": 510, "start_reason": "return", "end_reason": "intercept"},
        {"vp": 0, "vtl": 1, "start_ns": 510, "end_ns": 700, "start_reason": "intercept", "end_reason": "return"},
        {"vp": 0, "vtl": 0, "start_ns": 700, "end_ns": 1000, "start_reason": "return", "end_reason": "stop"},
        # VP 1 has no VP_START: it starts at its first event, and is still running at its last.
        {"vp": 1, "vtl": 0, "start_ns": 120, "end_ns": 250, "start_reason": "trace-start", "end_reason": "call"},
        {"vp": 1, "vtl": 1, "start_ns": 250, "end_ns": 850, "start_reason": "call", "end_reason": "return"},
        {"vp": 1, "vtl": 0, "start_ns": 850, "end_ns": 950, "start_reason": "return", "end_reason": "trace-end"},
    ]
    res = rows(A.vtl_residency(A.vtl_stints(lf)).select("vp", "vtl", "stints", "total_ns", "share"))
    assert res == [
        {"vp": 0, "vtl": 0, "stints": 3, "total_ns": 610, "share": pytest.approx(0.61)},
        {"vp": 0, "vtl": 1, "stints": 2, "total_ns": 390, "share": pytest.approx(0.39)},
        {"vp": 1, "vtl": 0, "stints": 2, "total_ns": 230, "share": pytest.approx(230 / 830)},
        {"vp": 1, "vtl": 1, "stints": 1, "total_ns": 600, "share": pytest.approx(600 / 830)},
    ]


def test_hypercall_tables(lf: pl.LazyFrame) -> None:
    calls = rows(A.hypercalls(lf).select("vp", "code", "latency_ns", "latency_is_bound"))
    # VP1's GetVpRegisters and the VtlReturn have no duration: bounded by the previous event on the VP (150-120, 400-300).
    assert calls == [
        {"vp": 0, "code": 0x50, "latency_ns": 40, "latency_is_bound": False},
        {"vp": 1, "code": 0x50, "latency_ns": 30, "latency_is_bound": True},
        {"vp": 0, "code": 0x11, "latency_ns": 10, "latency_is_bound": False},
        {"vp": 0, "code": 0x12, "latency_ns": 100, "latency_is_bound": True},
    ]
    no_fb = A.hypercalls(lf, bound_fallback=False).collect()
    assert no_fb["latency_ns"].to_list() == [40, None, 10, None]
    stats = rows(A.hypercall_stats(A.hypercalls(lf)).select("code", "name", "vtl", "count", "failed", "bounded", "max_ns"))
    assert stats == [
        {"code": 0x50, "name": "HvCallGetVpRegisters", "vtl": 0, "count": 2, "failed": 1, "bounded": 1, "max_ns": 40},
        {"code": 0x11, "name": "HvCallVtlCall", "vtl": 0, "count": 1, "failed": 0, "bounded": 0, "max_ns": 10},
        {"code": 0x12, "name": "HvCallVtlReturn", "vtl": 1, "count": 1, "failed": 0, "bounded": 1, "max_ns": 100},
    ]
    status = rows(A.hypercall_status(A.hypercalls(lf)).select("code", "status_name", "count"))
    assert {"code": 0x50, "status_name": "HV_STATUS_ACCESS_DENIED", "count": 1} in status
    assert {"code": 0x50, "status_name": "HV_STATUS_SUCCESS", "count": 1} in status
    assert len(status) == 4


def test_intercepts_interrupts_exits_errors(lf: pl.LazyFrame) -> None:
    ic = rows(A.intercepts(lf).select("vp", "access", "gpa", "page", "rip"))
    assert ic == [{"vp": 0, "access": "write", "gpa": 0x10010, "page": 0x10, "rip": 0x1020}]
    assert rows(A.intercept_stats(A.intercepts(lf)).select("page", "access", "count", "rips")) == [{"page": 0x10, "access": "write", "count": 1, "rips": 1}]
    assert rows(A.intercept_stats(A.intercepts(lf), by=("rip", "access")).select("rip", "count")) == [{"rip": 0x1020, "count": 1}]
    assert rows(A.interrupts(lf).select("vector", "vtl", "source", "count")) == [{"vector": 0x30, "vtl": 0, "source": "apic-timer", "count": 1}]
    assert rows(A.exits(lf)) == [{"exit_reason": "HLT", "vtl": 0, "count": 2}]
    assert rows(A.errors(lf).select("vp", "kind", "text")) == [{"vp": 1, "kind": "ERROR", "text": "boom"}]


def test_protection_tables(lf: pl.LazyFrame) -> None:
    ch = rows(A.protection_changes(lf).select("gpa_start", "gpa_end", "pages", "old_mask", "new_mask"))
    assert ch == [{"gpa_start": 0x10000, "gpa_end": 0x12000, "pages": 2, "old_mask": None, "new_mask": 1},
                  {"gpa_start": 0x11000, "gpa_end": 0x12000, "pages": 1, "old_mask": 1, "new_mask": 0xF}]  # fmt: skip
    pp = rows(A.protection_pages(lf).select("page", "time_ns", "new_mask", "prev_mask", "until_ns"))
    assert pp == [
        {"page": 0x10, "time_ns": 300, "new_mask": 1, "prev_mask": None, "until_ns": None},
        {"page": 0x11, "time_ns": 300, "new_mask": 1, "prev_mask": None, "until_ns": 600},
        {"page": 0x11, "time_ns": 600, "new_mask": 0xF, "prev_mask": 1, "until_ns": None},
    ]
    pm = rows(A.protection_map(lf).select("time_ns", "mask", "delta", "pages"))
    assert pm == [
        {"time_ns": 300, "mask": 1, "delta": 2, "pages": 2},
        {"time_ns": 600, "mask": 1, "delta": -1, "pages": 1},
        {"time_ns": 600, "mask": 0xF, "delta": 1, "pages": 1},
    ]


def test_tables_tolerate_missing_kinds(tmp_path: Path) -> None:
    with synthetic_writer(tmp_path / "e.vsmt") as w:
        w.emit(K.PIO, 0, 0, 1, at=5, address=0x3F8, size=1, is_write=True, data=65)
    lf = A.load(tmp_path / "e.vsmt")
    for q in (A.vtl_transitions(lf), A.hypercall_stats(A.hypercalls(lf)), A.protection_map(lf), A.intercepts(lf), A.interrupts(lf)):
        assert q.collect().height == 0
    assert rows(A.vtl_stints(lf).select("vtl", "start_reason", "end_reason")) == [{"vtl": 0, "start_reason": "trace-start", "end_reason": "trace-end"}]
    text = format_report(summarize(lf))
    assert "no VTL switches" in text and "no hypercalls" in text


def test_tables_stay_lazy_and_stream(lf: pl.LazyFrame) -> None:
    for q in (A.vtl_transitions(lf), A.vtl_residency(A.vtl_stints(lf)), A.hypercall_stats(A.hypercalls(lf)), A.protection_map(lf)):
        assert isinstance(q, pl.LazyFrame)
        q.collect(engine="streaming")


def test_realistic_trace_summary_is_consistent(tmp_path: Path) -> None:
    p = tmp_path / "r.vsmt"
    n = write_realistic(p, 20000, vps=3, seed=5)
    lf = A.load(p)
    s = summarize(lf)
    assert s.events == n == int(s.counts["events"].sum())
    switches = int(s.counts.filter(pl.col("kind") == "VTL_SWITCH")["events"][0])
    assert int(s.transitions["count"].sum()) == (switches + int(s.transitions["count"].sum() - s.transitions["measured"].sum())) // 2
    assert s.residency.group_by("vp").agg(pl.col("share").sum())["share"].to_list() == pytest.approx([1.0] * 3)


# ----------------------------------------------------------------------------- figures


def test_figures_written_non_empty_and_deterministic(known: Path, tmp_path: Path) -> None:
    lf = A.load(known)
    first = write_figures(lf, tmp_path / "a", ("png", "svg"))
    again = write_figures(lf, tmp_path / "b", ("png", "svg"))
    assert len(first) == 2 * len(FIGURES)
    for p, q in zip(first, again, strict=True):
        assert p.stat().st_size > 1000, p
        assert p.read_bytes() == q.read_bytes(), f"{p.name} differs between runs"
    assert b"<svg" in (tmp_path / "a" / "vtl_timeline.svg").read_bytes()
    assert (tmp_path / "a" / "vtl_timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same events recorded again (different writer start time) give the same files.
    lf2 = A.load(write_known(tmp_path / "again.vsmt"))
    for p, q in zip(first, write_figures(lf2, tmp_path / "c", ("png", "svg")), strict=True):
        assert p.read_bytes() == q.read_bytes(), p.name


def test_figures_on_a_trace_without_vsm(tmp_path: Path) -> None:
    with synthetic_writer(tmp_path / "e.vsmt") as w:
        w.emit(K.PIO, 0, 0, 1, at=5, address=0x3F8, size=1, is_write=True, data=65)
    for p in write_figures(A.load(tmp_path / "e.vsmt"), tmp_path / "f"):
        assert p.stat().st_size > 1000


# ----------------------------------------------------------------------------- Chrome export


def test_chrome_export_tracks_and_slices(known: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.json"
    r = CliRunner().invoke(main, ["export", str(known), "--format", "chrome", "-o", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    evs = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {0: "VP 0", 1: "VP 1", HYPERCALL_TID_BASE: "VP 0 hypercalls", HYPERCALL_TID_BASE + 1: "VP 1 hypercalls"}
    stints = [e for e in evs if e.get("cat") == "vtl"]
    assert [(e["tid"], e["name"], e["ts"], e["dur"]) for e in stints if e["tid"] == 0] == [
        (0, "VTL0", 0.0, 0.21), (0, "VTL1", 0.21, 0.2), (0, "VTL0", 0.41, 0.1), (0, "VTL1", 0.51, 0.19), (0, "VTL0", 0.7, 0.3)]  # fmt: skip
    hc = [e for e in evs if e.get("cat") == "hypercall"]
    assert sorted(e["ph"] for e in hc) == ["X", "X", "i", "i"]
    timed = next(e for e in hc if e["ph"] == "X" and e["name"] == "HvCallGetVpRegisters")
    assert (timed["ts"], timed["dur"], timed["tid"]) == (0.06, 0.04, HYPERCALL_TID_BASE)
    ic = [e for e in evs if e.get("cat") == "intercept"]
    assert len(ic) == 1 and ic[0]["ph"] == "i" and ic[0]["args"]["gpa"] == "0x10010"
    assert all({"ph", "pid", "tid", "name"} <= e.keys() for e in evs)


def test_chrome_export_default_output_name(known: Path, tmp_path: Path) -> None:
    import shutil

    p = tmp_path / "x.vsmt"
    shutil.copy(known, p)
    assert export_chrome(A.load(p), tmp_path / "y.json") > 0
    r = CliRunner().invoke(main, ["export", str(p)])
    assert r.exit_code == 0 and (tmp_path / "x.vsmt.json").exists()


# ----------------------------------------------------------------------------- diff


def test_diff_identical_traces_ignores_timing(known: Path, tmp_path: Path) -> None:
    slow = write_known(tmp_path / "slow.vsmt", clock_scale=3)
    d = diff_traces(A.load(known), A.load(slow))
    assert d.divergence is None
    assert d.counts["delta"].to_list() == [0] * d.counts.height
    assert d.transitions.filter(pl.col("reason") == "call")["p50_ns_b"].item() in (600.0, 1800.0)
    r = CliRunner().invoke(main, ["diff", str(known), str(slow)])
    assert r.exit_code == 0 and "identical" in r.output


def test_diff_names_first_divergence(known: Path, tmp_path: Path) -> None:
    other = write_known(tmp_path / "o.vsmt", rip_shift=4)
    d = diff_traces(A.load(known), A.load(other))
    assert d.divergence is not None
    assert (d.divergence.index, d.divergence.columns) == (8, ["rip"])
    assert d.divergence.a["rip"] == 0x8010 and d.divergence.b["rip"] == 0x8014 and d.divergence.a["kind"] == "HYPERCALL"
    text = format_diff(d)
    assert "first divergence at event #8" in text and "rip" in text
    r = CliRunner().invoke(main, ["diff", str(known), str(other)])
    assert r.exit_code == 1 and "first divergence at event #8" in r.output
    r = CliRunner().invoke(main, ["diff", str(known), str(other), "--ignore", "rip"])
    assert r.exit_code == 0


def test_diff_shorter_trace(known: Path, tmp_path: Path) -> None:
    short = write_known(tmp_path / "s.vsmt", drop_last=True)
    d = diff_traces(A.load(known), A.load(short))
    assert d.divergence is not None and d.divergence.index == 18 and d.divergence.columns == ["<end of B>"]
    assert d.divergence.a["kind"] == "VP_STOP"
    assert d.counts.filter(pl.col("kind") == "VP_STOP")["delta"].item() == -1
    assert "B ends there" in format_diff(d)


# ----------------------------------------------------------------------------- CLI


def test_report_cli(known: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["report", str(known), "--out", str(tmp_path / "fig"), "--format", "png", "--format", "svg"])
    assert r.exit_code == 0, r.output
    for section in ("events per kind", "VTL transitions", "VTL residency", "top hypercalls", "secure memory intercepts", "errors", "boom"):
        assert section in r.output, section
    assert "HvCallGetVpRegisters" in r.output and "0x7" in r.output
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == sorted(f"{n}.{f}" for n in FIGURES for f in ("png", "svg"))


@pytest.mark.parametrize("command", [["report"], ["export"], ["diff", "GOOD"], ["diff", "BAD", "GOOD"]])
def test_bad_input_is_one_line_error(command: list[str], known: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notatrace.txt"
    bad.write_text("hello, not arrow\n")
    args = [str(known) if a == "GOOD" else str(bad) if a == "BAD" else a for a in command]
    if "BAD" not in command:
        args.append(str(bad))
    r = subprocess.run([sys.executable, "-m", "vsmtrace.cli", *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("vsmtrace: error:") and "notatrace.txt" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_msr_mix_names_synthetic_msrs_and_counts_reads_writes(tmp_path: Path) -> None:
    with synthetic_writer(tmp_path / "m.vsmt") as w:
        for at, (msr, is_write, fault) in enumerate(
            [(0x40000000, True, False), (0x40000000, False, False), (0x40000021, True, False), (0x1B, False, False),
             (0x40000050, False, True)]
        ):  # fmt: skip
            w.emit(K.MSR, 0, 0, 1, at=at, msr=msr, value=0 if fault else 1, is_write=is_write, fault=fault)
    mix = rows(msr_mix(A.load(tmp_path / "m.vsmt")))
    assert mix[0] == {"msr": 0x40000000, "name": "GUEST_OS_ID", "synthetic": True, "count": 2, "reads": 1, "writes": 1, "faults": 0}
    assert {r["msr"]: (r["name"], r["synthetic"], r["faults"]) for r in mix[1:]} == {
        0x40000021: ("REFERENCE_TSC", True, 0), 0x1B: (None, False, 0), 0x40000050: (None, True, 1),
    }  # fmt: skip
    text = format_report(summarize(A.load(tmp_path / "m.vsmt")))
    assert "MSRs (Hyper-V synthetic first)" in text and "GUEST_OS_ID" in text


# ----------------------------------------------------------------------------- diff: traces read batch by batch


def _rewrite(src: Path, dst: Path, chunk: int, edit=None) -> Path:  # type: ignore[no-untyped-def]
    """``src``'s events as a sealed trace with ``chunk``-row batches (other batch boundaries than ``src``), optionally edited."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = open_trace(src).table()
    if edit is not None:
        table = edit(table)
    with ipc.new_file(str(dst), table.schema) as w:
        for b in table.combine_chunks().to_batches(max_chunksize=chunk):
            w.write_batch(b)
    assert open_trace(dst).sealed and pa.types.is_dictionary(table.schema.field("kind").type)
    return dst


def test_diff_of_traces_batch_by_batch_matches_the_frame_comparison(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    base = tmp_path / "a.vsmt"
    write_realistic(base, 6000, vps=2, seed=3)
    n = open_trace(base).table().num_rows

    def set_rip(table: pa.Table, row: int) -> pa.Table:
        rip = table.column("rip").combine_chunks()
        new = pc.if_else(pa.array([i == row for i in range(n)]), pa.scalar(0xDEAD, rip.type), rip)
        return table.set_column(table.schema.get_field_index("rip"), "rip", new)

    def recode_kind(table: pa.Table, change: int | None = None) -> pa.Table:  # the same strings under other dictionary numbers
        kind = table.column("kind").combine_chunks().dictionary_decode()
        values = sorted(set(kind.to_pylist()), reverse=True)
        codes = [values.index(v) for v in kind.to_pylist()]
        if change is not None:  # and one event of another kind
            codes[change] = (codes[change] + 1) % len(values)
        indices = pa.array(codes, pa.int8())
        recoded = pa.DictionaryArray.from_arrays(indices, pa.array(values))
        return table.set_column(table.schema.get_field_index("kind"), "kind", recoded)

    cases = {
        "same": _rewrite(base, tmp_path / "same.vsmt", 777),
        "recoded": _rewrite(base, tmp_path / "recoded.vsmt", 1000, recode_kind),
        "rip": _rewrite(base, tmp_path / "rip.vsmt", 333, lambda t: set_rip(t, 4321)),
        "kind": _rewrite(base, tmp_path / "kind.vsmt", 900, lambda t: recode_kind(t, change=2500)),
        "short": _rewrite(base, tmp_path / "short.vsmt", 500, lambda t: t.slice(0, n - 17)),
    }
    for name, other in cases.items():
        seen: list[int] = []
        by_batch = diff_traces(base, other, on_rows=seen.append).divergence  # paths: read batch by batch
        by_frame = diff_traces(A.load(base), A.load(other)).divergence
        assert by_batch == by_frame, name
        if name in ("same", "recoded"):
            assert by_batch is None and sum(seen) == n, name
    rip = diff_traces(open_trace(base), open_trace(cases["rip"])).divergence
    assert rip is not None and (rip.index, rip.columns, rip.b["rip"]) == (4321, ["rip"], 0xDEAD)
    kind = diff_traces(base, cases["kind"]).divergence
    assert kind is not None and kind.index == 2500 and "kind" in kind.columns
    short = diff_traces(base, cases["short"]).divergence
    assert short is not None and (short.index, short.columns) == (n - 17, ["<end of B>"])
    assert diff_traces(cases["short"], base).divergence.columns == ["<end of A>"]  # type: ignore[union-attr]
