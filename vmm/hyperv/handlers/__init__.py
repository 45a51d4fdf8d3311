"""Hypercall handlers of the Hyper-V layer (VSM adds its own through the same table).

Each module holds one group; :func:`register_default_handlers` puts them all in the
dispatcher. A handler is ``handler(hv, input) -> HypercallResult``; it is bound to the
partition's :class:`~vmm.hyperv.facade.HyperV` at registration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.handlers import ipi, messages, misc, tlb

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV


def register_default_handlers(hv: HyperV) -> None:
    for module in (misc, tlb, ipi, messages):
        for spec in module.specs(hv):
            hv.dispatcher.register(spec)
