"""Build, boot and run one machine, recording it if asked: what ``vsmtrace run`` and the demo share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsmtrace.vmm.config import MachineConfig


class SetupError(Exception):
    """The machine could not be set up from this input (a one-line message for the user)."""


def run_machine(config: MachineConfig, record_path: Path | None) -> tuple[int, str]:
    """Build, boot and run a machine (recording if asked); one-line errors for bad input."""
    from vsmtrace.recorder.errors import TraceError
    from vsmtrace.recorder.writer import TraceWriter
    from vsmtrace.vmm.builder import build_machine
    from vsmtrace.vmm.kvm.system import KvmError, KvmUnavailable
    from vsmtrace.vmm.loader.elf import LoaderError
    from vsmtrace.vmm.trace_metadata import machine_metadata

    writer = None
    try:
        machine = build_machine(config)
        if record_path is not None:
            writer = TraceWriter(record_path, machine_metadata(machine))
            machine.sink = writer
        machine.boot()
    except (KvmUnavailable, LoaderError, ValueError, TraceError) as exc:
        if writer is not None:
            writer.close()
        raise SetupError(str(exc)) from None
    except KvmError as exc:
        raise SetupError(f"KVM refused to set up the guest: {exc}") from None
    status = machine.run()
    message = machine.stop_message
    if writer is not None:
        writer.close()
        if writer.error is not None:
            message = f"{message}; recording stopped early: {writer.error}" if message else f"recording stopped early: {writer.error}"
            status = status or 1
    return status, message
