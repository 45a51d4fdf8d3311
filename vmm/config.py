"""Machine configuration: everything ``vsmtrace run`` options decide."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

MAX_VPS = 64
DEFAULT_MEMORY_MIB = 256


@dataclass
class MachineConfig:
    kernel: Path
    smp: int = 1
    memory_mib: int = DEFAULT_MEMORY_MIB
    cmdline: str = ""
    initrds: list[Path] = field(default_factory=list)
    serial_out: BinaryIO = field(default_factory=lambda: sys.stdout.buffer)
    serial_in_interactive: bool = False
    vtls: int = 1  # KVM VMs (one per VTL); VSM raises this to 2
    hyperv: Any = None  # vmm.hyperv.cpuid.HypervPolicy, or None for no Hyper-V
    timeout_s: float | None = None
    deterministic: bool = False
    no_reboot: bool = False  # a guest reset ends the run (EXIT_RESET) instead of rebooting
    kvm_device: str = "/dev/kvm"  # the CLI's hidden --kvm-device / VSMTRACE_KVM_DEVICE, for error-path tests
    #: Answer the exits of docs/architecture.md "Exit paths in C" without Python (while recording only the
    #: VTL switches, which C records); False sends every exit to Python (bench/dispatch times that path).
    fast_paths: bool = True

    def validate(self) -> None:
        if not 1 <= self.smp <= MAX_VPS:
            raise ValueError(f"--smp must be between 1 and {MAX_VPS}, got {self.smp}")
        if self.memory_mib < 2:
            raise ValueError(f"--memory must be at least 2 MiB, got {self.memory_mib}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("--timeout must be positive")
