"""I/O APIC (82093AA register model, version 0x20 with an EOI register) at 0xFEC00000.

24 input pins, each with a 64-bit redirection entry, turned into interrupt messages
for the local APICs of VTL0 (through :class:`~vmm.devices.apic.ApicRouter`). Devices
drive pins with :meth:`IoApic.set_irq`; ISA IRQ n is pin n except IRQ 0, which is
pin 2 (the PC convention QEMU follows and ACPI's interrupt source override states).

Behaviour, chosen where the datasheet leaves room to match QEMU and KVM (the peers
test kernels were written against):

* Registers: IOREGSEL at offset 0x00, IOWIN at 0x10, EOI at 0x40 (the window decodes
  ``offset & 0xFF``, as QEMU's). IOWIN and EOI take 32-bit accesses only; others
  read 0 and are ignored. ID (bits 27:24 writable), VER = 0x00170020, ARB reads the
  ID. Redirection entry n is registers 0x10 + 2n (low) and 0x11 + 2n (high).
* Delivery status (bit 12) reads 0: a message is delivered as soon as it is sent.
  Remote IRR (bit 14) and delivery status are read-only.
* Edge pins: a rising edge of an unmasked pin sends one message; asserting a pin
  that is already asserted is not an edge (QEMU's model sends again, but the copy
  lands on a vector still pending in the local APIC and coalesces); an edge while
  masked is lost (82093AA, QEMU).
* Level pins: while the line is asserted, unmasked and remote IRR clear, a message
  is sent and remote IRR set. An EOI for the entry's vector (the local APIC's EOI
  broadcast of a level-triggered vector, or a write to the EOI register) clears
  remote IRR, and an entry whose line is still asserted is delivered again.
  Unmasking an asserted level pin delivers it. Rewriting an entry as edge clears
  its remote IRR (Linux relies on this on I/O APICs without an EOI register).
* Polarity (bit 13) is stored but not applied: devices drive the logical level
  (asserted = 1), as QEMU's board wiring does.
* Delivery modes fixed, lowest priority, NMI and INIT are delivered; SMI and
  ExtINT (no 8259 behind it) are dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from vsmtrace.vmm.devices.apic import ApicRouter, DeliveryMode

IOAPIC_BASE = 0xFEC00000
IOAPIC_MMIO_SIZE = 0x1000
IOAPIC_PINS = 24
IOAPIC_VERSION = 0x20
IOAPIC_WINDOW_MASK = 0xFF

IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10
ID_SHIFT = 24
ID_MASK = 0xF
VERSION_MAX_ENTRY_SHIFT = 16

RTE_VECTOR_MASK = 0xFF
RTE_DELIVERY_MODE_SHIFT = 8
RTE_DELIVERY_MODE_MASK = 0x7
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_TRIGGER_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_DEST_SHIFT = 56
RTE_DEST_MASK = 0xFF
RTE_READ_ONLY = RTE_DELIVERY_STATUS | RTE_REMOTE_IRR
RTE_RESET = RTE_MASKED
REG32 = 0xFFFFFFFF

ISA_IRQ0_PIN = 2  # the PIT's IRQ 0 is wired to pin 2; every other ISA IRQ n to pin n


def isa_irq_pin(irq: int) -> int:
    """The I/O APIC pin an ISA IRQ drives."""
    return ISA_IRQ0_PIN if irq == 0 else irq


@dataclass(frozen=True)
class Message:
    """One interrupt message, sent to the local APICs once the I/O APIC lock is released."""

    destination: int
    logical: bool
    mode: DeliveryMode
    vector: int
    level_triggered: bool


@dataclass
class IoApicState:
    """What a guest can observe; kept apart so tests and snapshots can read it."""

    id: int = 0
    select: int = 0
    entries: list[int] = field(default_factory=lambda: [RTE_RESET] * IOAPIC_PINS)
    lines: int = 0  # bit n: pin n is asserted
    irr: int = 0  # bit n: an edge latched on pin n, or a level pin asserted, not yet serviced


class IoApic:
    """The I/O APIC; every public method is thread-safe (devices call from any thread)."""

    def __init__(self, router: ApicRouter, apic_id: int = 0) -> None:
        self.router = router
        self.reset_id = apic_id & ID_MASK
        self.lock = threading.Lock()
        self.state = IoApicState(id=self.reset_id)
        self.delivered = 0  # messages sent (for tests and `info`)

    def reset(self) -> None:
        with self.lock:
            lines = self.state.lines
            self.state = IoApicState(id=self.reset_id, lines=lines)

    # -- pins ------------------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        """Drive input ``pin`` to ``level`` (True = asserted)."""
        if not 0 <= pin < IOAPIC_PINS:
            return
        bit = 1 << pin
        with self.lock:
            st = self.state
            entry = st.entries[pin]
            rising = level and not st.lines & bit
            if level:
                st.lines |= bit
            else:
                st.lines &= ~bit
            if entry & RTE_TRIGGER_LEVEL:
                if level:
                    st.irr |= bit
                else:
                    st.irr &= ~bit
            elif rising and not entry & RTE_MASKED:
                st.irr |= bit
            messages = self._service()
        self._send(messages)

    def set_isa_irq(self, irq: int, level: bool) -> None:
        self.set_irq(isa_irq_pin(irq), level)

    # -- EOI -------------------------------------------------------------------------------
    def eoi(self, vector: int) -> None:
        """EOI of ``vector``: clear remote IRR of the level entries using it, redeliver what is still asserted."""
        with self.lock:
            for pin, entry in enumerate(self.state.entries):
                if entry & RTE_TRIGGER_LEVEL and entry & RTE_REMOTE_IRR and entry & RTE_VECTOR_MASK == vector:
                    self.state.entries[pin] = entry & ~RTE_REMOTE_IRR
            messages = self._service()
        self._send(messages)

    # -- MMIO ------------------------------------------------------------------------------
    def mmio_read(self, offset: int, size: int) -> int:
        reg = offset & IOAPIC_WINDOW_MASK
        with self.lock:
            if reg == IOREGSEL:
                return self.state.select
            if reg == IOWIN and size == 4:
                return self._read_register(self.state.select)
        return 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        reg = offset & IOAPIC_WINDOW_MASK
        messages: list[Message] = []
        if reg == IOREGSEL:
            with self.lock:
                self.state.select = value & 0xFF
            return
        if size != 4:
            return
        if reg == IOWIN:
            with self.lock:
                self._write_register(self.state.select, value & REG32)
                messages = self._service()
            self._send(messages)
        elif reg == IOEOI:
            self.eoi(value & RTE_VECTOR_MASK)

    def _read_register(self, index: int) -> int:
        st = self.state
        if index in (REG_ID, REG_ARB):
            return st.id << ID_SHIFT
        if index == REG_VERSION:
            return IOAPIC_VERSION | ((IOAPIC_PINS - 1) << VERSION_MAX_ENTRY_SHIFT)
        pin = (index - REG_REDTBL) >> 1
        if 0 <= pin < IOAPIC_PINS and index >= REG_REDTBL:
            entry = st.entries[pin]
            return (entry >> 32) & REG32 if index & 1 else entry & REG32
        return 0

    def _write_register(self, index: int, value: int) -> None:
        st = self.state
        if index == REG_ID:
            st.id = (value >> ID_SHIFT) & ID_MASK
            return
        pin = (index - REG_REDTBL) >> 1
        if index < REG_REDTBL or not 0 <= pin < IOAPIC_PINS:
            return  # VER, ARB and undefined registers are read-only
        old = st.entries[pin]
        entry = (old & REG32) | (value << 32) if index & 1 else (old & ~REG32) | value
        entry = (entry & ~RTE_READ_ONLY) | (old & RTE_READ_ONLY)
        if not entry & RTE_TRIGGER_LEVEL:
            entry &= ~RTE_REMOTE_IRR
        st.entries[pin] = entry
        bit = 1 << pin
        if entry & RTE_TRIGGER_LEVEL:
            st.irr = (st.irr & ~bit) | (st.lines & bit)  # a level pin's request is its line
        elif not old & RTE_TRIGGER_LEVEL:
            pass  # edge stays edge: a latched edge stays latched
        else:
            st.irr &= ~bit  # level -> edge: no edge has been seen yet

    # -- delivery --------------------------------------------------------------------------
    def _service(self) -> list[Message]:
        """Turn pending requests into messages (called with the lock held)."""
        st = self.state
        messages: list[Message] = []
        pending = st.irr
        while pending:
            bit = pending & -pending
            pending &= ~bit
            pin = bit.bit_length() - 1
            entry = st.entries[pin]
            if entry & RTE_MASKED:
                continue
            level = bool(entry & RTE_TRIGGER_LEVEL)
            if level:
                if entry & RTE_REMOTE_IRR:
                    continue
                st.entries[pin] = entry | RTE_REMOTE_IRR
            else:
                st.irr &= ~bit
            messages.append(
                Message(
                    destination=(entry >> RTE_DEST_SHIFT) & RTE_DEST_MASK,
                    logical=bool(entry & RTE_DEST_LOGICAL),
                    mode=DeliveryMode((entry >> RTE_DELIVERY_MODE_SHIFT) & RTE_DELIVERY_MODE_MASK),
                    vector=entry & RTE_VECTOR_MASK,
                    level_triggered=level,
                )
            )
        return messages

    def _send(self, messages: list[Message]) -> None:
        for m in messages:
            self.delivered += 1
            self.router.deliver_message(
                m.destination, logical=m.logical, mode=m.mode, vector=m.vector, level_triggered=m.level_triggered
            )
