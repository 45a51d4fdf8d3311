"""VSM over stock KVM: the machine side of ``vmm/vsm``.

Implements :class:`vmm.vsm.services.VsmServices` and installs the machine hooks
VSM needs:

* **VTL switches** — the VP's active vCPU changes; shared state is copied
  (``vtl_switch.SharedStateCopier``) and the entry reason is written by the VSM
  logic into the entered VTL's VP assist page.
* **Protections** — each VTL's VM has a :class:`MemoryView` whose memslots encode
  the permissions the higher VTL set.
* **Secure memory intercepts** — a denied access (MMIO exit from a hole or a
  read-only slot, or an instruction-fetch failure) is undone (``rewind``), turned
  into an HvMessageTypeGpaIntercept for SINT0 of the next higher VTL, and the VP
  switches there.
* **Interrupts for higher VTLs** — before every entry of a lower VTL, and while it
  halts, a deliverable interrupt in a higher VTL's APIC pulls the VP up.
* **No confused deputy** — hypercall buffers are read and written through the
  caller VTL's view.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vsmtrace.vmm.backends import recorded_switch
from vsmtrace.vmm.backends.vtl_switch import SharedStateCopier
from vsmtrace.vmm.cpu_state import GPR_NAMES, cpu_mode, segment_from_kvm
from vsmtrace.vmm.emulation_io import Boundary
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.extension import MachineExtension
from vsmtrace.vmm.guest_walk import cached_translator, read_linear, rip_linear, translator
from vsmtrace.vmm.hyperv.hvdef import HvVpVtlControl
from vsmtrace.vmm.hyperv.hypercall_page import HV_HYPERCALL_TRAP_PORT, TRAP_INSTRUCTION
from vsmtrace.vmm.kvm.system import ffi, lib
from vsmtrace.vmm.memory import PAGE_SHIFT
from vsmtrace.vmm.memory_view import MemoryView, execute_unenforced
from vsmtrace.vmm.protocol import Entry
from vsmtrace.vmm.stops import EXIT_GUEST_FAULT, GuestStop
from vsmtrace.vmm.vp import Access, GuestMemoryError
from vsmtrace.vmm.vsm import vp_assist
from vsmtrace.vmm.vsm.rewind import Located, decode_at, locate_write, read_target
from vsmtrace.vmm.vsm.services import EntryReason, InitialVpContext, PageProtection, SwitchReason, VtlTransition
from vsmtrace.vmm.vtl_array import VtlArray

log = logging.getLogger("vsmtrace.vsm")

if TYPE_CHECKING:
    from vsmtrace.vmm.emulation import Emulation
    from vsmtrace.vmm.hyperv import HyperV
    from vsmtrace.vmm.machine import Machine
    from vsmtrace.vmm.virtual_processor import VirtualProcessor
    from vsmtrace.vmm.vsm import Vsm

# kvm_run fields read from its bytes (a cffi attribute read costs about as much as an unpack).
_RUN_REGS_AT = ffi.offsetof("struct kvm_run", "s")
_RIP_AT = _RUN_REGS_AT + ffi.offsetof("struct kvm_regs", "rip")
_RDX_AT = _RUN_REGS_AT + ffi.offsetof("struct kvm_regs", "rdx")
_R8_AT = _RUN_REGS_AT + ffi.offsetof("struct kvm_regs", "r8")
_CR8_AT = ffi.offsetof("struct kvm_run", "cr8")
_EXIT_REASON_AT = ffi.offsetof("struct kvm_run", "exit_reason")
# exit_reason, then the io member: direction, (size), port, count
_EXIT_IO = struct.Struct(f"<I{ffi.offsetof('struct kvm_run', 'io') - _EXIT_REASON_AT - 4}xBxHI")
_U64 = struct.Struct("<Q")
_R8_R10 = struct.Struct("<QQQ")
_EXIT_IO_REASON = int(lib.KVM_EXIT_IO)
_IO_OUT = int(lib.KVM_EXIT_IO_OUT)
assert [n for n, _ in ffi.typeof("struct kvm_regs").fields][8:11] == ["r8", "r9", "r10"], "kvm_regs layout changed"

ENTRY_REASON = {
    SwitchReason.CALL: EntryReason.VTL_CALL,
    SwitchReason.INTERRUPT: EntryReason.INTERRUPT,
    SwitchReason.INTERCEPT: EntryReason.INTERRUPT,  # intercepts arrive as the SINT0 interrupt
}
ACCESS_NAMES = {Access.READ: "read", Access.WRITE: "write", Access.EXECUTE: "execute"}


@dataclass(frozen=True)
class DeniedAccess:
    """A denied access, undone: the intercept message and what the INTERCEPT event records."""

    message: Any  # vmm.hyperv.hvdef.HvMessage
    gva: int | None
    insn_bytes: bytes


class VsmBackend(MachineExtension):
    """One per machine with VSM: owns the VTL switches and intercepts; the Hyper-V backend builds the logic."""

    def __init__(self) -> None:
        self.vsm: Vsm | None = None  # the VSM logic, built with HyperV once the VPs exist (take_emulation)
        self.hv: HyperV | None = None
        self.enabled_vtls = {0}
        self.copiers: dict[int, SharedStateCopier] = {}
        self.vina_notified: set[tuple[int, int]] = set()  # (vp, vtl) told of a lower-VTL interrupt
        self.trap_out_retired: bool | None = None  # see _trap_already_complete
        self.nx_limitation_reported = False
        self.resumed_lower: set[int] = set()  # VPs that just switched down: look at their RIP once
        #: VP index -> its struct vsm_hc_vtls: the VTL call/fast return the hypercall fast path may answer
        #: in C, and whether that is plain now (refresh_fast_switch; docs/architecture.md, "Exit paths in C").
        self.fast_switch: dict[int, Any] = {}
        self._fast_ffi: Any = None
        self._fast_stale: set[int] = set()  # VPs whose mirror must be recomputed before their next entry
        self._records_switches = False  # the recorder knows how to expand the switches C records

    def attach(self, machine: Machine) -> None:
        self.machine = machine

    def vps_created(self) -> None:
        self.copiers = {vp.index: SharedStateCopier(vp.vcpus) for vp in self.machine.vps}
        self.sync_tsc()

    def take_emulation(self, emulation: Emulation, boundary: Boundary) -> None:
        """The emulation the Hyper-V backend built over this backend (``vmm.emulation.build_emulation``)."""
        self.hv, self.vsm = emulation.hv, emulation.vsm
        self.boundary = boundary
        if self.vsm is not None:
            self.vsm.on_tlb_unlock = self._tlb_unlocked
            self.vsm.on_state_change = self.invalidate_fast_switch

    def can_wake(self, vp: VirtualProcessor) -> bool:
        return self.higher_vtl_pending(vp)

    def wakes_from_outside(self) -> bool:
        """A higher VTL's interrupt can wake a VP whose lower VTL halted with IF=0, once one is enabled."""
        return len(self.enabled_vtls) > 1

    def sync_tsc(self) -> None:
        """Every VTL's vCPU of a VP reads the same TSC (TLFS: TSC is shared)."""
        for vp in self.machine.vps:
            base = vp.vcpus[0]
            if not base.has_tsc_offset_attr():
                continue
            offset = base.get_tsc_offset()
            for vcpu in vp.vcpus[1:]:
                vcpu.set_tsc_offset(offset)

    @property
    def views(self) -> VtlArray[MemoryView]:
        assert self.machine.views is not None, "RAM is mapped at boot"
        return self.machine.views

    # -- VsmServices -------------------------------------------------------------------------
    def create_vtl(self, vtl: int) -> None:
        if vtl >= len(self.machine.vms):
            raise ValueError(f"VTL{vtl} is beyond the {len(self.machine.vms)} VTLs this machine was built with")
        self.enabled_vtls.add(vtl)

    def load_vp_context(self, vp: int, vtl: int, context: InitialVpContext) -> None:
        target = self.machine.vps[vp]
        regs = target.regfiles[vtl]

        def load() -> None:
            regs.set_many(dict(context.registers))  # type: ignore[arg-type]

        if target.vtl == vtl and target.started:
            target.call_on_thread(load)  # that vCPU may be inside KVM_RUN right now
        else:
            load()  # a VTL that is not running on its VP: its vCPU is idle

    def software_enable_apic(self, vp: int, vtl: int) -> None:
        self.machine.vps[vp].apics[vtl].software_enable()

    def start_vp(self, vp: int, vtl: int) -> None:
        self.machine.vps[vp].start_in_vtl(vtl)

    def vp_started(self, vp: int) -> bool:
        return self.machine.vps[vp].started

    def request_transition(self, transition: VtlTransition) -> None:
        vp = self.machine.vps[transition.vp]
        self.switch(vp, transition.to_vtl, transition.reason, transition.return_rax_rcx)

    def set_protections(self, target_vtl: int, protections: Sequence[PageProtection]) -> None:
        view = self.views[target_vtl]
        with self._other_vps_out_of_guest():
            for p in protections:
                view.set_pages(p.first_page, p.count, p.allowed)
        if view.unenforced_execute and not self.nx_limitation_reported:
            self._report_nx_limitation(target_vtl, protections)

    def _report_nx_limitation(self, target_vtl: int, protections: Sequence[Any]) -> None:
        """Once per run: stderr, a LIMITATION trace event (``vsmtrace info`` lists it)."""
        self.nx_limitation_reported = True
        first = next((p for p in protections if execute_unenforced(p.allowed)), None)
        message = (
            f"VTL{target_vtl} has readable pages without execute permission; this KVM cannot deny instruction "
            "fetches on readable pages (no per-page no-execute), so allowed reads win and an execute is "
            "intercepted only where vsmtrace sees it (a lower VTL resuming on such a page)"
        )
        log.warning("%s", message)
        self.machine.emit(
            EventKind.LIMITATION, None, message=message,
            detail={"limitation": "execute_unenforced_on_readable_pages", "target_vtl": target_vtl,
                    "first_gpa": None if first is None else first.first_page << PAGE_SHIFT},
        )  # fmt: skip

    @contextlib.contextmanager
    def _other_vps_out_of_guest(self) -> Iterator[None]:
        """Keep every other VP out of KVM_RUN while memslots are rebuilt.

        A layout change deletes the old slots before it creates their replacements, so a
        vCPU running in between finds RAM missing (seen: VP1 triple-faulted in VTL0 while
        VP0's VTL1 protected a page). Each other VP gets a request that holds it at the top
        of its run loop until the change is done; ``immediate_exit`` and a kick end a
        KVM_RUN in progress. Only the return from KVM_RUN is awaited, never the handling of
        that exit (which may need the partition lock the caller holds).
        """
        machine = self.machine
        me = threading.current_thread()
        others = [vp for vp in machine.vps if vp.thread is not None and vp.thread is not me and vp.started]
        if not others:
            yield
            return
        done = threading.Event()

        def hold() -> None:
            while not done.wait(0.05) and not machine.stopping:
                pass

        seen = {}
        for vp in others:
            with vp.cond:
                vp.requests.append((hold, threading.Event()))
            for vcpu in vp.vcpus:
                if vcpu is not None:
                    vcpu.run_struct.immediate_exit = 1
            seen[vp.index] = vp.exit_count
            vp.kick()
        try:
            for vp in others:
                deadline = time.monotonic() + 1.0
                while vp.in_guest and vp.exit_count == seen[vp.index] and not machine.stopping:
                    if time.monotonic() > deadline:
                        vp.kick()
                        deadline = time.monotonic() + 1.0
                    time.sleep(0.00005)
            yield
        finally:
            done.set()

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        self.machine.flush_vps(vp_indices, vtl)

    # -- VTL switches --------------------------------------------------------------------------
    def switch(
        self, vp: VirtualProcessor, to_vtl: int, reason: SwitchReason, return_rax_rcx: tuple[int, int] | None = None
    ) -> None:
        from_vtl = vp.vtl
        if to_vtl == from_vtl:
            return
        rip, args = self.move_vp(vp, to_vtl, reason, return_rax_rcx)
        if to_vtl > from_vtl and self.vsm is not None:
            vsm, i, entry_reason = self.vsm, vp.index, ENTRY_REASON[reason]
            if self.boundary.recording:
                self.boundary.entry(
                    Entry.VTL_ENTRY, i, to_vtl, [i, to_vtl, entry_reason, from_vtl],
                    lambda: vsm.on_vtl_entry(i, to_vtl, entry_reason, from_vtl),
                )
            else:  # what the boundary does when nothing records, without building the closure
                vsm.on_vtl_entry(i, to_vtl, entry_reason, from_vtl)
        sink = self.machine.sink
        if sink.enabled:
            sink.emit(
                EventKind.VTL_SWITCH, vp.index, from_vtl, rip, from_vtl=from_vtl, to_vtl=to_vtl, reason=reason.value, args=args
            )

    def move_vp(
        self, vp: VirtualProcessor, to_vtl: int, reason: SwitchReason, return_rax_rcx: tuple[int, int] | None = None
    ) -> tuple[int, tuple[int, ...] | None]:
        """The machine half of a switch: shared state moves and ``to_vtl``'s vCPU becomes the running one.

        Re-execution replays recorded switches with exactly this (the VSM half, the entry
        notification, comes from the trace). Returns the source RIP and a call's arguments.
        """
        from_vtl = vp.vtl
        if to_vtl < from_vtl:
            self.vina_notified.discard((vp.index, from_vtl))  # the next lower-VTL interrupt notifies again
        src = vp.vcpus[from_vtl]
        if not self._trap_already_complete(vp, src):
            complete_pending_io(src)
        self.copiers[vp.index].copy(from_vtl, to_vtl)
        dst = vp.vcpus[to_vtl]
        if return_rax_rcx is not None:
            regs = dst.get_regs()
            regs.rax, regs.rcx = return_rax_rcx
            dst.set_regs(regs)
        # RAX/RCX carry the VTL call itself (the stub puts the control in RAX and the call code
        # in RCX), so a secure call's own arguments start at RDX.
        call = reason is SwitchReason.CALL
        if src.sync_regs:  # from kvm_run's bytes: no cffi struct per field
            s_view = src.run_view
            rip = _U64.unpack_from(s_view, _RIP_AT)[0]
            args = (_U64.unpack_from(s_view, _RDX_AT)[0], *_R8_R10.unpack_from(s_view, _R8_AT)) if call else None
        else:
            src_regs = src.get_regs()
            rip = int(src_regs.rip)
            args = (int(src_regs.rdx), int(src_regs.r8), int(src_regs.r9), int(src_regs.r10)) if call else None
        vp.set_vtl(to_vtl)
        if to_vtl < from_vtl and self.views[to_vtl].unenforced_execute:
            self.resumed_lower.add(vp.index)
        vp.last_cr8 = _U64.unpack_from(dst.run_view, _CR8_AT)[0]
        vp.interrupt_hint = True
        if self.fast_switch:
            self._fast_stale.add(vp.index)  # VTL1 may have run for the first time; VINA state moved
        return rip, args

    def _trap_already_complete(self, vp: VirtualProcessor, vcpu: Any) -> bool:
        """Whether the exit is a hypercall-page trap (one OUT) that KVM has already completed.

        A KVM that emulates the OUT (PVM) steps over it before exiting and leaves nothing
        to complete; stock KVM's fast PIO path advances RIP only in the next KVM_RUN. Which
        kind this host is gets learnt once, from the bytes around RIP at the first trap.
        """
        reason, direction, port, count = _EXIT_IO.unpack_from(vcpu.run_view, _EXIT_REASON_AT)
        if reason != _EXIT_IO_REASON or direction != _IO_OUT or port != HV_HYPERCALL_TRAP_PORT or count != 1:
            return False
        done = self.trap_out_retired
        if done is None:
            rip = int(vcpu.get_regs().rip)
            trap = TRAP_INSTRUCTION
            done = self._read_linear(vp, rip - len(trap), len(trap)) == trap and self._read_linear(vp, rip, len(trap)) != trap
            self.trap_out_retired = done
        return done

    def highest_enabled(self, vp: VirtualProcessor) -> int:
        if self.vsm is None:
            return 0
        return int(self.vsm.highest_enabled_vtl(vp.index))

    def higher_vtl_pending(self, vp: VirtualProcessor) -> bool:
        """A higher VTL of this VP has a deliverable interrupt (RFLAGS.IF of the lower VTL is irrelevant)."""
        top = self.highest_enabled(vp)
        return any(apic.pending_vector() is not None for _vtl, apic in vp.apics.higher(vp.vtl, top))

    def pre_entry(self, vp: VirtualProcessor) -> None:
        """Called before entering the guest when interrupts may have changed (always after a switch)."""
        mirror = self.fast_switch.get(vp.index)
        if mirror is not None:
            if self._any_vtl_pending(vp):
                # A switch must hand the interrupt to the VTL it enters (or let a higher VTL's
                # preempt): Python's. Recomputed at the next entry where nothing is pending.
                mirror.ready = 0
                self._fast_stale.add(vp.index)
            elif vp.index in self._fast_stale:
                self._fast_stale.discard(vp.index)
                self.refresh_fast_switch(vp)
        if vp.index in self.resumed_lower:
            self.resumed_lower.discard(vp.index)
            if self._resumes_on_unenforced_page(vp):
                return
        top = self.highest_enabled(vp)
        for vtl, apic in vp.apics.higher(vp.vtl, top):
            if apic.pending_vector() is not None:
                self.switch(vp, vtl, SwitchReason.INTERRUPT)
                return
        if vp.vtl > 0:
            self.check_vina(vp)

    @staticmethod
    def _any_vtl_pending(vp: VirtualProcessor) -> bool:
        """An interrupt is deliverable in some VTL of ``vp`` (its APIC would take it if that VTL ran)."""
        return any(apic.pending_vector() is not None for apic in vp.apics)  # a VtlArray: one APIC per VTL

    def _resumes_on_unenforced_page(self, vp: VirtualProcessor) -> bool:
        """A lower VTL about to resume on a readable, non-executable page: the execute intercept.

        KVM would fetch from such a page without exiting (see memory_view); here, where
        the VP is at an instruction boundary after a VTL switch, the fetch is seen.
        """
        view = self.views[vp.vtl]
        target = self.fetch_target(vp)
        if target is None:
            return False
        gpa, linear = target
        if not execute_unenforced(view.allowed(gpa >> PAGE_SHIFT)):
            return False
        self.intercept(vp, gpa, Access.EXECUTE, 1, gva=linear)
        return True

    def check_vina(self, vp: VirtualProcessor) -> None:
        """VINA: a lower VTL has an interrupt ready while a higher one runs.

        The higher VTL is told once (VinaAsserted + its VINA vector) until it returns
        to a lower VTL; the VSM logic decides whether VINA is on and asserts it.
        """
        vsm = self.vsm
        key = (vp.index, vp.vtl)
        if vsm is None or key in self.vina_notified or not vsm.state.vp_vtl(vp.index, vp.vtl).vina_enabled:
            return
        if not any(apic.pending_vector() is not None for _vtl, apic in vp.apics.lower(vp.vtl)):
            return
        self.vina_notified.add(key)
        i, vtl = key
        self.boundary.entry(Entry.VINA, i, vtl, [i, vtl], lambda: vsm.notify_lower_vtl_interrupt(i, vtl))

    # -- VTL switches answered in C -----------------------------------------------------------
    def attach_fast_switch(self, vp_index: int, mirror: Any, hc_ffi: Any, guards: list[Any]) -> None:
        """Fill ``mirror`` (a ``struct vsm_hc_vtls`` of the hypercall fast path's module, ``hc_ffi``) for one
        VP: its two vCPUs, the KVM module's shared-state copy, the VTL views' guards. It starts not
        ready; :meth:`refresh_fast_switch` decides."""
        vp = self.machine.vps[vp_index]
        copier = self.copiers.get(vp_index)
        if len(vp.vcpus) != 2 or copier is None or len(guards) < 2:
            return
        pairs = [copier.native_pair(0, 1), copier.native_pair(1, 0)]
        if pairs[0] is None or pairs[1] is None:
            return
        for vtl, vcpu in enumerate(vp.vcpus):  # pointers of the KVM module's cffi, as addresses
            mirror.fd[vtl] = vcpu.fd
            mirror.run[vtl] = hc_ffi.cast("void *", _address(vcpu.run_struct))
            mirror.pair[vtl] = hc_ffi.cast("void *", _address(pairs[vtl]))
            mirror.guard[vtl] = guards[vtl]
        mirror.copy = hc_ffi.cast("vsm_hc_copy_fn", _address(ffi.addressof(lib, "vsm_copy_shared")))
        mirror.entry_reason_call = int(EntryReason.VTL_CALL)
        sink = self.machine.sink
        native = getattr(sink, "native_record", None) if sink.enabled else None
        if native is not None:  # recording: C records each switch it answers (vmm/backends/recorded_switch.py)
            if not self._records_switches:
                decoder = recorded_switch.RecordedSwitches()
                sink.register_native(recorded_switch.CALL, decoder)
                sink.register_native(recorded_switch.RETURN, decoder)
                self._records_switches = True
            fn, store = native
            mirror.record = hc_ffi.cast("vsm_hc_record_fn", fn)
            mirror.store = hc_ffi.cast("void *", store)
            mirror.vp = vp_index
        self._fast_ffi = hc_ffi
        self.fast_switch[vp_index] = mirror
        self._fast_stale.add(vp_index)  # decided before the VP's next entry, once the machine linked its vCPUs
        vp.interrupt_hint = True

    def invalidate_fast_switch(self) -> None:
        """VSM state a switch depends on changed (called with the partition lock held): stop every VP's
        C switches now; each recomputes its mirror before its next entry (pre_entry)."""
        for index, mirror in self.fast_switch.items():
            mirror.ready = 0
            self._fast_stale.add(index)
            self.machine.vps[index].interrupt_hint = True

    def refresh_fast_switch(self, vp: VirtualProcessor) -> None:
        """Whether a VTL call from VTL0 / fast return from VTL1 on ``vp`` does nothing but what the C
        fast path does (vmm/backends/_hypercall_fastpath_build.py, ``vsm_hc_vtls``)."""
        mirror = self.fast_switch.get(vp.index)
        vsm = self.vsm
        if mirror is None or vsm is None:
            return
        i = vp.index
        with vsm.lock:
            per = vsm.state.vps[i]
            ready = (
                vsm.hv.policy.vsm
                and vp.fast_run is not None
                and vsm.state.vtl_count == 2
                and self.trap_out_retired is not None
                and all(vcpu.sync_sregs and vcpu.sregs_exported for vcpu in vp.vcpus)
                and per[0].enabled
                and per[1].enabled
                and per[1].vina == 0  # no VINA, no AutoReset: entries and returns leave VinaStatus alone
                and not per[1].tlb_locks()  # a return would release them
                and (i, 1) not in self.vina_notified
            )
            gpa = vp_assist.control_gpa(vsm.hv, i, 1)
        mirror.control = self._fast_ffi.NULL  # no assist page, or not in RAM: nothing is written (as in Python)
        if gpa is not None:
            with contextlib.suppress(GuestMemoryError):
                address = self.machine.memory.host_address_of(gpa, HvVpVtlControl.SIZE)
                mirror.control = self._fast_ffi.cast("uint8_t *", address)
            mirror.control_gpa = gpa
            if mirror.record and mirror.control == self._fast_ffi.NULL:
                ready = False  # Python's read of it fails, and the record would not say how
        mirror.trap_retired = 1 if self.trap_out_retired else 0
        mirror.ready = 1 if ready else 0

    # -- protections: MMIO exits and fetch failures --------------------------------------------
    def on_mmio(self, vp: VirtualProcessor, gpa: int, length: int, is_write: bool) -> bool:
        memory = self.machine.memory
        if not memory.is_ram(gpa, length):
            return False  # a device, not a protection
        view = self.views[vp.vtl]
        access = Access.WRITE if is_write else Access.READ
        mmio = vp.vcpu.run_struct.mmio
        if view.check(gpa, length, access):
            if is_write:
                memory.write(gpa, bytes(mmio.data[0:length]))
            else:
                ffi.memmove(mmio.data, memory.read(gpa, length), length)
            self.machine.emit(EventKind.MMIO, vp, address=gpa, size=length, is_write=is_write, data=_as_int(mmio, length))
            return True
        self.intercept(vp, gpa, access, length)
        return True

    def on_internal_error(self, vp: VirtualProcessor) -> bool:
        """An instruction fetch from a hole is the execute intercept (RIP is at the target)."""
        target = self.fetch_target(vp)
        if target is None:
            return False
        gpa, linear = target
        if self.views[vp.vtl].check(gpa, 1, Access.EXECUTE):
            return False  # not a protection: a genuine emulation failure
        self.intercept(vp, gpa, Access.EXECUTE, 1, gva=linear)
        return True

    @staticmethod
    def fetch_target(vp: VirtualProcessor) -> tuple[int, int] | None:
        """(GPA, linear address) of the instruction at RIP, if it is guest RAM."""
        vcpu = vp.vcpu
        _rip, linear = rip_linear(vcpu)
        try:
            gpa, valid, _ = vcpu.translate(linear)
        except OSError:
            return None
        if not valid or not vp.machine.memory.is_ram(gpa):
            return None
        return gpa, linear

    def intercept(self, vp: VirtualProcessor, gpa: int, access: Access, length: int, gva: int | None = None) -> None:
        machine = self.machine
        vtl = vp.vtl
        target_vtl = self._next_higher(vp)
        if target_vtl is None:
            raise GuestStop(
                EXIT_GUEST_FAULT,
                f"VP {vp.index} VTL{vtl} {ACCESS_NAMES[access]} of protected {gpa:#x} with no higher VTL to intercept it",
            )
        denied = self.undo_denied_access(vp, gpa, access, length, gva)
        message, packed = denied.message, denied.message.pack()
        machine.emit(
            EventKind.INTERCEPT, vp, access=ACCESS_NAMES[access], gpa=gpa, gva=denied.gva, insn_bytes=denied.insn_bytes,
            message=packed,
        )  # fmt: skip
        hv, i = self.hv, vp.index
        assert hv is not None
        self.boundary.entry(
            Entry.POST_INTERCEPT, i, target_vtl, [i, target_vtl, packed],
            lambda: hv.post_intercept(i, target_vtl, message),
        )
        if vp.apics[target_vtl].pending_vector() is None:
            raise GuestStop(
                EXIT_GUEST_FAULT,
                f"VP {vp.index}: VTL{vtl} {ACCESS_NAMES[access]} of {gpa:#x} was intercepted, but VTL{target_vtl} "
                "cannot take the intercept message (SynIC SIMP/SINT0 not set up, or SINT0 masked)",
            )
        self.switch(vp, target_vtl, SwitchReason.INTERCEPT)

    def undo_denied_access(
        self, vp: VirtualProcessor, gpa: int, access: Access, length: int, gva: int | None = None
    ) -> DeniedAccess:
        """Undo a denied access of the running VTL and build its intercept message.

        The VP is left *at* the faulting instruction with the registers it had before it
        (a retired write is rewound, a pending read discarded). Re-execution calls this
        for a recorded intercept, so the rewind is the live one.
        """
        vtl = vp.vtl
        vcpu = vp.vcpu
        sregs = vcpu.get_sregs()
        mode = cpu_mode(sregs)
        regs = {name: int(getattr(vcpu.get_regs(), name)) for name in GPR_NAMES}
        bases = {"fs": int(sregs.fs.base), "gs": int(sregs.gs.base), "es": int(sregs.es.base)}
        translate, read_code = self._cached_walk(vp)
        located: Located | None
        if access is Access.WRITE:
            located = locate_write(regs["rip"], regs, mode, read_code, translate, gpa, bases, size=length)
            if located is None:
                raise GuestStop(
                    EXIT_GUEST_FAULT,
                    f"VP {vp.index} VTL{vtl}: denied {length}-byte write to {gpa:#x} by an instruction vsmtrace cannot "
                    f"locate (rip={regs['rip']:#x}, bytes before rip: {read_code(regs['rip'] - 16, 16).hex()}); "
                    "cannot deliver an exact intercept",
                )
            located.bytes = located.bytes or read_code(located.rip, located.length)
            restored = vcpu.get_regs()
            for name, value in located.before.items():
                setattr(restored, name, value & 0xFFFFFFFFFFFFFFFF)
            vcpu.set_regs(restored)
            regs.update({k: v & 0xFFFFFFFFFFFFFFFF for k, v in located.before.items()})
        elif access is Access.READ:
            located = decode_at(read_code, regs["rip"], mode)
            if located is not None:
                located.gva = read_target(located, regs, mode, read_code, bases) or 0
            clobbered = self._string_store_target(located, regs, bases, translate)
            discard_pending_read(vp, clobbered)
        else:
            located = Located(regs["rip"], 0, self._read_ram(gpa, 16), "", gva or regs["rip"], {})
        # Byte-compatible with the seed where the TLFS allows (docs/vsm.md): no GVA (GvaValid
        # clear), and the 16 bytes at the instruction's RIP (the decoded length is reported).
        insn_rip = located.rip if located is not None else regs["rip"]
        message = self.vsm.build_intercept(
            vp=vp.index,
            intercepted_vtl=vtl,
            access=access,
            gpa=gpa,
            gva=None,
            insn_bytes=read_code(insn_rip, 16) if access is not Access.EXECUTE else b"",
            insn_length=located.length if located is not None else 0,
            regs=regs,
            segments={name: segment_from_kvm(getattr(sregs, name)) for name in ("cs", "ds", "ss", "es")},
            cr0=int(sregs.cr0),
            efer=int(sregs.efer),
            cpl=int(sregs.cs.dpl),
            mode=mode,
        )
        return DeniedAccess(
            message, located.gva if located is not None and located.gva else gva, (located.bytes if located is not None else b"")[:16]
        )

    def _string_store_target(
        self, located: Located | None, regs: dict[str, int], bases: dict[str, int], translate: Callable[[int], int | None]
    ) -> tuple[int, bytes] | None:
        """For a ``movs`` whose source read is being discarded: the destination element it would store."""
        if located is None or not located.string_move_size:
            return None
        size = located.string_move_size
        gpa = translate(regs["rdi"] + bases.get("es", 0))
        if gpa is None or not self.machine.memory.is_ram(gpa, size):
            return None
        return gpa, self.machine.memory.read(gpa, size)

    def _next_higher(self, vp: VirtualProcessor) -> int | None:
        if self.vsm is None:
            return None
        higher = self.vsm.next_higher_vtl(vp.index, vp.vtl)
        return None if higher is None else int(higher)

    def tlb_wait(self, vp: VirtualProcessor) -> None:
        """Park a VP whose flush hit a TLB lock until the locking VTL returns (then it retries)."""
        vsm = self.vsm
        if vsm is None or not vsm.tlb_wait_pending(vp.index):
            return
        self.machine.note_suspended(
            vp, f"waits in a flush for {vsm.describe_tlb_locks()}", lambda: vsm.tlb_wait_pending(vp.index)
        )
        try:
            vp.wait(lambda: not vsm.tlb_wait_pending(vp.index))
        finally:
            self.machine.note_wake(vp)

    def _tlb_unlocked(self, vps: list[int]) -> None:
        for index in vps:
            if 0 <= index < len(self.machine.vps):
                self.machine.vps[index].kick()

    # -- guest memory as the VP sees it ------------------------------------------------------------
    def _cached_walk(
        self, vp: VirtualProcessor
    ) -> tuple[Callable[[int], int | None], Callable[[int, int], bytes]]:
        """Translate and read guest-linear memory of the running VTL, each page translated once."""
        translate = cached_translator(vp.vcpu)
        memory = self.machine.memory
        return translate, lambda linear, size: read_linear(memory, translate, linear, size)

    def _read_linear(self, vp: VirtualProcessor, linear: int, size: int) -> bytes:
        return read_linear(self.machine.memory, translator(vp.vcpu), linear, size)

    def _read_ram(self, gpa: int, size: int) -> bytes:
        try:
            return self.machine.memory.read(gpa, size)
        except GuestMemoryError:
            return b""


