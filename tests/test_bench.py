"""The round-trip benchmarks' arithmetic and a short real run of each (bench/ scripts).

A benchmark must never print an impossible figure: the statistics refuse a figure whose
spread exceeds its signal, and a real run of bench/floor, bench/exits, bench/hypercalls,
bench/vtl, bench/dispatch and bench/cpu_floor with tiny counts prints only positive figures
(or says "too noisy"). bench/floor_vmm, the same-guest C floor, serves exactly the timed
round trips of the benchmark guests.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import tick_lines  # noqa: E402
from stats import Figure, ratios, show  # noqa: E402


def test_figure_median_and_quartiles():
    fig = Figure.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert fig.median == 3.0 and fig.q1 == 2.0 and fig.q3 == 4.0 and fig.rounds == 5
    assert show(fig) == "3.00 (2.00..4.00)"


def test_noise_is_refused_not_printed():
    noisy = Figure.of([1.0, 1.0, 9.0, 9.0])
    assert not noisy.trustworthy()
    assert show(noisy).startswith("too noisy")
    # a difference whose spread exceeds it is refused as well
    assert show(Figure.of([10.0, 10.5, 11.0, 10.2]), signal=0.1).startswith("too noisy")


def test_non_positive_figures_are_never_trusted():
    assert not Figure.of([0.0, 0.0, 0.0]).trustworthy()
    assert not Figure.of([-1.0, -1.0, -1.0]).trustworthy()


def test_ratio_spread_covers_worst_pairing():
    r = Figure.of([2.0, 2.0, 2.0, 2.0]) / Figure(1.0, 0.5, 2.0, 4)
    assert r.median == 2.0 and r.q1 == 1.0 and r.q3 == 4.0
    assert ratios([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]).median == 2.0


def test_tick_lines_parse_both_guest_formats():
    rounds, khz = tick_lines("tsc_khz 2500000\nT 00000000000003e8\nT call 42\nnoise\nT call 43\n")
    assert khz == 2500000
    assert rounds == {"exit": [1000], "call": [42, 43]}


NUMBER = re.compile(r"(?<![\w.])-\d")  # a negative figure, not the "-0" of "N-vs-0"


@pytest.mark.kvm
@pytest.mark.parametrize(
    "script,args",
    [("floor", ["200", "2"]), ("exits", ["200", "2", "1"]), ("hypercalls", ["100", "2", "1"]), ("vtl", ["50", "5", "2", "1"]),
     ("dispatch", ["50", "3"]), ("cpu_floor", ["8000", "1", "--kind", "fast"]),
     ("cpu_floor", ["8000", "1", "--kind", "exit", "--pin", "0"])],
)
def test_benchmarks_run_and_print_no_negative_figure(kvm, script, args):
    r = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "us" in r.stdout
    assert not NUMBER.search(r.stdout.replace("x-", "")), r.stdout


@pytest.mark.parametrize(
    "args,problem",
    [(["x"], "positive whole numbers"), (["0", "1"], "positive whole numbers"), (["--kind", "zz"], "--kind must be"),
     (["--pin", "99"], "--pin takes one of"), (["--pin"], "--pin takes one of")],
)
def test_cpu_floor_bad_arguments_get_one_line_and_status_2(args, problem):
    r = subprocess.run([sys.executable, str(BENCH / "cpu_floor"), *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert problem in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.kvm
@pytest.mark.parametrize(
    "guest,append,served",
    [("hypercalls", "n=40 rounds=2", 2 * 3 * 40),  # exit, fast and memory loops, every one in C
     ("vtl", "n=30 ni=2 ne=20 rounds=2", 2 * (20 + 2 * 30))],  # bare exits + a call and a return per round trip
)
def test_floor_serves_every_timed_round_trip_of_the_same_guest(kvm, guest, append, served):
    """bench/floor_vmm answers exactly the benchmark's timed round trips in C, and the guest still checks out."""
    from common import bench_guest, floor_vmm_cmd

    r = subprocess.run(floor_vmm_cmd(bench_guest(guest), append), capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr  # isa-debug-exit(0): the guest's own checks passed
    rounds, khz = tick_lines(r.stdout)
    assert khz and all(len(v) == 2 for v in rounds.values()), r.stdout
    assert f"served {served}\n" in r.stdout, r.stdout
