"""The hypercall fast path's Python side: what C may answer, and the state it reads, kept current.

The machine's ``vsm_kvm_run_fast`` offers every port-I/O exit to
``vsm_hc_serve_io`` (C source and its exact rules: vmm/backends/_hypercall_fastpath_build.py),
which answers the commonest hypercalls without Python and leaves everything else to the
dispatcher. Python stays the only definition of what a call means: a call is answered in C
only while the dispatcher says that input value passes every check and reaches the handler
whose C twin it is (``HypercallDispatcher.answered_natively``), and the state C reads is a
mirror this class refreshes where Python changes it:

- the hypercall page's Enable bit of each VTL: after every HV_X64_MSR_HYPERCALL write;
- which calls are answered: whenever the dispatcher's table changes;
- each VTL view's restricted-page count: around every protection change, through the view's
  guard (a change waits for C reads already under way; see ``vsm_view_guard``);
- APIC ID to VP index (``HyperV.vp_index_from_apic_id`` for IDs below 256), the partition ID
  and the RAM ranges: fixed for a machine's life.

While the machine records, only the VTL switches are answered here, each recorded by C as one
native record that the writer expands into exactly what the Python switch records
(vmm/backends/recorded_switch.py); every other hypercall goes through the recorded boundary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.backends import _hypercall_fastpath_build as build
from vsmtrace.vmm.backends import recorded_switch
from vsmtrace.vmm.hyperv.handlers.misc import NATIVE_SPIN_WAIT, NATIVE_VP_INDEX_FROM_APIC_ID
from vsmtrace.vmm.hyperv.hvdef import HypercallCode, HypercallControl, HypercallControlBits
from vsmtrace.vmm.memory import PAGE_SHIFT
from vsmtrace.vmm.memory_view import execute_unenforced
from vsmtrace.vmm.native import extension_loader

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv import HyperV
    from vsmtrace.vmm.memory import GuestMemory
    from vsmtrace.vmm.memory_view import MemoryView

#: The compiled fast-path module (built into the vsmtrace cache on first use).
load = extension_loader("_vsmtrace_hypercalls", build, "the hypercall fast path")


#: The fast input value of HvCallNotifyLongSpinWait (no rep, no variable header).
SPIN_WAIT_CONTROL = HypercallControl.encode(HypercallCode.HvCallNotifyLongSpinWait, fast=True)
#: GetVpIndexFromApicId as a memory call: every bit but the rep count and rep start must be these.
_B = HypercallControlBits
APIC_CONTROL_MASK = (
    ((1 << 64) - 1) & ~(_B.REP_COUNT_MASK << _B.REP_COUNT_SHIFT) & ~(_B.REP_START_MASK << _B.REP_START_SHIFT)
)
APIC_CONTROL_VALUE = HypercallControl.encode(HypercallCode.HvCallGetVpIndexFromApicId)


class ViewGuard:
    """A VTL view's ``ProtectionGuard`` (vmm/memory_view.py) over its C ``vsm_view_guard``."""

    def __init__(self, lib: Any, guard: Any) -> None:
        self.lib = lib
        self.guard = guard
        self.nx = guard.nx
        self.nx_pages = int(guard.nx_pages)

    def begin(self) -> None:
        self.lib.vsm_view_guard_begin(self.guard)

    def mark(self, first_page: int, count: int, unenforced: bool) -> None:
        nx, page, end = self.nx, first_page, min(first_page + count, self.nx_pages)
        whole = 0xFF if unenforced else 0
        while page < end:
            if not page & 7 and end - page >= 8:  # a whole byte of the bitmap
                nx[page >> 3] = whole
                page += 8
                continue
            bit = 1 << (page & 7)
            if unenforced:
                nx[page >> 3] |= bit
            else:
                nx[page >> 3] &= ~bit & 0xFF
            page += 1

    def end(self, restricted: int, unenforced: int) -> None:
        self.lib.vsm_view_guard_end(self.guard, restricted, unenforced)


