"""VSM state of one partition, as plain dataclasses.

Everything the VSM emulation decides from lives here (and nothing else), so the replayer
can rebuild it event by event and a test can inspect it. Machine-side state (which vCPU
runs, memslot layouts) is not here: that belongs to the services implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vsmtrace.vmm.hyperv.hvdef import (
    HV_MAP_GPA_PERMISSIONS_ALL,
    VSM_PARTITION_CONFIG_PROTECTION_MASK_SHIFT,
    HvMapGpaFlags,
    VsmPartitionConfig,
    VsmVina,
    VsmVpSecureConfig,
)
from vsmtrace.vmm.vp import Access
from vsmtrace.vmm.vtl_array import VtlArray


def mask_to_access(mask: int) -> Access:
    """HV_MAP_GPA_FLAGS → allowed accesses.

    Without MBEC either execute bit grants every instruction fetch: the markdown TLFS calls
    bit 2 kernel-execute and bit 3 user-execute, the v6.0b PDF the opposite, and the seed
    uses bit 3 as "execute" (docs/vsm.md, compatibility table).
    """
    allowed = Access(0)
    if mask & HvMapGpaFlags.READABLE:
        allowed |= Access.READ
    if mask & HvMapGpaFlags.WRITABLE:
        allowed |= Access.WRITE
    if mask & (HvMapGpaFlags.KERNEL_EXECUTABLE | HvMapGpaFlags.USER_EXECUTABLE):
        allowed |= Access.EXECUTE
    return allowed


_TLB_LOCKED = int(VsmVpSecureConfig.TLB_LOCKED)  # a plain int: an IntFlag "&" is Python code

@dataclass
class ProtectionMap:
    """The authoritative protection masks of one lower VTL's view of memory.

    ``default`` applies to every page without an explicit entry; before any higher VTL
    enabled protections it is "all access".
    """

    default: int = HV_MAP_GPA_PERMISSIONS_ALL
    pages: dict[int, int] = field(default_factory=dict)

    def mask(self, page: int) -> int:
        return self.pages.get(page, self.default)


@dataclass
class VtlPartitionConfig:
    """HvRegisterVsmPartitionConfig of one VTL (> 0). EnableVtlProtection and the mask are sticky."""

    value: int = 0

    @property
    def protection_enabled(self) -> bool:
        return bool(self.value & VsmPartitionConfig.ENABLE_VTL_PROTECTION)

    @property
    def default_mask(self) -> int:
        return (self.value & VsmPartitionConfig.DEFAULT_VTL_PROTECTION_MASK) >> VSM_PARTITION_CONFIG_PROTECTION_MASK_SHIFT

    @property
    def deny_lower_vtl_startup(self) -> bool:
        return bool(self.value & VsmPartitionConfig.DENY_LOWER_VTL_STARTUP)


@dataclass
class VpVtlVsmState:
    """Per (VP, VTL) VSM registers."""

    enabled: bool = False
    vina: int = 0
    #: HvRegisterVsmVpSecureConfigVtlN owned by this VTL, keyed by the lower VTL N.
    secure_config: dict[int, int] = field(default_factory=dict)
    #: Secure register intercept registers (accepted and stored, not enforced).
    cr_intercepts: dict[int, int] = field(default_factory=dict)
    #: Last PendingEvent0 value written (the event itself is injected at once).
    pending_event0: int = 0

    @property
    def vina_enabled(self) -> bool:
        return bool(self.vina & VsmVina.ENABLED)

    @property
    def vina_auto_reset(self) -> bool:
        return bool(self.vina & VsmVina.AUTO_RESET)

    def tlb_locks(self) -> list[int]:
        """Lower VTLs whose TLB this VTL has locked on this VP."""
        return [n for n, value in self.secure_config.items() if value & _TLB_LOCKED]


@dataclass
class VsmState:
    """The whole partition: enabled VTLs, per-VTL configuration, per-VP state, protection maps."""

    vtl_count: int
    vp_count: int
    enabled_vtls: set[int] = field(default_factory=lambda: {0})
    partition_config: dict[int, VtlPartitionConfig] = field(default_factory=dict)
    vps: list[VtlArray[VpVtlVsmState]] = field(default_factory=list)
    protections: dict[int, ProtectionMap] = field(default_factory=dict)
    #: VPs whose flush hypercall is waiting for a TLB lock to be released.
    tlb_waiters: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.vps:
            self.vps = [VtlArray(self.vtl_count, lambda _vtl: VpVtlVsmState()) for _ in range(self.vp_count)]
            for per_vp in self.vps:
                per_vp[0].enabled = True
        for vtl in range(self.vtl_count):
            self.protections.setdefault(vtl, ProtectionMap())

    def vp_vtl(self, vp: int, vtl: int) -> VpVtlVsmState:
        return self.vps[vp][vtl]

    def enabled_on_vp(self, vp: int) -> list[int]:
        return [vtl for vtl, state in self.vps[vp].items() if state.enabled]

    def config(self, vtl: int) -> VtlPartitionConfig:
        return self.partition_config.setdefault(vtl, VtlPartitionConfig())

    def protections_enabled_for(self, target_vtl: int) -> bool:
        """Has any VTL above ``target_vtl`` turned on VTL protections?"""
        return any(self.config(owner).protection_enabled for owner in range(target_vtl + 1, self.vtl_count)
                   if owner in self.enabled_vtls)  # fmt: skip

    def tlb_locked(self, vp: int, target_vtl: int, requester_vtl: int) -> bool:
        """Is ``target_vtl``'s TLB on ``vp`` locked by a VTL above ``requester_vtl``?"""
        for owner in range(requester_vtl + 1, self.vtl_count):
            if self.vps[vp][owner].secure_config.get(target_vtl, 0) & VsmVpSecureConfig.TLB_LOCKED:
                return True
        return False
