"""16550 UART at COM1 (0x3F8): transmit to a stream, receive from a queue.

The line status register always reports "transmitter empty", so a guest never
waits; received bytes (from an interactive stdin) set "data ready".

Interrupts (ISA IRQ 4, driven through ``irq``): "received data available" while
IER bit 0 is set and a byte waits, and "transmitter holding register empty" while
IER bit 1 is set, raised when the guest writes THR (sent at once) or enables the
interrupt with THR empty, and cleared by reading IIR when it reports it or writing
THR, as on a 16550. The line follows the highest-priority condition; OUT2 does not
gate it (QEMU does the same). IIR bits 7:6 report the FIFOs enabled by FCR bit 0,
and loopback mode (MCR bit 4) maps MCR to the modem status bits and THR to RBR.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import BinaryIO

log = logging.getLogger("vsmtrace.serial")

COM1_BASE = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8

# Register offsets (DLAB=0 unless noted)
RBR_THR = 0  # receive buffer / transmit holding; DLL with DLAB=1
IER = 1  # interrupt enable; DLM with DLAB=1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
LSR_DATA_READY = 0x01
LSR_THR_EMPTY = 0x20
LSR_TX_IDLE = 0x40
IIR_NO_INTERRUPT = 0x01
IIR_THR_EMPTY = 0x02
IIR_RX_AVAILABLE = 0x04
IIR_FIFO_ENABLED = 0xC0
IER_RX_AVAILABLE = 0x01
IER_THR_EMPTY = 0x02
IER_MASK = 0x0F
FCR_FIFO_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
MCR_LOOPBACK = 0x10
MSR_IDLE = 0xB0  # CTS, DSR, DCD asserted
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2 = 0x01, 0x02, 0x04, 0x08


class Uart16550:
    """Enough of a 16550 for console output and polled input."""

    def __init__(
        self,
        out: BinaryIO,
        on_output: Callable[[bytes], None] | None = None,
        irq: Callable[[bool], None] | None = None,
    ) -> None:
        self.out: BinaryIO | None = out
        self.on_output = on_output
        self.irq = irq  # drives the interrupt line (the machine wires it to the I/O APIC)
        self.lock = threading.Lock()
        self.rx: collections.deque[int] = collections.deque()
        self.irq_level = False
        self.thr_interrupt = False  # "THR empty" interrupt pending (until IIR read or THR written)
        self.fcr = 0
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.dll = 1
        self.dlm = 0

    def feed(self, data: bytes) -> None:
        """Queue bytes typed by the user."""
        with self.lock:
            self.rx.extend(data)
        self._update_irq()

    def _iir(self) -> int:
        """The pending interrupt of highest priority (lock held)."""
        fifo = IIR_FIFO_ENABLED if self.fcr & FCR_FIFO_ENABLE else 0
        if self.ier & IER_RX_AVAILABLE and self.rx:
            return IIR_RX_AVAILABLE | fifo
        if self.ier & IER_THR_EMPTY and self.thr_interrupt:
            return IIR_THR_EMPTY | fifo
        return IIR_NO_INTERRUPT | fifo

    def _update_irq(self) -> None:
        """Move the interrupt line if the pending conditions changed (only on changes: an edge pin)."""
        if not self.ier and not self.irq_level:
            return  # the common case (a polled console): nothing can be pending
        with self.lock:
            level = not self._iir() & IIR_NO_INTERRUPT
            changed = level != self.irq_level
            self.irq_level = level
        if changed and self.irq is not None:
            self.irq(level)

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOPBACK:
            return MSR_IDLE
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))  # fmt: skip

    def pio_read(self, port: int, size: int) -> int:
        value = self._read(port - COM1_BASE)
        self._update_irq()
        return value

    def _read(self, reg: int) -> int:
        with self.lock:
            if reg == RBR_THR:
                if self.lcr & LCR_DLAB:
                    return self.dll
                return self.rx.popleft() if self.rx else 0
            if reg == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if reg == IIR_FCR:
                iir = self._iir()
                if iir & ~IIR_FIFO_ENABLED == IIR_THR_EMPTY:
                    self.thr_interrupt = False  # reading IIR acknowledges "THR empty"
                return iir
            if reg == LCR:
                return self.lcr
            if reg == MCR:
                return self.mcr
            if reg == LSR:
                return LSR_THR_EMPTY | LSR_TX_IDLE | (LSR_DATA_READY if self.rx else 0)
            if reg == MSR:
                return self._modem_status()
            return self.scr

    def pio_write(self, port: int, size: int, value: int) -> None:
        reg = port - COM1_BASE
        value &= 0xFF
        if reg == RBR_THR and not self.lcr & LCR_DLAB:
            self._transmit(value)
            with self.lock:
                self.thr_interrupt = True  # sent at once: THR is empty again
            self._update_irq()
            return
        with self.lock:
            if reg == RBR_THR:
                self.dll = value
            elif reg == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    if value & IER_THR_EMPTY and not self.ier & IER_THR_EMPTY:
                        self.thr_interrupt = True  # enabling it with THR empty interrupts at once
                    self.ier = value & IER_MASK
            elif reg == IIR_FCR:
                self.fcr = value
                if value & FCR_CLEAR_RX:
                    self.rx.clear()
            elif reg == LCR:
                self.lcr = value
            elif reg == MCR:
                self.mcr = value
            elif reg == SCR:
                self.scr = value
        self._update_irq()

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOPBACK:
            with self.lock:
                self.rx.append(value)  # loopback: what is sent comes back, nothing leaves the UART
            return
        byte = bytes((value,))
        if self.out is not None:
            try:
                self.out.write(byte)
                self.out.flush()
            except OSError as exc:  # e.g. `vsmtrace run ... | head`: the guest must not crash the VMM
                self.out = None
                log.warning("serial console output stopped (%s); the guest keeps running", exc.strerror or exc)
        if self.on_output is not None:
            self.on_output(byte)