class HypercallFastPath:
    """One partition's ``struct vsm_hc_partition`` and one ``vsm_hc_caller`` per (VP, VTL)."""

    def __init__(self, hv: HyperV, memory: GuestMemory, views: list[MemoryView], *, recording: bool = False) -> None:
        mod = load()
        #: The machine records: answer only what C records (the VTL switches), never a hypercall.
        self.recording = recording
        self.ffi: Any = mod.ffi
        self.lib: Any = mod.lib
        assert (self.lib.VSM_HC_RECORD_CALL, self.lib.VSM_HC_RECORD_RETURN) == (recorded_switch.CALL, recorded_switch.RETURN)
        assert self.lib.VSM_HC_NO_CONTROL == recorded_switch.NO_CONTROL
        assert self.lib.VSM_HC_RECORD_LATE == recorded_switch.STORE_LATE
        self.hv = hv
        ffi, lib = self.ffi, self.lib
        p = self.partition = ffi.new("struct vsm_hc_partition *")
        p.partition_id = hv.partition_id
        for apic in range(lib.VSM_HC_APIC_IDS):
            vp = hv.vp_index_from_apic_id(apic)
            p.vp_of_apic[apic] = lib.VSM_HC_NO_VP if vp is None else vp
        host = memory.host_address()
        for i, r in enumerate(memory.ranges[: lib.VSM_HC_RAM_RANGES]):
            p.ram[i].gpa, p.ram[i].size, p.ram[i].host = r.gpa, r.size, ffi.cast("uint8_t *", host + r.offset)
            p.nram = i + 1
        self._keep: list[Any] = []  # C holds raw pointers into these
        self.callers: dict[tuple[int, int], Any] = {}
        self.guards: list[Any] = []  # each VTL view's struct vsm_view_guard
        #: VP index -> struct vsm_hc_vtls, the VP's VTL-switch mirror (filled by the VSM backend).
        self.vtl_switches: dict[int, Any] = {}
        pages = max(r.end for r in memory.ranges) >> PAGE_SHIFT
        for vtl, view in enumerate(views[: lib.VSM_HC_VTLS]):
            guard = ffi.new("struct vsm_view_guard *")
            lib.vsm_view_guard_init(guard)
            bitmap = ffi.new("uint8_t[]", -(-pages // 8))
            self._keep.append(bitmap)
            guard.nx, guard.nx_pages = bitmap, pages
            view.guard = mirror = ViewGuard(lib, guard)
            for page, allowed in view.restricted.items():
                mirror.mark(page, 1, execute_unenforced(allowed))
            lib.vsm_view_guard_end(guard, len(view.restricted), view.unenforced_execute)
            p.views[vtl] = guard
            self.guards.append(guard)
        self.vtl_count = min(hv.vtl_count, lib.VSM_HC_VTLS)
        hv.dispatcher.on_table_change = self.refresh_calls
        self.refresh_calls()
        self.refresh_pages()

    def refresh_calls(self) -> None:
        """Re-decide which calls C answers (the dispatcher's table or the spin-wait hook changed)."""
        dispatcher, p = self.hv.dispatcher, self.partition
        spin = self.hv.on_long_spin_wait is None and dispatcher.answered_natively(SPIN_WAIT_CONTROL, NATIVE_SPIN_WAIT)
        p.spin_control = SPIN_WAIT_CONTROL if spin and not self.recording else 0
        apic = not self.recording and dispatcher.answered_natively(
            APIC_CONTROL_VALUE | 1 << _B.REP_COUNT_SHIFT, NATIVE_VP_INDEX_FROM_APIC_ID
        )
        p.apic_value = APIC_CONTROL_VALUE
        p.apic_mask = APIC_CONTROL_MASK if apic else 0

    def refresh_pages(self) -> None:
        """Mirror each VTL's hypercall page Enable bit (after a write of HV_X64_MSR_HYPERCALL)."""
        for vtl in range(self.vtl_count):
            self.partition.page_enabled[vtl] = 1 if self.hv.hypercall_page_enabled(vtl) else 0

    def caller(self, vp: int, vtl: int) -> tuple[int, int] | None:
        """(address of the server function, address of its context) for vCPU (vp, vtl), as
        ``MachineExtension.fast_io_server`` hands them to the KVM layer (another cffi module)."""
        if vtl >= self.vtl_count:
            return None
        ctx = self.ffi.new("struct vsm_hc_caller *", {"partition": self.partition, "vtl": vtl})
        ctx.vtls = self.vtl_switch(vp)
        self.callers[(vp, vtl)] = ctx  # C holds a raw pointer to it
        fn = self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, "vsm_hc_serve_io"))
        return int(fn), int(self.ffi.cast("uintptr_t", ctx))

    def vtl_switch(self, vp: int) -> Any:
        """The VP's ``struct vsm_hc_vtls`` (not ready until the VSM backend fills and refreshes it)."""
        mirror = self.vtl_switches.get(vp)
        if mirror is None:
            mirror = self.vtl_switches[vp] = self.ffi.new("struct vsm_hc_vtls *")
        return mirror

    def switches(self) -> dict[int, tuple[int, int]]:
        """(VTL calls, fast VTL returns) answered in C so far, per VP."""
        return {vp: (int(m.calls), int(m.returns)) for vp, m in self.vtl_switches.items()}

    def served(self) -> dict[tuple[int, int], int]:
        """Hypercalls answered in C so far, per (VP, VTL) that has a caller."""
        return {key: int(ctx.served) for key, ctx in self.callers.items()}
