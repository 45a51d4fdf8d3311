"""Virtual Secure Mode emulation (TLFS chapter 15), pure Python over the VP interface.

Entry point: :class:`Vsm`, built once per partition after the :class:`~vmm.hyperv.HyperV`
layer::

    vsm = Vsm(hv, partition, services, vtl_count=2, sink=sink, ram_ranges=[(0, size), ...])

It registers the VSM hypercalls in ``hv.dispatcher``, installs the VTL call/return hook and
the TLB-lock check of the flush hypercalls, and offers the machine what it needs around
VTL switches and secure memory intercepts (see the method docstrings).

Threading: every public method takes ``hv.lock`` (the partition lock the hypercall path
already holds), so it may be called from any VP thread. ``VsmServices`` methods are called
with that lock held; an implementation must not wait for another VP thread that could be
blocked on the same lock (e.g. ``set_protections`` may kick VPs out of KVM_RUN but must not
wait for them to finish a hypercall).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from vsmtrace.vmm.events import EventKind, EventSink
from vsmtrace.vmm.hyperv.facade import HyperV
from vsmtrace.vmm.hyperv.handlers.common import HandlerError
from vsmtrace.vmm.hyperv.hvdef import (
    HV_MAP_GPA_PERMISSIONS_ALL,
    HV_PAGE_SHIFT,
    HV_PAGE_SIZE,
    HV_VINA_STATUS_ASSERTED,
    VSM_PARTITION_CONFIG_PROTECTION_MASK_SHIFT,
    HvInputVtl,
    HvMapGpaFlags,
    HvStatus,
    HvVpAssistPageLayout,
    VsmPartitionConfig,
    VsmVina,
    VsmVpSecureConfig,
)
from vsmtrace.vmm.hyperv.hypercall import HypercallOutcome, VtlCallRequest
from vsmtrace.vmm.vp import Access, GuestMemoryError, PartitionAccess, VtlAccessDenied
from vsmtrace.vmm.vsm import hypercalls, vp_assist, vtl_call
from vsmtrace.vmm.vsm.intercept_message import build_intercept
from vsmtrace.vmm.vsm.services import EntryReason, InitialVpContext, PageProtection, VsmServices
from vsmtrace.vmm.vsm.state import ProtectionMap, VsmState, mask_to_access

__all__ = ["Vsm", "build_intercept", "mask_to_access"]

S = HvStatus
# HV_VP_VTL_CONTROL fields a VTL entry writes, as offsets in the control area (hvdef layout).
_VINA_STATUS_AT = HvVpAssistPageLayout.VTL_VINA_STATUS - HvVpAssistPageLayout.VTL_CONTROL
_RETURN_RAX_AT = HvVpAssistPageLayout.VTL_RETURN_X64_RAX - HvVpAssistPageLayout.VTL_CONTROL
_ENTRY_FIELDS = struct.Struct("<IB")  # EntryReason, VinaStatus
_RETURN_REGS = struct.Struct("<QQ")  # VtlReturnX64Rax, VtlReturnX64Rcx
assert _RETURN_RAX_AT == 8 and _VINA_STATUS_AT == 4, "HV_VP_VTL_CONTROL layout"
_STICKY_CONFIG = VsmPartitionConfig.ENABLE_VTL_PROTECTION | VsmPartitionConfig.DEFAULT_VTL_PROTECTION_MASK
_SUPPORTED_CONFIG = (
    _STICKY_CONFIG
    | VsmPartitionConfig.ZERO_MEMORY_ON_RESET
    | VsmPartitionConfig.DENY_LOWER_VTL_STARTUP
    | VsmPartitionConfig.INTERCEPT_VP_STARTUP
)


def valid_mask(mask: int) -> bool:
    """TLFS combinations: none, R, R+X, R+W, R+W+X (X = either execute bit without MBEC)."""
    if mask & ~HV_MAP_GPA_PERMISSIONS_ALL:
        return False
    needs_read = HvMapGpaFlags.WRITABLE | HvMapGpaFlags.KERNEL_EXECUTABLE | HvMapGpaFlags.USER_EXECUTABLE
    return not (mask & needs_read and not mask & HvMapGpaFlags.READABLE)


def coalesce(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted distinct pages → (first, count) runs of consecutive page numbers."""
    runs: list[tuple[int, int]] = []
    for page in sorted(set(pages)):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


