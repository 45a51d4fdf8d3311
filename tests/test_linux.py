"""A real Linux 6.1 kernel (Debian's linux-source-6.1, guests/linux) boots on vsmtrace's Hyper-V.

The kernel is built once into the cache by ``vsmtrace.guests.linux.build`` (.ci/run
builds it before the suite). Each boot is recorded once per module; the guest's own
init (guests/linux/init.c) prints what the kernel detected and reboots. The
assertions are on what Linux itself printed (Hyper-V detected, its TSC-page
clocksource selected, its synthetic-timer clockevent on every CPU, init's lines) and
on the trace (it replays bit for bit; its report shows the hypercalls and synthetic
MSRs of a real boot). A reset or a panic alone is never a pass: init's lines are.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from vsmtrace.guests.linux.build import DEFAULT_CMDLINE, LinuxBuildError, LinuxGuest, build
from vsmtrace.recorder import open_trace

from tests.conftest import ROOT, _require_kvm, run_vsmtrace
from tests.test_notebooks import execute

pytestmark = pytest.mark.kvm

BOOT_TIMEOUT_S = 900  # a healthy 2-VP boot takes about two minutes here; the shared CI host can be slower
RESET_STATUS = 8  # a recorded run ends at the guest's reset with this status (README)

# Hyper-V synthetic MSRs (TLFS numbers, vmm/hvdef).
GUEST_OS_ID, HYPERCALL, VP_INDEX = 0x40000000, 0x40000001, 0x40000002
REFERENCE_TSC, TSC_FREQUENCY, APIC_FREQUENCY = 0x40000021, 0x40000022, 0x40000023
VP_ASSIST_PAGE, STIMER0_CONFIG, STIMER0_COUNT = 0x40000073, 0x400000B0, 0x400000B1


@dataclass
class Boot:
    status: int
    console: str
    stderr: str
    trace: Path

    def init_lines(self) -> list[str]:
        return [line.removeprefix("init: ") for line in self.console.splitlines() if line.startswith("init: ")]


@pytest.fixture(scope="module")
def linux() -> LinuxGuest:
    _require_kvm()
    try:
        return build()
    except LinuxBuildError as exc:  # e.g. no linux-source-6.1 and not root
        if os.environ.get("VSMTRACE_REQUIRE_KVM"):
            pytest.fail(f"the Linux guest cannot be built: {exc}")
        pytest.skip(f"the Linux guest cannot be built here: {exc}")


def _boot(guest: LinuxGuest, tmp: Path, cpus: int) -> Boot:
    trace = tmp / f"linux-{cpus}vp.arrow"
    r = run_vsmtrace(
        ["run", "--smp", str(cpus), "--memory", "128", "--timeout", str(BOOT_TIMEOUT_S), "--record", str(trace),
         *guest.vsmtrace_args, "--initrd", str(guest.initramfs), "--append", guest.cmdline, str(guest.vmlinux)],
        timeout=BOOT_TIMEOUT_S + 120,
    )  # fmt: skip
    return Boot(r.status, r.stdout.replace("\r\n", "\n"), r.stderr, trace)


@pytest.fixture(scope="module")
def boot1(linux: LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return _boot(linux, tmp_path_factory.mktemp("linux1"), 1)


@pytest.fixture(scope="module")
def boot2(linux: LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    return _boot(linux, tmp_path_factory.mktemp("linux2"), 2)


def _check_boot(b: Boot, cpus: int) -> None:
    init = b.init_lines()
    context = b.console[-3000:] + "\n--- stderr ---\n" + b.stderr[-2000:]
    assert init and init[-1] == "done, rebooting", context
    assert b.status == RESET_STATUS, context
    # What the kernel printed about Hyper-V, in its log on the console.
    assert "Hypervisor detected: Microsoft Hyper-V" in b.console, context
    assert re.search(r"Hyper-V: privilege flags low 0x[0-9a-f]+, high 0x[0-9a-f]+, hints 0x[0-9a-f]+", b.console)
    assert "clocksource: Switched to clocksource hyperv_clocksource_tsc_page" in b.console, context
    assert "Kernel panic" not in b.console and "Oops" not in b.console, context
    # What init read back from the running kernel.
    assert re.fullmatch(r"Linux 6\.1\.\S+ userspace reached", init[0]), init
    online = "0" if cpus == 1 else f"0-{cpus - 1}"
    assert f"cpus online {online}, {cpus} processors in /proc/cpuinfo" in init, init
    assert "hypervisor flag yes" in init, init
    clocksource = [line for line in init if line.startswith("clocksource ")]
    assert clocksource and clocksource[0].startswith("clocksource hyperv_clocksource_tsc_page "), init
    events = [line for line in init if line.startswith("clockevent")]
    assert events == [f"clockevent{i} Hyper-V clockevent" for i in range(cpus)], init
    assert any(line.startswith("dmesg ") and "Hyper-V: privilege flags" in line for line in init), init


def test_linux_boots_to_init_on_one_vp(boot1: Boot) -> None:
    _check_boot(boot1, 1)


def test_linux_boots_to_init_on_two_vps(boot2: Boot) -> None:
    _check_boot(boot2, 2)
    assert "smp: Brought up 1 node, 2 CPUs" in boot2.console
    assert "Hyper-V: Using IPI hypercalls" in boot2.console


FLUSH_CALLS = (
    "HvCallFlushVirtualAddressSpace", "HvCallFlushVirtualAddressList",
    "HvCallFlushVirtualAddressSpaceEx", "HvCallFlushVirtualAddressListEx",
)  # fmt: skip


def test_remote_tlb_flush_goes_through_hyperv_on_two_vps(boot2: Boot) -> None:
    """init maps a new page over one its child reads on CPU 1: Linux flushes CPU 1 by hypercall.

    Linux takes hyperv_flush_tlb_multi because vsmtrace recommends remote TLB flushes by
    hypercall (CPUID 0x40000004 EAX bit 2); a boot alone never flushes another CPU's TLB
    for a user address space (docs/linux-guest.md, "PV TLB flush").
    """
    assert "Hyper-V: Using hypercall for remote TLB flush" in boot2.console, boot2.console[-3000:]
    assert "remote tlb flush: the other cpu sees the new page" in boot2.init_lines(), boot2.init_lines()
    frame = pl.from_arrow(open_trace(boot2.trace).table())
    assert isinstance(frame, pl.DataFrame)
    flushes = frame.filter(pl.col("name").cast(pl.String).is_in(FLUSH_CALLS))
    assert flushes.height > 0, "no PV TLB flush hypercall in the trace"
    statuses = set(flushes["status_name"].cast(pl.String).to_list())
    assert statuses == {"HV_STATUS_SUCCESS"}, statuses


def _symbol(vmlinux: Path, name: str) -> tuple[int, int]:
    from elftools.elf.elffile import ELFFile

    with vmlinux.open("rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        assert symtab is not None, f"{vmlinux} has no symbol table"
        (sym,) = symtab.get_symbol_by_name(name) or [None]
        assert sym is not None, name
        return int(sym["st_value"]), int(sym["st_size"])


def test_kernel_int3_and_fwait_are_completed_by_the_vmm(boot2: Boot, linux: LinuxGuest) -> None:
    """The boot's INT3 self-test and the child's exit (fpu__drop's fwait) stop KVM's emulator here.

    vsmtrace completes both (vmm/emulation_completions.py); the trace records each as an
    INTERNAL_ERROR exit at the instruction, and the boot went on to init's last line.
    """
    frame = pl.from_arrow(open_trace(boot2.trace).table())
    assert isinstance(frame, pl.DataFrame)
    stops = frame.filter(pl.col("exit_reason").cast(pl.String) == "INTERNAL_ERROR")
    rips = stops["rip"].to_list()
    int3_ip, _ = _symbol(linux.vmlinux, "int3_selftest_ip")
    drop, drop_size = _symbol(linux.vmlinux, "fpu__drop")
    assert int3_ip in rips, [hex(r) for r in rips]
    assert any(drop <= r < drop + drop_size for r in rips), [hex(r) for r in rips]
    assert boot2.init_lines()[-1] == "done, rebooting"


@pytest.mark.parametrize("which", ["boot1", "boot2"])
def test_recorded_boot_replays_bit_for_bit(which: str, request: pytest.FixtureRequest) -> None:
    b: Boot = request.getfixturevalue(which)
    assert b.init_lines()[-1:] == ["done, rebooting"], b.console[-2000:]
    r = run_vsmtrace(["replay", str(b.trace)], timeout=900)
    assert r.status == 0, r.stdout[-3000:] + r.stderr
    m = re.search(r"^replay verified: (\d+) emulation entries reproduced bit for bit", r.stdout, re.M)
    assert m and int(m.group(1)) > 1000, r.stdout


def test_trace_and_report_show_the_hyperv_mix_of_a_real_boot(boot2: Boot, tmp_path: Path) -> None:
    frame = pl.from_arrow(open_trace(boot2.trace).table())
    assert isinstance(frame, pl.DataFrame)
    kind = pl.col("kind").cast(pl.String)
    msrs = frame.filter(kind == "MSR")
    written = set(msrs.filter(pl.col("is_write"))["msr"].to_list())
    for msr in (GUEST_OS_ID, HYPERCALL, VP_ASSIST_PAGE, REFERENCE_TSC, STIMER0_CONFIG, STIMER0_COUNT):
        assert msr in written, hex(msr)
    read = set(msrs.filter(~pl.col("is_write"))["msr"].to_list())
    for msr in (VP_INDEX, TSC_FREQUENCY, APIC_FREQUENCY):
        assert msr in read, hex(msr)
    calls = frame.filter(kind == "HYPERCALL")
    names = set(calls["name"].cast(pl.String).to_list())
    assert names & {"HvCallSendSyntheticClusterIpi", "HvCallSendSyntheticClusterIpiEx"}, names
    report = run_vsmtrace(["report", str(boot2.trace), "--out", str(tmp_path / "report")], timeout=300)
    assert report.status == 0, report.stderr
    for name in ("GUEST_OS_ID", "HYPERCALL", "REFERENCE_TSC", "STIMER0_CONFIG", "VP_ASSIST_PAGE", *names):
        assert name in report.stdout, name


def test_default_command_line_carries_the_host_workarounds() -> None:
    words = DEFAULT_CMDLINE.split()
    for word in ("console=ttyS0", "noxsave", "clearcpuid=smap,popcnt,cx16,rdpid,rdtscp,erms,fsrm", "noinvpcid"):
        assert word in words


@pytest.fixture(scope="module")
def demo_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vsmtrace.demo import run_demo

    return run_demo(tmp_path_factory.mktemp("linux-nb-demo"), echo=False, step=lambda _text: None).trace


def test_notebook_compares_linux_with_the_vbs_demo(boot2: Boot, demo_trace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """notebooks/linux_boot.ipynb on this module's 2-VP recording (tests/test_notebooks.py runs the demo's)."""
    monkeypatch.setenv("VSMTRACE_LINUX_TRACE", str(boot2.trace))
    monkeypatch.setenv("VSMTRACE_DEMO_TRACE", str(demo_trace))
    folder = boot2.trace.parent  # beside the recording, as `vsmtrace notebooks --copy` puts them
    shutil.copy(ROOT / "notebooks" / "linux_boot.ipynb", folder)
    _, r = execute(folder, "linux_boot.ipynb", "python3")
    assert r["linux_trace"] == str(boot2.trace) and r["demo_trace"] == str(demo_trace)
    msrs = r["synthetic_msrs"]
    for name in ("REFERENCE_TSC", "STIMER0_CONFIG", "VP_ASSIST_PAGE", "GUEST_OS_ID"):
        assert msrs[name][0] > 0, name  # Linux uses them
    assert "SIMP" in r["only_demo"] and "SCONTROL" in r["only_demo"]  # the SynIC: only the demo (no VMBus)
    calls = r["hypercalls"]
    assert calls["HvCallVtlCall"] == [0, calls["HvCallVtlCall"][1]] and calls["HvCallVtlCall"][1] > 0
    assert sum(linux for linux, _ in calls.values()) > 0
