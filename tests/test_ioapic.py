"""The I/O APIC: unit tests over real local APICs (no KVM), and the ioapic guest on 2 VPs."""

from __future__ import annotations

import re

import pytest
from vsmtrace.vmm.devices.apic import Reg
from vsmtrace.vmm.devices.ioapic import (
    IOEOI,
    IOREGSEL,
    IOWIN,
    RTE_DEST_LOGICAL,
    RTE_MASKED,
    RTE_REMOTE_IRR,
    RTE_TRIGGER_LEVEL,
    IoApic,
    isa_irq_pin,
)

from tests.test_apic_unit import make_rig

LEVEL = RTE_TRIGGER_LEVEL


def write_reg(io: IoApic, index: int, value: int) -> None:
    io.mmio_write(IOREGSEL, 4, index)
    io.mmio_write(IOWIN, 4, value)


def read_reg(io: IoApic, index: int) -> int:
    io.mmio_write(IOREGSEL, 4, index)
    return io.mmio_read(IOWIN, 4)


def program(io: IoApic, pin: int, low: int, dest: int = 0) -> None:
    write_reg(io, 0x11 + 2 * pin, dest << 24)
    write_reg(io, 0x10 + 2 * pin, low)


def rig_with_ioapic(count: int = 2):  # type: ignore[no-untyped-def]
    rig = make_rig(count)
    io = IoApic(rig.router)
    for apic in rig.apics:
        apic.on_eoi_broadcast = io.eoi
    return rig, io


def serve(apic) -> int:  # type: ignore[no-untyped-def]
    """The CPU takes the pending interrupt: returns its vector."""
    vector = apic.pending_vector()
    assert vector is not None
    assert apic.acknowledge() == vector
    return vector


def test_registers() -> None:
    _, io = rig_with_ioapic()
    assert read_reg(io, 1) == 0x00170020
    assert read_reg(io, 0x10) == RTE_MASKED
    write_reg(io, 0, 0xF << 24)
    assert read_reg(io, 0) == 0xF << 24
    write_reg(io, 1, 0)  # VER is read-only
    assert read_reg(io, 1) == 0x00170020
    write_reg(io, 0x10, RTE_REMOTE_IRR | (1 << 12) | 0x40)
    assert read_reg(io, 0x10) == 0x40  # remote IRR and delivery status are read-only
    assert read_reg(io, 0x40) == 0  # past the table
    io.mmio_write(IOREGSEL, 4, 0x12)
    assert io.mmio_read(IOREGSEL, 4) == 0x12
    assert io.mmio_read(0x110, 4) == read_reg(io, 0x12)  # the window repeats every 256 bytes
    assert io.mmio_read(IOWIN, 2) == 0  # IOWIN takes 32-bit accesses only


def test_edge_rising_only_and_masked_edges_lost() -> None:
    rig, io = rig_with_ioapic()
    program(io, 14, 0x60, dest=1)
    io.set_irq(14, True)
    io.set_irq(14, True)  # no new edge
    assert serve(rig.apics[1]) == 0x60
    assert rig.apics[1].pending_vector() is None and rig.apics[0].pending_vector() is None
    rig.apics[1].eoi()
    io.set_irq(14, False)
    program(io, 14, RTE_MASKED | 0x60, dest=1)
    io.set_irq(14, True)
    io.set_irq(14, False)
    program(io, 14, 0x60, dest=1)
    assert rig.apics[1].pending_vector() is None  # the masked edge was lost
    assert io.delivered == 1


def test_level_remote_irr_and_eoi_broadcast() -> None:
    rig, io = rig_with_ioapic()
    program(io, 15, LEVEL | 0x61)
    io.set_irq(15, True)
    assert read_reg(io, 0x10 + 30) & RTE_REMOTE_IRR
    apic = rig.apics[0]
    assert serve(apic) == 0x61
    assert apic.snapshot().tmr & (1 << 0x61)  # delivered as level: the local EOI is broadcast
    apic.eoi()  # line still asserted: delivered again
    assert read_reg(io, 0x10 + 30) & RTE_REMOTE_IRR
    assert serve(apic) == 0x61
    io.set_irq(15, False)
    apic.eoi()
    assert not read_reg(io, 0x10 + 30) & RTE_REMOTE_IRR
    assert apic.pending_vector() is None
    assert io.delivered == 2


