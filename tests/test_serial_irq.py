"""The UART's interrupt line (IER, IIR, THR-empty and receive interrupts) and loopback; no KVM."""

from __future__ import annotations

import io

from vsmtrace.vmm.devices.serial import COM1_BASE, Uart16550

THR, IER, IIR, FCR, MCR, MSR = COM1_BASE, COM1_BASE + 1, COM1_BASE + 2, COM1_BASE + 2, COM1_BASE + 4, COM1_BASE + 6


def make() -> tuple[Uart16550, list[bool], io.BytesIO]:
    levels: list[bool] = []
    out = io.BytesIO()
    return Uart16550(out, irq=levels.append), levels, out


def test_no_interrupt_without_ier() -> None:
    uart, levels, out = make()
    uart.pio_write(THR, 1, ord("a"))
    uart.feed(b"x")
    assert levels == [] and out.getvalue() == b"a"
    assert uart.pio_read(IIR, 1) & 0x0F == 0x01


def test_thr_empty_on_enable_cleared_by_iir_read() -> None:
    uart, levels, _ = make()
    uart.pio_write(IER, 1, 0x02)
    assert levels == [True]
    assert uart.pio_read(IIR, 1) == 0x02
    assert levels == [True, False]
    assert uart.pio_read(IIR, 1) == 0x01
    uart.pio_write(THR, 1, ord("b"))  # sent at once: THR empty again
    assert levels == [True, False, True]
    uart.pio_write(IER, 1, 0)
    assert levels[-1] is False


def test_receive_interrupt_has_priority() -> None:
    uart, levels, _ = make()
    uart.pio_write(FCR, 1, 0x01)
    uart.pio_write(IER, 1, 0x03)
    uart.feed(b"k")
    assert uart.pio_read(IIR, 1) == 0xC4  # FIFOs on, receive data available
    assert uart.pio_read(THR, 1) == ord("k")
    assert uart.pio_read(IIR, 1) == 0xC2
    assert uart.pio_read(IIR, 1) == 0xC1
    assert levels == [True, False]


def test_loopback() -> None:
    uart, _, out = make()
    uart.pio_write(MCR, 1, 0x10 | 0x0A)  # loop, OUT2, RTS
    assert uart.pio_read(MSR, 1) & 0xF0 == 0x90  # CTS from RTS, DCD from OUT2
    uart.pio_write(THR, 1, 0x5A)
    assert out.getvalue() == b""
    assert uart.pio_read(THR, 1) == 0x5A
