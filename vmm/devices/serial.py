"""16550 UART at COM1 (0x3F8): transmit to a stream, receive from a queue.

The line status register always reports "transmitter empty", so a guest never
waits; received bytes (from an interactive stdin) set "data ready".
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
MCR_LOOPBACK = 0x10


class Uart16550:
    """Enough of a 16550 for console output and polled input."""

    def __init__(self, out: BinaryIO, on_output: Callable[[bytes], None] | None = None) -> None:
        self.out: BinaryIO | None = out
        self.on_output = on_output
        self.lock = threading.Lock()
        self.rx: collections.deque[int] = collections.deque()
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

    def pio_read(self, port: int, size: int) -> int:
        reg = port - COM1_BASE
        with self.lock:
            if reg == RBR_THR:
                if self.lcr & LCR_DLAB:
                    return self.dll
                return self.rx.popleft() if self.rx else 0
            if reg == IER:
                return self.dlm if self.lcr & LCR_DLAB else self.ier
            if reg == IIR_FCR:
                return IIR_NO_INTERRUPT
            if reg == LCR:
                return self.lcr
            if reg == MCR:
                return self.mcr
            if reg == LSR:
                return LSR_THR_EMPTY | LSR_TX_IDLE | (LSR_DATA_READY if self.rx else 0)
            if reg == MSR:
                return 0xB0  # CTS, DSR, DCD asserted
            return self.scr

    def pio_write(self, port: int, size: int, value: int) -> None:
        reg = port - COM1_BASE
        value &= 0xFF
        if reg == RBR_THR and not self.lcr & LCR_DLAB:
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
            return
        with self.lock:
            if reg == RBR_THR:
                self.dll = value
            elif reg == IER:
                if self.lcr & LCR_DLAB:
                    self.dlm = value
                else:
                    self.ier = value
            elif reg == LCR:
                self.lcr = value
            elif reg == MCR:
                self.mcr = value
            elif reg == SCR:
                self.scr = value
