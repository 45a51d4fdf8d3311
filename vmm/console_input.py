"""What the user types on the terminal, fed to the guest's serial port (``run --serial-input``)."""

from __future__ import annotations

import os
import threading

from vsmtrace.vmm.devices.serial import Uart16550

STDIN_FD = 0
SERIAL_INPUT_CHUNK = 4096


class StdinFeeder:
    """Feeds stdin to the current machine's UART until EOF.

    One reader thread for the whole process: after a reboot the new machine's UART takes
    over, and no keystroke is lost in a reader still blocked for the old machine.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: Uart16550 | None = None
        self.thread: threading.Thread | None = None

    def attach(self, serial: Uart16550) -> None:
        with self.lock:
            self.target = serial
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="serial-input", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(STDIN_FD, SERIAL_INPUT_CHUNK)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                target = self.target
            if target is not None:
                target.feed(data)


STDIN_FEEDER = StdinFeeder()
