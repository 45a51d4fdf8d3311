"""QEMU's Hyper-V test device: the emulation's side (unit tests over fakes) and the hv_testdev guest on 2 VPs."""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.devices.hyperv_testdev import HYPERV_TESTDEV_PORT, HypervTestdev
from vsmtrace.vmm.hyperv.hvdef import HvInputPostMessage, HvInputSignalEvent, HvMessageFlags, HypercallCode
from vsmtrace.vmm.hyperv.test_device import HypervTestdevRequest

from tests.test_hyperv_unit import SIEFP_PAGE, SIMP_PAGE, SINT_VECTOR, Env, S, ctl


def cmd(conn: int, c: int, vp: int, sint: int) -> int:
    return conn << 24 | c << 16 | vp << 8 | sint


def make() -> Env:
    e = Env()
    e.enable_hypercalls()
    e.enable_synic(vp=1, sints=(3, 5, 6))
    return e


def test_decode() -> None:
    assert HypervTestdevRequest.decode(0x07040105) == HypervTestdevRequest(conn_id=7, cmd=4, vp=1, sint=5)


def test_port_forwards_32_bit_writes_only() -> None:
    got: list[int] = []
    dev = HypervTestdev(got.append)
    dev.pio_write(HYPERV_TESTDEV_PORT, 2, 0x1234)
    dev.pio_write(HYPERV_TESTDEV_PORT, 4, 0x00030105)
    assert got == [0x00030105]
    assert dev.pio_read(HYPERV_TESTDEV_PORT, 4) == 0


def test_sint_route_assert_and_destroy() -> None:
    e = make()
    assert not e.hv.test_device_command(cmd(0, 3, 1, 5))  # no route yet: ignored
    assert e.hv.test_device_command(cmd(0, 1, 1, 5))
    assert e.hv.test_device_command(cmd(0, 3, 1, 5))
    assert e.part.interrupts == [(1, 0, SINT_VECTOR + 5)]
    assert e.slot(5, SIMP_PAGE).header.message_type == 0  # no message
    e.wr(0x40000090 + 5, (1 << 16) | (SINT_VECTOR + 5), vp=1)  # masked
    assert e.hv.test_device_command(cmd(0, 3, 1, 5))
    assert len(e.part.interrupts) == 1
    assert e.hv.test_device_command(cmd(0, 2, 1, 5))
    assert not e.hv.test_device_command(cmd(0, 3, 1, 5))
    assert not e.hv.test_device_command(cmd(0, 1, 9, 5))  # no VP 9
    assert not e.hv.test_device_command(cmd(0, 9, 1, 5))  # unknown command


def test_message_connection_one_staged_message() -> None:
    e = make()
    c = ctl(HypercallCode.HvCallPostMessage)

    def post(mtype: int) -> int:
        return e.call(c, input=HvInputPostMessage(7, 0, mtype, 1, bytes([mtype]).ljust(240, b"\0")).pack())[0]

    assert post(0x42) == S.HV_STATUS_INVALID_CONNECTION_ID
    e.hv.test_device_command(cmd(7, 4, 1, 6))
    assert post(0x42) == S.HV_STATUS_SUCCESS
    msg = e.slot(6, SIMP_PAGE)
    assert (msg.header.message_type, msg.payload, msg.header.origination_id) == (0x42, b"\x42", 0)
    assert e.part.interrupts[-1] == (1, 0, SINT_VECTOR + 6)
    assert post(0x43) == S.HV_STATUS_SUCCESS  # slot busy: waits, pending
    assert e.slot(6, SIMP_PAGE).header.message_flags & HvMessageFlags.MESSAGE_PENDING
    assert post(0x44) == S.HV_STATUS_INSUFFICIENT_BUFFERS
    e.clear_slot(6, SIMP_PAGE)
    e.wr(0x40000084, 0, vp=1)  # EOM
    assert e.slot(6, SIMP_PAGE).header.message_type == 0x43
    e.hv.test_device_command(cmd(7, 5, 1, 6))
    assert post(0x45) == S.HV_STATUS_INVALID_CONNECTION_ID


def test_event_connection_flag_is_conn_id() -> None:
    e = make()
    c = ctl(HypercallCode.HvCallSignalEvent)

    def signal(conn: int = 9) -> int:
        return e.call(c, input=HvInputSignalEvent(conn, 0, 0).pack())[0]

    e.hv.test_device_command(cmd(9, 6, 1, 3))
    assert signal() == S.HV_STATUS_SUCCESS
    assert e.part.ram[SIEFP_PAGE + 3 * 256 + 1] == 0b10  # flag 9
    assert signal() == S.HV_STATUS_SUCCESS
    assert e.part.interrupts == [(1, 0, SINT_VECTOR + 3)]  # the flag was already set
    assert not e.hv.test_device_command(cmd(9, 5, 1, 3))  # not a message connection
    e.hv.test_device_command(cmd(9, 7, 1, 3))
    assert signal() == S.HV_STATUS_INVALID_CONNECTION_ID


@pytest.mark.kvm
@pytest.mark.parametrize("vsm", ["--vsm", "--no-vsm"])
def test_hyperv_testdev_guest(kvm, guest, vsmtrace, tmp_path, vsm: str) -> None:  # type: ignore[no-untyped-def]
    """SINT routes, message and event connections on 2 VPs; the recorded run replays bit for bit."""
    trace = tmp_path / "hv_testdev.arrow"
    r = vsmtrace(["run", "--smp", "2", vsm, "--timeout", "60", "--record", str(trace), str(guest("hv_testdev"))],
                 timeout=120)  # fmt: skip
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, fails
    assert r.status == 1, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("route_interrupt", "masked_sint_no_interrupt", "auto_eoi_not_in_service", "route_no_message",
                 "destroyed_route_no_interrupt", "post_message_type", "busy_second_post_success",
                 "busy_slot_message_pending", "busy_third_post_refused", "pending_delivered_after_eom",
                 "signal_sets_flag_conn_id", "signal_again_no_interrupt", "signal_cleared_interrupts",
                 "signal_after_destroy"):  # fmt: skip
        assert re.search(rf"^ok {name}$", r.stdout, re.M), name
    rep = vsmtrace(["replay", str(trace)], timeout=120)
    assert rep.status == 0, rep.stdout + rep.stderr
    entries = int(re.search(r"(\d+) emulation entries", rep.stdout).group(1))  # type: ignore[union-attr]
    assert entries > 20
