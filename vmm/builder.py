"""The machine builder: a bare KVM machine plus the layers its configuration asks for.

This is the one place that decides what a machine is made of. ``Machine`` builds
KVM (one VM per VTL), guest RAM, the devices and the VPs; the layers above it are
:class:`vmm.extension.MachineExtension` objects chosen here and handed to the
machine when it is built: Hyper-V (``backends/hyperv.py``) when the configuration
enables it, and VSM (``backends/vsm.py``) on top of it for more than one VTL
(docs/architecture.md, "Layers").
"""

from __future__ import annotations

from vsmtrace.vmm.backends.hyperv import HypervBackend
from vsmtrace.vmm.backends.vsm import VsmBackend
from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.events import EventSink
from vsmtrace.vmm.extension import MachineExtension
from vsmtrace.vmm.machine import Machine


def extensions_for(config: MachineConfig) -> list[MachineExtension]:
    """The layers a machine with ``config`` gets, in the order the machine consults them."""
    if config.hyperv is None or not config.hyperv.enabled:
        return []
    vsm = VsmBackend() if config.vtls > 1 else None
    hyperv = HypervBackend(config.hyperv, vsm)  # builds the VSM logic too, over ``vsm``
    return [hyperv] if vsm is None else [hyperv, vsm]


def build_machine(config: MachineConfig, sink: EventSink | None = None, *, kvm_path: str | None = None) -> Machine:
    """A machine for ``config``: KVM, RAM, devices and VPs, with Hyper-V and VSM as configured."""
    return Machine(config, sink, kvm_path=kvm_path, extensions=extensions_for(config))
