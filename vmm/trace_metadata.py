"""What a trace records about the machine that produced it (VM configuration, KVM capabilities).

The replayer rebuilds the emulation from exactly this, so everything that
shapes an emulation decision (VP and VTL counts, the Hyper-V policy, clock
rates) must be here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
    from vsmtrace.vmm.machine import Machine


def machine_metadata(machine: Machine) -> dict[str, Any]:
    cfg = machine.config
    policy = cfg.hyperv
    return {
        "guest_image": str(cfg.kernel),
        "vm_config": {
            "vps": cfg.smp,
            "memory_mib": cfg.memory_mib,
            "ram_bytes": machine.memory.size,
            "cmdline": cfg.cmdline,
            "initrds": [str(p) for p in cfg.initrds],
            "vtls": cfg.vtls,
            "deterministic": cfg.deterministic,
            "clock_quantum_ns": machine.deterministic.quantum_ns if machine.deterministic is not None else None,
            "hyperv_policy": dataclasses.asdict(policy) if policy is not None else None,
            "apic_timer_hz": machine.apic_timer_hz,
            "tsc_hz": machine.tsc_hz,
            "cpuid_policy": dataclasses.asdict(machine.cpuid_policy),
        },
        "kvm_capabilities": machine.capabilities,
        # CPUID bits the policy hides but ring-0 guest code still reads as set on this host
        "cpuid_hiding_ineffective": list(machine.cpuid_hiding_ineffective),
    }


def recorded_policy(vm_config: dict[str, Any]) -> HypervPolicy | None:
    """The Hyper-V policy a trace was recorded with (None: no Hyper-V).

    Fields this vsmtrace does not know (a trace from a newer one) are left out, so
    the policy is rebuilt from what both versions share.
    """
    from vsmtrace.vmm.hyperv.cpuid import HypervPolicy

    fields = vm_config.get("hyperv_policy")
    if fields is None:
        return None
    known = {f.name for f in dataclasses.fields(HypervPolicy)}
    return HypervPolicy(**{k: v for k, v in fields.items() if k in known})
