"""Moving a VP from one VTL's vCPU to another's.

Each VTL of a VP is its own KVM vCPU, so private state (RIP, RSP, RFLAGS, control
and segment registers, EFER, syscall MSRs, PAT, APIC, synthetic MSRs) never
moves: it stays in its vCPU. A switch copies only the state the TLFS calls shared
(vsm-facts §4.1): the general registers except RSP, CR2, DR0-DR3 and DR6, and the
x87/SSE/AVX state. GPRs travel through the ``kvm_run`` sync-regs area, so they cost no
ioctl; the rest is copied only when it differs from what the target already holds.
"""

from __future__ import annotations

import struct
from typing import Any

from vsmtrace.vmm.kvm.system import KvmError, Vcpu, ffi, lib

SHARED_GPRS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)  # fmt: skip
XSAVE_SIZE = ffi.sizeof("struct kvm_xsave")
REGS_SIZE = ffi.sizeof("struct kvm_regs")
#: The kvm_regs fields each VTL keeps to itself; all the others are SHARED_GPRS.
PRIVATE_REGS = ("rsp", "rip", "rflags")
assert {name for name, _ in ffi.typeof("struct kvm_regs").fields} == set(SHARED_GPRS) | set(PRIVATE_REGS)


# The shared GPRs as two byte ranges of struct kvm_regs: RAX..RDI, then RBP..R15 (RSP sits
# between them; RIP and RFLAGS follow R15).
_REGS_AT = ffi.offsetof("struct kvm_run", "s")
_FIRST = (_REGS_AT, _REGS_AT + ffi.offsetof("struct kvm_regs", "rsp"))
_SECOND = (_REGS_AT + ffi.offsetof("struct kvm_regs", "rbp"), _REGS_AT + ffi.offsetof("struct kvm_regs", "rip"))
assert [name for name, _ in ffi.typeof("struct kvm_regs").fields][6:8] == ["rsp", "rbp"], "kvm_regs layout changed"
assert [name for name, _ in ffi.typeof("struct kvm_regs").fields][-3:] == ["r15", "rip", "rflags"]
_DIRTY_AT = ffi.offsetof("struct kvm_run", "kvm_dirty_regs")
_CR2_AT = _REGS_AT + ffi.offsetof("struct kvm_sync_regs", "sregs") + ffi.offsetof("struct kvm_sregs", "cr2")
_U64 = struct.Struct("<Q")
_SYNC_REGS = int(lib.KVM_SYNC_X86_REGS)
_CR2 = int(lib.VSM_COPY_CR2)


def _cr2(vcpu: Vcpu) -> int:
    """CR2 from the exported kvm_run copy when KVM exports sregs (no cffi struct), else KVM_GET_SREGS."""
    if vcpu.sregs_exported:
        return _U64.unpack_from(vcpu.run_view, _CR2_AT)[0]
    return int(vcpu.get_sregs().cr2)


def _pointer(regs: Any) -> Any:
    """``get_regs`` gives the kvm_run struct itself with sync regs, else a pointer to a copy."""
    return regs if ffi.typeof(regs).kind == "pointer" else ffi.addressof(regs)