def _address(pointer: Any) -> int:
    """A KVM-module cffi pointer as an address, for a struct of another cffi module."""
    return int(ffi.cast("uintptr_t", pointer))


def complete_pending_io(vcpu: Any) -> None:
    """Finish a pending PIO/MMIO completion without running guest code (api.rst, KVM_EXIT_MMIO note).

    On hosts where KVM advances RIP only when the exit completes, this makes the
    vCPU's state final before another vCPU of the VP takes over.
    """
    run = vcpu.run_struct
    if run.exit_reason not in (lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO):
        return
    vcpu.flush_regs()
    run.immediate_exit = 1
    vcpu.run()
    run.immediate_exit = 0


def discard_pending_read(vp: VirtualProcessor, clobbered: tuple[int, bytes] | None = None) -> None:
    """Complete a pending MMIO read, then put every register back: the read never happened.

    KVM can only finish the read, not cancel it. A ``rep movs`` would go on to its next
    element, so RCX is cut to 1 first; the one destination element the completion
    stores (``clobbered``: its GPA and old bytes) is written back afterwards.
    """
    vcpu = vp.vcpu
    saved = ffi.new("struct kvm_regs *")
    ffi.memmove(saved, ffi.addressof(vcpu.get_regs()) if vcpu.sync_regs else vcpu.get_regs(), ffi.sizeof("struct kvm_regs"))
    xsave = vcpu.get_xsave()
    run = vcpu.run_struct
    ffi.memmove(run.mmio.data, bytes(8), 8)  # the completing read sees zeros, never protected data
    regs = vcpu.get_regs()
    regs.rcx = 1
    vcpu.set_regs(regs)
    complete_pending_io(vcpu)
    vcpu.set_regs(saved)
    vcpu.flush_regs()
    vcpu.set_xsave(xsave)
    if clobbered is not None:
        vp.machine.memory.write(clobbered[0], clobbered[1])


def _as_int(mmio: Any, length: int) -> int:
    return int.from_bytes(bytes(mmio.data[0:length]), "little")