def test_edge_vector_eoi_does_not_clear_level_entry() -> None:
    """Only a level-triggered vector's EOI reaches the I/O APIC."""
    rig, io = rig_with_ioapic()
    program(io, 15, LEVEL | 0x61)
    io.set_irq(15, True)
    apic = rig.apics[0]
    serve(apic)
    apic.accept_interrupt(0x70)  # an edge interrupt of higher priority
    serve(apic)
    apic.eoi()  # EOI of 0x70: TMR clear, no broadcast
    assert read_reg(io, 0x10 + 30) & RTE_REMOTE_IRR


def test_eoi_register_and_unmask_of_asserted_level() -> None:
    rig, io = rig_with_ioapic()
    program(io, 10, RTE_MASKED | LEVEL | 0x63)
    io.set_irq(10, True)
    assert rig.apics[0].pending_vector() is None
    program(io, 10, LEVEL | 0x63)  # unmasking an asserted level pin delivers it
    assert rig.apics[0].pending_vector() == 0x63
    io.set_irq(10, False)
    assert read_reg(io, 0x10 + 20) & RTE_REMOTE_IRR
    io.mmio_write(IOEOI, 4, 0x62)  # another vector: no effect
    assert read_reg(io, 0x10 + 20) & RTE_REMOTE_IRR
    io.mmio_write(IOEOI, 4, 0x63)
    assert not read_reg(io, 0x10 + 20) & RTE_REMOTE_IRR


def test_switch_to_edge_clears_remote_irr() -> None:
    rig, io = rig_with_ioapic()
    program(io, 3, LEVEL | 0x50)
    io.set_irq(3, True)
    program(io, 3, RTE_MASKED | 0x50)
    assert not read_reg(io, 0x10 + 6) & RTE_REMOTE_IRR


def test_logical_and_broadcast_destinations() -> None:
    rig, io = rig_with_ioapic(3)
    for i, apic in enumerate(rig.apics):
        apic.mmio_write(Reg.LDR, 4, (1 << i) << 24)
    program(io, 5, RTE_DEST_LOGICAL | 0x55, dest=0b110)
    io.set_irq(5, True)
    assert [a.pending_vector() for a in rig.apics] == [None, 0x55, 0x55]
    program(io, 6, 0x56, dest=0xFF)
    io.set_irq(6, True)
    assert all(a.snapshot().irr & (1 << 0x56) for a in rig.apics)


def test_isa_irq0_is_pin2() -> None:
    assert isa_irq_pin(0) == 2
    assert [isa_irq_pin(i) for i in range(1, 16)] == list(range(1, 16))


def test_out_of_range_pins_ignored() -> None:
    _, io = rig_with_ioapic()
    io.set_irq(24, True)
    io.set_irq(-1, True)
    assert io.delivered == 0


@pytest.mark.kvm
def test_ioapic_guest(kvm, guest, vsmtrace, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Edge/level/remote IRR/EOI register/masking and the UART's IRQ 4 on 2 VPs, recorded and replayed."""
    trace = tmp_path / "ioapic.arrow"
    r = vsmtrace(["run", "--smp", "2", "--timeout", "60", "--record", str(trace), str(guest("ioapic"))], timeout=120)
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert not fails, fails
    assert r.status == 1, r.stdout[-2000:] + r.stderr[-2000:]
    for name in ("edge_delivered_to_cpu1", "level_redelivered_once_while_asserted", "eoireg_clears_remote_irr",
                 "level_fires_on_unmask", "masked_edge_lost", "uart_thr_empty_interrupt"):  # fmt: skip
        assert re.search(rf"^ok {name}$", r.stdout, re.M), name
    rep = vsmtrace(["replay", str(trace)], timeout=120)
    assert rep.status == 0, rep.stdout + rep.stderr