class SharedStateCopier:
    """Copies shared registers between the vCPUs of one VP, remembering what each holds.

    For each vCPU it keeps the debug registers and XSAVE image the vCPU held when it last
    stopped, valid while that vCPU's write counter (``debugregs_writes``, ``xsave_writes``)
    is unchanged: anyone else writing it (e.g. SetVpRegisters of an XMM register of a
    stopped VTL) bumps the counter and so invalidates the record. When the source's value
    equals the target's, the target's KVM_SET_* is skipped.

    With sync regs on both vCPUs the whole copy is one C call
    (``vsm_copy_shared`` in vmm/kvm/_ffi_build.py) over the kvm_run buffers and records
    allocated here once (CR2 comes back to Python only when it must be written, or when the
    exported copies are not current); otherwise it goes through the ioctl wrappers.
    """

    def __init__(self, vcpus: list[Vcpu]) -> None:
        self.vcpus = vcpus
        self.fpu_cache: list[tuple[int, bytes] | None] = [None] * len(vcpus)
        # (vcpu.debugregs_writes, (DR0-3, DR6)) as that vCPU held them when it last stopped
        self.dbg_cache: list[tuple[int, tuple[int, ...]] | None] = [None] * len(vcpus)
        self._held: Any = None
        self._pairs: dict[tuple[int, int], Any] = {}
        if vcpus and all(getattr(v, "sync_regs", 0) and hasattr(v, "run_struct") for v in vcpus):
            self._held = ffi.new("struct vsm_held[]", len(vcpus))
            for a, src in enumerate(vcpus):
                for b, dst in enumerate(vcpus):
                    if a != b:
                        self._pairs[a, b] = ffi.new("struct vsm_shared_pair *", {
                            "src_fd": src.fd, "dst_fd": dst.fd, "src_run": src.run_struct, "dst_run": dst.run_struct,
                            "src_held": self._held + a, "dst_held": self._held + b,
                            "src_writes": src.writes, "dst_writes": dst.writes,
                        })  # fmt: skip

    def native_pair(self, src_vtl: int, dst_vtl: int) -> Any:
        """The ``struct vsm_shared_pair`` the C copy uses for this direction, or None (no sync regs)."""
        return self._pairs.get((src_vtl, dst_vtl))

    def forget(self) -> None:
        """Drop every record of what the vCPUs hold (someone changed them behind the counters)."""
        self.fpu_cache = [None] * len(self.vcpus)
        self.dbg_cache = [None] * len(self.vcpus)
        if self._held is not None:
            for i in range(len(self.vcpus)):
                self._held[i].dbg_valid = 0
                self._held[i].fpu_valid = 0

    def copy(self, src_vtl: int, dst_vtl: int) -> None:
        src, dst = self.vcpus[src_vtl], self.vcpus[dst_vtl]
        pair = self._pairs.get((src_vtl, dst_vtl))
        if pair is not None:
            exported = src.sregs_exported and dst.sregs_exported  # both kvm_run sregs copies current
            wrote = lib.vsm_copy_shared(pair, exported)  # counts its own writes in the vCPUs' counters
            if wrote < 0:
                raise KvmError("VTL switch (KVM_GET/SET_DEBUGREGS, KVM_GET/SET_XSAVE)", -wrote)
            if wrote & _CR2:  # differs, or not known from kvm_run: compare and write here
                self._copy_cr2(src, dst)
            return
        if src.sync_regs and dst.sync_regs:
            # Both in kvm_run: the shared bytes move view to view, the target's private ones stay.
            s_view, d_view = src.run_view, dst.run_view
            d_view[_FIRST[0] : _FIRST[1]] = s_view[_FIRST[0] : _FIRST[1]]
            d_view[_SECOND[0] : _SECOND[1]] = s_view[_SECOND[0] : _SECOND[1]]
            _U64.pack_into(d_view, _DIRTY_AT, _U64.unpack_from(d_view, _DIRTY_AT)[0] | _SYNC_REGS)
        else:
            s_regs: Any = src.get_regs()
            d_regs: Any = dst.get_regs()
            # Copy the whole struct in one move and put back the target's PRIVATE_REGS.
            rsp, rip, rflags = d_regs.rsp, d_regs.rip, d_regs.rflags
            ffi.memmove(_pointer(d_regs), _pointer(s_regs), REGS_SIZE)
            d_regs.rsp, d_regs.rip, d_regs.rflags = rsp, rip, rflags
            dst.set_regs(d_regs)

        self._copy_cr2(src, dst)

        # The source's DR0-3/DR6 are read every time (the guest writes them without an
        # exit); the target's are known from when it last stopped, unless someone has
        # called KVM_SET_DEBUGREGS on it since.
        s_dbg = src.get_debugregs()
        db = s_dbg.db
        shared = (db[0], db[1], db[2], db[3], s_dbg.dr6)
        self.dbg_cache[src_vtl] = (src.debugregs_writes, shared)
        if self.dbg_cache[dst_vtl] != (dst.debugregs_writes, shared):
            d_dbg = dst.get_debugregs()
            if list(db) != list(d_dbg.db) or s_dbg.dr6 != d_dbg.dr6:
                for i in range(4):
                    d_dbg.db[i] = db[i]
                d_dbg.dr6 = s_dbg.dr6
                dst.set_debugregs(d_dbg)
            self.dbg_cache[dst_vtl] = (dst.debugregs_writes, shared)

        # x87/SSE/AVX travel as one XSAVE image (KVM_SET_FPU would leave XSTATE_BV.SSE
        # clear, and the guest would see the SSE init state).
        xsave = src.get_xsave()
        image = bytes(ffi.buffer(xsave, XSAVE_SIZE))
        self.fpu_cache[src_vtl] = (src.xsave_writes, image)
        if self.fpu_cache[dst_vtl] != (dst.xsave_writes, image):
            dst.set_xsave(xsave)
            self.fpu_cache[dst_vtl] = (dst.xsave_writes, image)

    @staticmethod
    def _copy_cr2(src: Vcpu, dst: Vcpu) -> None:
        cr2 = _cr2(src)
        if cr2 != _cr2(dst):
            d_sregs = dst.get_sregs()
            d_sregs.cr2 = cr2
            dst.flush_regs()
            dst.set_sregs(d_sregs)
