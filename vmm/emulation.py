"""The one factory of the emulation: HyperV (and Vsm) over whatever reaches the machine.

The live machine (``vmm/backends``), VMM replay (``replayer/engine``) and guest
re-execution (which runs the live machine) must build the emulation identically,
or a replay would check a different emulation than the one recorded. They differ
only in the ports the emulation calls out through: KVM-backed services (recorded
or not) or the trace (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vsmtrace.vmm.events import EventSink
from vsmtrace.vmm.hyperv import HyperV
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.vp import PartitionAccess
from vsmtrace.vmm.vsm import Vsm


@dataclass(frozen=True)
class EmulationPorts:
    """Everything the emulation reaches the machine through (``vmm.vp`` and the service interfaces)."""

    partition: PartitionAccess
    timers: Any  # arm(deadline_ns, callback) / cancel(handle), in reference time
    apic: Any  # vmm.hyperv.msrs.ApicAccess
    tlb: Any  # vmm.hyperv.facade.TlbFlusher
    tsc_page: Callable[[], Any]  # the reference TSC page parameters (vmm.hyperv.reference_time.TscPageParams)
    sink: EventSink
    vsm: Any = None  # vmm.vsm.services.VsmServices: needed when the partition has more than one VTL


@dataclass(frozen=True)
class Emulation:
    hv: HyperV
    vsm: Vsm | None


def build_emulation(
    policy: HypervPolicy,
    ports: EmulationPorts,
    *,
    vtl_count: int,
    tsc_hz: int | None,
    apic_hz: int | None,
    ram_ranges: Sequence[tuple[int, int]],
) -> Emulation:
    """HyperV for the partition, and Vsm on top of it when it has more than one VTL."""
    hv = HyperV(
        ports.partition,
        policy,
        timers=ports.timers,
        apic=ports.apic,
        tlb=ports.tlb,
        sink=ports.sink,
        tsc_page=ports.tsc_page,
        tsc_frequency_hz=tsc_hz,
        apic_frequency_hz=apic_hz,
        vtl_count=vtl_count,
    )
    vsm = None
    if vtl_count > 1 and hv.policy.enabled:
        if ports.vsm is None:
            raise ValueError(f"a partition with {vtl_count} VTLs needs VSM services")
        vsm = Vsm(hv, ports.partition, ports.vsm, vtl_count=vtl_count, sink=ports.sink, ram_ranges=list(ram_ranges))
    return Emulation(hv, vsm)
