"""The KVM side of the emulation layers: what ``vmm/hyperv`` and ``vmm/vsm`` need from a real machine.

``vmm/hyperv`` and ``vmm/vsm`` only know the VP interface (``vmm.vp``), so they run
the same under KVM and under replay. The modules here are their KVM backends:
local APICs, TLB flushes, memslot views per VTL, vCPU switches (docs/architecture.md).
"""
