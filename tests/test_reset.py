"""Guest resets: port 0xCF9, port 0x92, the keyboard controller, a triple fault and the Hyper-V reset MSR.

By default a reset reboots the guest from its entry state, as QEMU does: the `reset`
guest prints the state a reset must restore on every boot and resets again, so a run
is a series of identical boots until --timeout. With --no-reboot the run ends with
exit status 8 (4 for a triple fault); a recording ends at the reset the same way.
"""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.devices.i8042 import I8042
from vsmtrace.vmm.devices.port92 import Port92
from vsmtrace.vmm.devices.reset_control import ResetControl

EXIT_RESET = 8
EXIT_GUEST_FAULT = 4
EXIT_TIMEOUT = 124
METHODS = ["cf9", "cf9full", "port92", "kbd", "triple", "hvmsr"]
BOOT = re.compile(r"^boot: how=(\S+) cpus=2/2 initialised=0x5eed zeroed=0 apic_base=0xfee00900 rte10=0x10000 scratch=0x0$")


def test_reset_devices_unit() -> None:
    causes: list[str] = []
    rc = ResetControl(causes.append)
    rc.pio_write(0xCF9, 1, 0x02)
    assert rc.pio_read(0xCF9, 1) == 0x02 and not causes
    rc.pio_write(0xCF9, 1, 0x06)
    assert len(causes) == 1
    p92 = Port92(causes.append)
    p92.pio_write(0x92, 1, 0x02)
    assert p92.pio_read(0x92, 1) == 0x02 and len(causes) == 1
    p92.pio_write(0x92, 1, 0x03)
    p92.pio_write(0x92, 1, 0x03)  # no new 0 -> 1 edge
    assert len(causes) == 2
    kbc = I8042(causes.append)
    assert kbc.pio_read(0x64, 1) == 0
    kbc.pio_write(0x64, 1, 0xAA)
    kbc.pio_write(0x60, 1, 0xFE)
    assert len(causes) == 2
    kbc.pio_write(0x64, 1, 0xFE)
    assert len(causes) == 3


def boots(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("boot:")]


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["cf9", "triple", "kbd"])
def test_reset_reboots_from_entry_state(kvm, guest, vsmtrace, how: str) -> None:  # type: ignore[no-untyped-def]
    """Each boot sees RAM, the APIC, the I/O APIC and the test device as at power-on, and starts both CPUs."""
    r = vsmtrace(["run", "--smp", "2", "--timeout", "8", "--append", f"how={how}", str(guest("reset"))], timeout=60)
    assert r.status == EXIT_TIMEOUT, r.stdout[-1000:] + r.stderr
    seen = boots(r.stdout)
    complete = [line for line in seen if BOOT.match(line)]
    assert len(complete) >= 2, r.stdout[-2000:]
    assert len(seen) - len(complete) <= 1  # at most the boot the timeout cut short
    assert "reset did not happen" not in r.stdout


@pytest.mark.kvm
@pytest.mark.parametrize("how", METHODS)
def test_no_reboot_ends_the_run(kvm, guest, vsmtrace, how: str) -> None:  # type: ignore[no-untyped-def]
    r = vsmtrace(["run", "--smp", "2", "--no-reboot", "--timeout", "60", "--append", f"how={how}", str(guest("reset"))],
                 timeout=120)  # fmt: skip
    assert len(boots(r.stdout)) == 1 and BOOT.match(boots(r.stdout)[0]), r.stdout
    if how == "triple":
        assert r.status == EXIT_GUEST_FAULT
        assert "triple-faulted" in r.stderr
    else:
        assert r.status == EXIT_RESET, r.stdout + r.stderr
        assert re.search(r"^vsmtrace: guest reset: .* \(not rebooted: --no-reboot\)$", r.stderr, re.M), r.stderr


@pytest.mark.kvm
def test_recording_ends_at_reset(kvm, guest, vsmtrace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    trace = tmp_path / "reset.arrow"
    r = vsmtrace(["run", "--smp", "2", "--record", str(trace), "--append", "how=port92", str(guest("reset"))], timeout=60)
    assert r.status == EXIT_RESET and len(boots(r.stdout)) == 1, r.stdout + r.stderr
    assert "a trace records one boot" in r.stderr
    rep = vsmtrace(["replay", str(trace)], timeout=120)
    assert rep.status == 0, rep.stdout + rep.stderr
