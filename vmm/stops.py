"""How a run ends: vsmtrace's exit statuses and the exceptions that carry them.

Every layer that can end a run (the run loop, the Hyper-V and VSM backends,
deterministic time, re-execution) raises these, so they live below all of them.
"""

from __future__ import annotations

# vsmtrace's own exit statuses (the guest's isa-debug-exit statuses are always odd).
EXIT_OK = 0
EXIT_GUEST_FAULT = 4  # triple fault, emulation failure, crash MSRs, all VPs halted for good
EXIT_VMM_ERROR = 6  # a bug in vsmtrace while serving the guest
EXIT_RESET = 8  # the guest asked for a reset and was not rebooted (--no-reboot, recording, --deterministic)
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class GuestStop(Exception):
    """Raised inside a VP thread to end the run with a status and a message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MsrFault(Exception):
    """An MSR access that must raise #GP in the guest."""
