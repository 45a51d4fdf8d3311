"""The main job end to end: `vsmtrace demo` on a real /dev/kvm, as a user runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import run_vsmtrace

pytestmark = pytest.mark.kvm

# What guests/vbs_demo.c does, by secure service code (RDX at the VTL call).
EXPECTED_SECURE_CALLS = {0x1001: 24, 0x1002: 12, 0x1003: 6, 0x1004: 8, 0x10FF: 1}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    from tests.conftest import kvm_problem

    if kvm_problem() is not None:
        pytest.skip(f"needs KVM: {kvm_problem()}")
    out = tmp_path_factory.mktemp("demo")
    result = run_vsmtrace(["demo", "--out", str(out)], timeout=600)
    assert result.status == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_demo_guest_boots_and_exits_cleanly(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    serial = (out / "serial.log").read_text()
    for line in (
        "[vtl1] secure kernel on VP0: VTL protection enabled",
        "made R+X (HVCI-like)",
        "[vtl0] VP1 online in VTL0",
        "6 of 6 image verifications passed",
        "both attempts were blocked by the secure kernel (#GP x2",
        "secure calls VP0 get_random=24 seal_key=12 verify_image=6, VP1 attest=8",
        "[vtl0] demo complete",
    ):
        assert line in serial
    assert "guest finished" in stdout and "exited with code 0" in stdout


def test_demo_replay_is_verified(demo_run: tuple[Path, str]) -> None:
    _, stdout = demo_run
    match = re.search(r"replay verified: (\d+) emulation entries reproduced bit for bit", stdout)
    assert match is not None, stdout
    assert int(match.group(1)) > 100


def test_demo_report_counts_secure_calls_and_intercepts(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    report = (out / "report.txt").read_text()
    assert report.splitlines()[0] == f"trace {out / 'demo.arrow'}"  # the header docs/analysis.md shows
    section = report.split("secure calls by service code", 1)[1].split("\n\n", 1)[0]
    counts = {int(m.group(1), 16): int(m.group(2)) for m in re.finditer(r"^\s+(0x[0-9a-f]+)\s+(\d+)\s", section, re.M)}
    for service, count in EXPECTED_SECURE_CALLS.items():
        assert counts.get(service) == count, (hex(service), counts)
    intercepts = report.split("secure memory intercepts", 1)[1].split("top RIPs", 1)[0]
    rows = re.findall(r"^\s+0x[0-9a-f]+\s+(read|write|execute)\s+(\d+)", intercepts, re.M)
    assert sorted(rows) == [("read", "1"), ("write", "1")]


def test_demo_writes_figures_and_timeline(demo_run: tuple[Path, str]) -> None:
    out, stdout = demo_run
    figures = sorted((out / "figures").glob("*.png"))
    assert {p.name for p in figures} >= {"vtl_timeline.png", "hypercall_mix.png", "protection_map.png"}
    assert all(p.stat().st_size > 1000 for p in figures)
    assert (out / "demo.trace.json").stat().st_size > 1000
    assert "What to open next" in stdout


def test_demo_trace_info(demo_run: tuple[Path, str]) -> None:
    out, _ = demo_run
    info = run_vsmtrace(["info", str(out / "demo.arrow")])
    assert info.status == 0
    assert "sealed" in info.stdout
    assert re.search(r"INTERCEPT\s+2\b", info.stdout)


def test_synthetic_trace_has_the_demo_time_structure(demo_run: tuple[Path, str], tmp_path: Path) -> None:
    """analysis.synthetic's traces (behind bench/analysis and bench/fleet) look like this recording."""
    from vsmtrace.analysis.synthetic import write_realistic

    from tests.test_synthetic import structure

    out, _ = demo_run
    demo = structure(out / "demo.arrow", vtl_follows_switches=False)
    synthetic_path = tmp_path / "synthetic.vsmt"
    write_realistic(synthetic_path, 20_000, vps=2, seed=11)
    synthetic = structure(synthetic_path)
    assert demo.unreturned == synthetic.unreturned == 0
    assert demo.distinct_times > 0.9 and synthetic.distinct_times > 0.9
    for name in ("gap_p50_ns", "hypercall_p50_ns", "call_latency_p50_ns"):
        d, s = getattr(demo, name), getattr(synthetic, name)
        assert d / 10 < s < d * 10, f"{name}: synthetic {s:.0f} ns is not of the demo's order ({d:.0f} ns)"