class Vsm:
    """VSM of one partition: state, hypercalls, VTL call/return, protections, intercept help."""

    def __init__(
        self,
        hv: HyperV,
        partition: PartitionAccess,
        services: VsmServices,
        *,
        vtl_count: int = 2,
        sink: EventSink,
        ram_ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        if not 2 <= vtl_count <= hv.vtl_count:
            raise ValueError(f"VSM needs 2..{hv.vtl_count} VTLs (the Hyper-V layer was built with {hv.vtl_count})")
        self.hv = hv
        self.partition = partition
        self.services = services
        self.sink = sink
        self.lock = hv.lock
        self.state = VsmState(vtl_count, partition.vp_count)
        self.ram_ranges: list[tuple[int, int]] = [
            (gpa >> HV_PAGE_SHIFT, size >> HV_PAGE_SHIFT) for gpa, size in (ram_ranges or self._probe_ram())
        ]
        #: Called (with the lock held) with the VPs whose blocked flush may now be retried.
        self.on_tlb_unlock: Callable[[list[int]], None] | None = None
        #: Called (with the lock held) after a change to what a VTL call or return does: a VP's or the
        #: partition's enabled VTLs, a VINA register, a TLB lock (a machine that answers VTL switches
        #: outside this class, vmm/backends/vsm.py, re-decides which it may).
        self.on_state_change: Callable[[], None] | None = None
        for spec in hypercalls.specs(self):
            hv.dispatcher.register(spec, replace=True)
        hv.dispatcher.set_vtl_hook(self._vtl_hook)
        hv.tlb_lock_check = self._tlb_lock_check
        hv.vtl_enabled = self.partition_vtl_enabled

    # -- VTL topology --------------------------------------------------------------------------

    def partition_vtl_enabled(self, vtl: int) -> bool:
        with self.lock:
            return vtl in self.state.enabled_vtls

    def vtl_enabled(self, vp: int, vtl: int) -> bool:
        with self.lock:
            return 0 <= vtl < self.state.vtl_count and self.state.vp_vtl(vp, vtl).enabled

    # These three run on every VTL call, return and lower-VTL entry: plain walks over the
    # VP's per-VTL states, nothing built per call.
    def highest_enabled_vtl(self, vp: int) -> int:
        with self.lock:
            per = self.state.vps[vp]
            for v in range(len(per) - 1, 0, -1):
                if per[v].enabled:
                    return v
            if not per[0].enabled:
                raise ValueError(f"no VTL is enabled on VP {vp}")
            return 0

    def next_higher_vtl(self, vp: int, vtl: int) -> int | None:
        """The VTL a call (or an intercept) from ``vtl`` goes to: the next higher enabled on ``vp``."""
        with self.lock:
            per = self.state.vps[vp]
            for v in range(max(vtl + 1, 0), len(per)):
                if per[v].enabled:
                    return v
            return None

    def next_lower_vtl(self, vp: int, vtl: int) -> int:
        with self.lock:
            per = self.state.vps[vp]
            for v in range(min(vtl, len(per)) - 1, -1, -1):
                if per[v].enabled:
                    return v
            raise ValueError(f"no VTL below VTL{vtl} is enabled on VP {vp}")

    def hypervisor_vtl(self) -> int:
        """The VTL whose view the hypervisor reads through: the highest enabled, which nothing restricts."""
        return max(self.state.enabled_vtls)

    # -- enablement (called by the hypercall handlers) -----------------------------------------

    def enable_partition_vtl(self, caller_vp: int, caller_vtl: int, vtl: int) -> None:
        self.services.create_vtl(vtl)
        self.state.enabled_vtls.add(vtl)
        self.state.config(vtl)
        self.state_changed()
        self._emit(EventKind.VTL_ENABLE, caller_vp, caller_vtl, target_vtl=vtl, target_vp=None)

    def enable_vp_vtl(self, caller_vp: int, caller_vtl: int, vp: int, vtl: int, context: InitialVpContext) -> None:
        self.services.load_vp_context(vp, vtl, context)
        if vtl > 0:
            # A higher VTL's APIC starts software-enabled (SVR 0x1FF): the seed does it because
            # Windows Server 2019's secure kernel expects it; the TLFS is silent (docs/vsm.md).
            self.services.software_enable_apic(vp, vtl)
        self.state.vp_vtl(vp, vtl).enabled = True
        self.state_changed()
        self._emit(EventKind.VTL_ENABLE, caller_vp, caller_vtl, target_vtl=vtl, target_vp=vp)

    def state_changed(self) -> None:
        """Tell the machine that what a VTL call or return does may have changed (``on_state_change``)."""
        if self.on_state_change is not None:
            self.on_state_change()

    # -- VTL entry / return ----------------------------------------------------------------------

    def on_vtl_entry(self, vp: int, to_vtl: int, reason: EntryReason, from_vtl: int) -> None:
        """Call right after the machine switched ``vp`` from ``from_vtl`` up into ``to_vtl``.

        Writes HV_VP_VTL_CONTROL of ``to_vtl``'s VP assist page: EntryReason; VinaAsserted
        cleared if VINA AutoReset is set, else kept; VtlReturnX64Rax/Rcx = the shared RAX/RCX
        at entry, so a non-fast return without changes restores the lower VTL's registers
        (the TLFS "Fast Return" text and the seed; OpenVMM leaves them alone).
        """
        with self.lock:
            gpa = vp_assist.control_gpa(self.hv, vp, to_vtl)  # once: read and written at the same place
            raw = None if gpa is None else vp_assist.read_control_bytes_at(self.partition, to_vtl, gpa)
            if raw is None or gpa is None:
                return
            access = self.partition.vp(vp)
            # The fields in place in the bytes read (reserved bytes kept), no dataclass per entry.
            control = bytearray(raw)
            vina = control[_VINA_STATUS_AT]
            if self.state.vp_vtl(vp, to_vtl).vina_auto_reset:
                vina &= ~HV_VINA_STATUS_ASSERTED & 0xFF
            rax = int(access.get_register(to_vtl, "rax"))  # type: ignore[arg-type]
            rcx = int(access.get_register(to_vtl, "rcx"))  # type: ignore[arg-type]
            _ENTRY_FIELDS.pack_into(control, 0, int(reason), vina)
            _RETURN_REGS.pack_into(control, _RETURN_RAX_AT, rax, rcx)
            vp_assist.write_control_bytes_at(self.partition, to_vtl, gpa, bytes(control))

    def on_vtl_return(self, vp: int, vtl: int) -> None:
        """VTL ``vtl`` of ``vp`` returns: release its TLB locks, auto-reset VINA."""
        per = self.state.vp_vtl(vp, vtl)
        released = False
        for lower in per.tlb_locks():
            per.secure_config[lower] &= ~int(VsmVpSecureConfig.TLB_LOCKED)
            released = True
        if per.vina_auto_reset:
            vp_assist.set_vina_asserted(self.hv, self.partition, vp, vtl, False)
        if released:
            self.tlb_locks_changed()
            self.state_changed()

    def notify_lower_vtl_interrupt(self, vp: int, active_vtl: int) -> bool:
        """VINA: an interrupt for a lower VTL is ready while ``active_vtl`` runs on ``vp``.

        If ``active_vtl`` enabled VINA and it is not asserted yet, set VinaAsserted in its
        assist page and assert the VINA vector in its APIC; returns True if it did.
        """
        with self.lock:
            per = self.state.vp_vtl(vp, active_vtl)
            if not per.vina_enabled or vp_assist.vina_asserted(self.hv, self.partition, vp, active_vtl):
                return False
            if not vp_assist.set_vina_asserted(self.hv, self.partition, vp, active_vtl, True):
                return False
            self.partition.assert_interrupt(vp, active_vtl, per.vina & VsmVina.VECTOR_MASK)
            return True

    def _vtl_hook(self, request: VtlCallRequest) -> HypercallOutcome:
        with self.lock:
            return vtl_call.handle(self, request)

    # -- protections -----------------------------------------------------------------------------

    def lower_vtl_allowed(self, target_vtl: int, gpa_page: int) -> Access:
        """Accesses ``target_vtl``'s view allows on page ``gpa_page`` (all, before protections)."""
        with self.lock:
            return mask_to_access(self.protection_mask(target_vtl, gpa_page))

    def protection_mask(self, target_vtl: int, gpa_page: int) -> int:
        """The HV_MAP_GPA_FLAGS mask in force for (``target_vtl``, page)."""
        if target_vtl not in self.state.protections:
            return HV_MAP_GPA_PERMISSIONS_ALL
        return self.state.protections[target_vtl].mask(gpa_page)

    def ram_top(self) -> int:
        """The first guest-physical address above all RAM."""
        return max(((first + count) << HV_PAGE_SHIFT for first, count in self.ram_ranges), default=0)

    def is_ram_page(self, page: int) -> bool:
        return any(first <= page < first + count for first, count in self.ram_ranges)

    def write_partition_config(self, caller_vp: int, caller_vtl: int, owner: int, value: int) -> None:
        """HvRegisterVsmPartitionConfig of ``owner`` (≤ caller, checked by the caller).

        Unsupported bits → INVALID_REGISTER_VALUE. EnableVtlProtection and the default mask
        are write-once: once protections are on, later writes keep them (as the seed) and
        may only change the other bits. Turning protections on applies the default mask
        to every RAM page of every VTL below ``owner``.
        """
        config = self.state.config(owner)
        if value & ~int(_SUPPORTED_CONFIG):
            raise HandlerError(S.HV_STATUS_INVALID_REGISTER_VALUE)
        was_enabled = config.protection_enabled
        if was_enabled:
            value = (value & ~int(_STICKY_CONFIG)) | (config.value & int(_STICKY_CONFIG))
        mask = (value & VsmPartitionConfig.DEFAULT_VTL_PROTECTION_MASK) >> VSM_PARTITION_CONFIG_PROTECTION_MASK_SHIFT
        if not was_enabled and value & VsmPartitionConfig.ENABLE_VTL_PROTECTION and not valid_mask(mask):
            raise HandlerError(S.HV_STATUS_INVALID_REGISTER_VALUE)
        config.value = value
        if not was_enabled and config.protection_enabled:
            for target in range(owner):
                self._apply_default(caller_vp, caller_vtl, target, config.default_mask)

    def _apply_default(self, vp: int, vtl: int, target: int, mask: int) -> None:
        pmap = self.state.protections[target]
        old = pmap.default
        pmap.default = mask
        runs = [PageProtection(first, count, mask_to_access(mask)) for first, count in self.ram_ranges]
        for first, count in self.ram_ranges:
            self._emit_protection(vp, vtl, target, first, count, old if not pmap.pages else None, mask)
        runs += self._explicit_runs(pmap)
        self.services.set_protections(target, runs)

    @staticmethod
    def _explicit_runs(pmap: ProtectionMap) -> list[PageProtection]:
        by_mask: dict[int, list[int]] = {}
        for page, mask in pmap.pages.items():
            by_mask.setdefault(mask, []).append(page)
        return [PageProtection(first, count, mask_to_access(mask))
                for mask, pages in by_mask.items() for first, count in coalesce(pages)]  # fmt: skip

    def modify_protections(
        self, vp: int, vtl: int, raw_target: int, flags: int, pages: Sequence[int]
    ) -> tuple[HvStatus, int]:
        """HvCallModifyVtlProtectionMask from (``vp``, ``vtl``); returns (status, pages done).

        TargetVtl (vsm-facts §6.4): UseTargetVtl=0 → the caller is the owner and every VTL
        below it is restricted (OpenVMM; for VTL1 also what the seed does); UseTargetVtl=1
        with TargetVtl below the caller → that VTL's view (seed); TargetVtl equal to the
        caller → owner form again; above the caller → ACCESS_DENIED. No VTL below the caller
        (VTL0) → ACCESS_DENIED ("a VTL may not set permissions for itself"). MapFlags beyond
        R/W/KMX/UMX or a TLFS-invalid combination → INVALID_PARAMETER (without MBEC either
        execute bit grants execute). The caller's EnableVtlProtection must be set, else ACCESS_DENIED
        (OpenVMM). A page outside RAM → INVALID_PARAMETER with the pages before it applied.
        """
        target = HvInputVtl.decode(raw_target)
        if target.reserved or not valid_mask(flags):
            return S.HV_STATUS_INVALID_PARAMETER, 0
        if target.use_target_vtl:
            if target.target_vtl > vtl:
                return S.HV_STATUS_ACCESS_DENIED, 0
            targets = list(range(vtl)) if target.target_vtl == vtl else [target.target_vtl]
        else:
            targets = list(range(vtl))
        if not targets:
            return S.HV_STATUS_ACCESS_DENIED, 0
        if not self.state.config(vtl).protection_enabled:
            return S.HV_STATUS_ACCESS_DENIED, 0
        done = next((i for i, page in enumerate(pages) if not self.is_ram_page(page)), len(pages))
        good = pages[:done]
        if good:
            for target_vtl in targets:
                self._set_pages(vp, vtl, target_vtl, good, flags)
        return (S.HV_STATUS_SUCCESS if done == len(pages) else S.HV_STATUS_INVALID_PARAMETER), done

    def _set_pages(self, vp: int, vtl: int, target: int, pages: Sequence[int], mask: int) -> None:
        pmap = self.state.protections[target]
        runs: list[PageProtection] = []
        for first, count in coalesce(pages):
            old = {pmap.mask(page) for page in range(first, first + count)}
            for page in range(first, first + count):
                pmap.pages[page] = mask
            runs.append(PageProtection(first, count, mask_to_access(mask)))
            self._emit_protection(vp, vtl, target, first, count, old.pop() if len(old) == 1 else None, mask)
        self.services.set_protections(target, runs)

    # -- TLB locks -------------------------------------------------------------------------------

    def lock_tlb(self, vp: int, *, owner: int, lower: int) -> None:
        per = self.state.vp_vtl(vp, owner)
        per.secure_config[lower] = per.secure_config.get(lower, 0) | int(VsmVpSecureConfig.TLB_LOCKED)
        self.state_changed()

    def tlb_locks_changed(self) -> None:
        """Some lock was released: tell the machine which waiting VPs may retry their flush."""
        waiters = sorted(self.state.tlb_waiters)
        self.state.tlb_waiters.clear()
        if waiters and self.on_tlb_unlock is not None:
            self.on_tlb_unlock(waiters)

    def tlb_wait_pending(self, vp: int) -> bool:
        """Is ``vp`` waiting for a TLB lock (its flush hypercall returned ``retry``)?

        Lock-free on purpose: the machine evaluates this as a wait predicate while holding
        the VP's condition lock, and a VTL return releasing the lock kicks that VP (taking
        the same condition lock) with the partition lock held; taking the partition lock
        here would invert that order. A set membership test is atomic.
        """
        return vp in self.state.tlb_waiters

    def describe_tlb_locks(self) -> str:
        """The TLB locks held now, in words (for a deadlock report)."""
        held = [
            f"VTL {owner}'s lock on VP {vp}'s VTL {lower} TLB"
            for vp in range(self.state.vp_count)
            for owner in range(1, self.state.vtl_count)
            for lower in self.state.vp_vtl(vp, owner).tlb_locks()
        ]
        return ", ".join(held) if held else "a TLB lock"

    def _tlb_lock_check(self, vp: int, vtl: int, target_vps: Sequence[int], target_vtls: Sequence[int]) -> bool:
        locked = any(self.state.tlb_locked(t, tv, vtl) for t in target_vps for tv in target_vtls)
        if locked:
            self.state.tlb_waiters.add(vp)
        return locked

    # -- intercepts ------------------------------------------------------------------------------

    build_intercept = staticmethod(build_intercept)

    # -- helpers ---------------------------------------------------------------------------------

    def _probe_ram(self) -> list[tuple[int, int]]:
        """Without ``ram_ranges``: the RAM run starting at GPA 0, found by probing ``read_gpa``."""

        def present(page: int) -> bool:
            try:
                self.partition.read_gpa(0, page << HV_PAGE_SHIFT, 1)
            except GuestMemoryError:
                return False
            except VtlAccessDenied:
                return True
            return True

        if not present(0):
            return []
        high = 1
        while present(high):
            high *= 2
        low = high // 2  # present(low) holds, present(high) does not
        while high - low > 1:
            mid = (low + high) // 2
            if present(mid):
                low = mid
            else:
                high = mid
        return [(0, (low + 1) * HV_PAGE_SIZE)]

    def _emit(self, kind: EventKind, vp: int, vtl: int, **fields: object) -> None:
        if not self.sink.enabled:
            return
        rip = int(self.partition.vp(vp).get_register(vtl, "rip"))  # type: ignore[arg-type]
        self.sink.emit(kind, vp, vtl, rip, **fields)

    def _emit_protection(self, vp: int, vtl: int, target: int, first: int, count: int, old: int | None,
                         new: int) -> None:  # fmt: skip
        self._emit(EventKind.PROTECTION, vp, vtl, target_vtl=target, gpa_start=first << HV_PAGE_SHIFT,
                   pages=count, old_mask=old, new_mask=new)  # fmt: skip

