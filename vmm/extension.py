"""What a layer above the bare machine may add to it: the one typed extension interface.

The bare machine (``vmm/machine.py``, ``vmm/virtual_processor.py``) knows KVM, RAM,
the local APICs and the legacy devices. Hyper-V, VSM and anything later plug in as
:class:`MachineExtension` objects handed to the machine when it is built
(``vmm/builder.py``); nothing assigns hooks into a machine from outside
(docs/architecture.md, "Layers").

Every method has a default that does nothing. The machine resolves, once, which
extensions override which exit-path hook and calls only those, so a machine
without extensions pays nothing on its hot paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vsmtrace.vmm.machine import Machine
    from vsmtrace.vmm.virtual_processor import VirtualProcessor

#: (leaf, subleaf, flags, eax, ebx, ecx, edx) of one CPUID entry.
CpuidEntry = tuple[int, int, int, int, int, int, int]
#: A port the extension serves itself (never recorded as PIO): (vp, port, size, is_out).
TrapHandler = Callable[["VirtualProcessor", int, int, bool], None]


class MsrHandler(Protocol):
    """Serves a range of MSRs; ``records_events`` (optional, default False) if it emits its own MSR events."""

    def msr_read(self, vp: VirtualProcessor, index: int) -> int: ...

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None: ...


class MachineExtension:
    """Base class of machine extensions: override what the layer needs."""

    # -- what the extension contributes, asked once while the machine is built ----------------------
    def attach(self, machine: Machine) -> None:
        """Called first, before any vCPU exists (keep the machine; read its configuration)."""

    def cpuid_entries(self) -> list[CpuidEntry]:
        """CPUID entries added to every vCPU's table (e.g. the hypervisor leaves 0x40000000+)."""
        return []

    def hypervisor_present(self) -> bool:
        """Whether CPUID.1:ECX.hypervisor is set."""
        return False

    def msr_ranges(self) -> list[tuple[int, int, Any]]:
        """(first, last, handler) MSR ranges the extension serves (an :class:`MsrHandler`)."""
        return []

    def trap_ports(self) -> dict[int, TrapHandler]:
        """I/O ports the extension serves itself."""
        return {}

    def pio_devices(self) -> list[tuple[int, int, Any]]:
        """(first port, count, device) port-I/O devices the extension adds to the bus (recorded as PIO)."""
        return []

    def fast_msr_values(self, vp_index: int, vtl: int) -> dict[int, int | None]:
        """MSRs whose read changes no state, with their fixed value (None: the reference counter).

        The machine answers these in C inside KVM_RUN when nothing records
        (``Machine.attach_fastpath``), so the guest never waits for Python's GIL.
        """
        return {}

    def fast_io_server(self, vp_index: int, vtl: int) -> tuple[int, int] | None:
        """A C server for this vCPU's port-I/O exits: addresses of a ``vsm_io_server`` function and its context, or None.

        Offered every port-I/O exit inside KVM_RUN (``Machine.attach_fastpath``); it answers the
        exits whose whole effect it knows and leaves every other one, untouched, to the extension's
        Python handlers. One server per vCPU (the first extension's). Asked while the machine
        records too (``machine.sink.enabled``): a server must then answer only what it records
        itself (a native record, docs/architecture.md "Exit paths in C"), or return None.
        """
        return None

    # -- lifetime ------------------------------------------------------------------------------------
    def vps_created(self) -> None:
        """The VPs, the guest clock and the timers exist (boot, before the guest runs)."""

    def stopped(self) -> None:
        """The run ended and every VP thread is gone."""

    # -- the exit path (resolved once: only overriding extensions are called) -----------------------
    def on_mmio(self, vp: VirtualProcessor, gpa: int, length: int, is_write: bool) -> bool:
        """An MMIO exit; True if the extension completed it."""
        return False

    def on_internal_error(self, vp: VirtualProcessor) -> bool:
        """KVM_EXIT_INTERNAL_ERROR; True if the extension handled it (e.g. an execute intercept)."""
        return False

    def pre_entry(self, vp: VirtualProcessor) -> None:
        """Before the VP's interrupts are delivered and it enters the guest (may switch its VTL)."""

    def can_wake(self, vp: VirtualProcessor) -> bool:
        """Whether something the extension knows of wakes this halted VP."""
        return False

    def wakes_from_outside(self) -> bool:
        """Whether a VP halted with interrupts off could still be woken by the extension (not a dead guest)."""
        return False

    def interrupt_acknowledged(self, vp: VirtualProcessor, vector: int) -> None:
        """A vector was injected from the running VTL's local APIC."""

    def apic_eoi(self, vp_index: int, vtl: int, vector: int) -> None:
        """The guest wrote EOI to a local APIC."""

    def reference_time(self) -> int | None:
        """Partition reference time in 100 ns units, if the extension keeps it (Hyper-V)."""
        return None


def overriding(extensions: list[MachineExtension], name: str) -> list[Callable[..., Any]]:
    """The bound ``name`` methods of the extensions that override the default."""
    default = getattr(MachineExtension, name)
    return [getattr(ext, name) for ext in extensions if getattr(type(ext), name) is not default]
