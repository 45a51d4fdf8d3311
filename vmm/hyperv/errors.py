"""Exceptions the Hyper-V layer raises to the machine (which turns them into guest events)."""

from __future__ import annotations

from dataclasses import dataclass


class GpFault(Exception):
    """The guest's MSR access must fault: the machine injects #GP(0) and does not complete it."""

    def __init__(self, msr: int, reason: str) -> None:
        super().__init__(f"#GP on MSR {msr:#x}: {reason}")
        self.msr = msr
        self.reason = reason


@dataclass
class GuestCrashReport:
    """What the guest told us through the crash MSRs (shown to the user, then the VM stops)."""

    vp: int
    vtl: int
    parameters: tuple[int, int, int, int, int]
    control: int
    message: bytes = b""

    def describe(self) -> str:
        params = " ".join(f"P{i}={p:#x}" for i, p in enumerate(self.parameters))
        text = f"guest crash reported on VP{self.vp} VTL{self.vtl}: {params} CTL={self.control:#x}"
        if self.message:
            text += f" message={self.message.decode('utf-8', 'replace')!r}"
        return text


class GuestCrash(Exception):
    """Raised from an MSR write of CRASH_CTL with CrashNotify: the machine stops with non-zero status."""

    def __init__(self, report: GuestCrashReport) -> None:
        super().__init__(report.describe())
        self.report = report


class GuestResetRequest(Exception):
    """Raised from a write of HV_X64_MSR_RESET with the reset bit: the machine resets or stops."""

    def __init__(self, vp: int, vtl: int) -> None:
        super().__init__(f"guest requested a system reset through HV_X64_MSR_RESET on VP{vp} VTL{vtl}")
        self.vp = vp
        self.vtl = vtl
