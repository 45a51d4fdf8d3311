"""Safe wrappers for the KVM system, VM and vCPU file descriptors.

Every failing ioctl raises :class:`KvmError` naming the ioctl and errno, so a
caller never has to decode a bare ``-1``.
"""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from vsmtrace.vmm.kvm.bindings import ffi_lib

ffi: Any
lib: Any
ffi, lib = ffi_lib()

KVM_API_VERSION = 12
MAX_CPUID_ENTRIES = 256


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""

    def __init__(self, what: str, err: int) -> None:
        super().__init__(err, f"{what} failed: {os.strerror(err)} (errno {err})")
        self.what = what


class KvmUnavailable(RuntimeError):
    """/dev/kvm cannot be used (missing, no permission, wrong API, missing capability)."""


def _check(what: str, r: int) -> int:
    if r < 0:
        raise KvmError(what, ffi.errno)
    return r


@dataclass(frozen=True)
class MemoryRegion:
    slot: int
    guest_phys_addr: int
    size: int
    userspace_addr: int
    readonly: bool = False


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd or run on a KVM-capable machine)"
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: run as root or add your user to the 'kvm' group"
            ) from None
        except OSError as exc:  # a directory, a device without a driver, ...: still a one-line error
            raise KvmUnavailable(f"cannot open {path}: {exc.strerror}") from None
        version = lib.ioctl(self.fd, lib.KVM_GET_API_VERSION, ffi.cast("int", 0))
        if version < 0:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device (KVM_GET_API_VERSION failed: {os.strerror(ffi.errno)})")
        if version != KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} speaks KVM API {version}, vsmtrace needs {KVM_API_VERSION}")
        self.vcpu_mmap_size = _check(
            "KVM_GET_VCPU_MMAP_SIZE", lib.ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, ffi.cast("int", 0))
        )

    def check_extension(self, cap: int) -> int:
        r = lib.ioctl(self.fd, lib.KVM_CHECK_EXTENSION, ffi.cast("long", cap))
        return max(r, 0)

    def require(self, cap: int, name: str) -> int:
        value = self.check_extension(cap)
        if value <= 0:
            raise KvmUnavailable(f"this KVM lacks {name}, which vsmtrace needs")
        return value

    def supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """(function, index, flags, eax, ebx, ecx, edx) for every leaf KVM supports."""
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": MAX_CPUID_ENTRIES, "entries": MAX_CPUID_ENTRIES})
        buf.nent = MAX_CPUID_ENTRIES
        _check("KVM_GET_SUPPORTED_CPUID", lib.ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf))
        return [
            (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (buf.entries[i] for i in range(buf.nent))
        ]

    def tsc_khz(self, vcpu: Vcpu) -> int:
        return _check("KVM_GET_TSC_KHZ", lib.ioctl(vcpu.fd, lib.KVM_GET_TSC_KHZ, ffi.cast("int", 0)))

    def create_vm(self) -> Vm:
        """A new VM. Retried when a signal interrupts it (EINTR), as Python retries its own system calls.

        KVM can give up creating a VM when a signal arrives meanwhile (here ~3% of creations
        under a stream of signals): a Ctrl-C at start-up, which the caller handles, must not
        turn into "KVM refused to set up the guest" (status 2).
        """
        while True:
            fd = lib.ioctl(self.fd, lib.KVM_CREATE_VM, ffi.cast("long", 0))
            if fd >= 0 or ffi.errno != errno.EINTR:
                return Vm(self, _check("KVM_CREATE_VM", fd))

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A KVM VM: memslots, VM-wide capabilities, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.regions: dict[int, MemoryRegion] = {}
        self.vcpus: list[Vcpu] = []

    def check_extension(self, cap: int) -> int:
        r = lib.ioctl(self.fd, lib.KVM_CHECK_EXTENSION, ffi.cast("long", cap))
        return max(r, 0)

    def set_memory_region(self, region: MemoryRegion) -> None:
        """Create, move or (with size 0) delete a memslot."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot = region.slot
        r.flags = lib.KVM_MEM_READONLY if region.readonly else 0
        r.guest_phys_addr = region.guest_phys_addr
        r.memory_size = region.size
        r.userspace_addr = region.userspace_addr
        _check(
            f"KVM_SET_USER_MEMORY_REGION(slot {region.slot}, gpa {region.guest_phys_addr:#x}, {region.size:#x} bytes)",
            lib.ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, r),
        )
        if region.size:
            self.regions[region.slot] = region
        else:
            self.regions.pop(region.slot, None)

    def set_tss_addr(self, addr: int) -> None:
        _check("KVM_SET_TSS_ADDR", lib.ioctl(self.fd, lib.KVM_SET_TSS_ADDR, ffi.cast("unsigned long", addr)))

    def set_identity_map_addr(self, addr: int) -> None:
        p = ffi.new("__u64 *", addr)
        _check("KVM_SET_IDENTITY_MAP_ADDR", lib.ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, p))

    def enable_cap(self, cap: int, *args: int) -> None:
        c = ffi.new("struct kvm_enable_cap *")
        c.cap = cap
        for i, a in enumerate(args):
            c.args[i] = a
        _check(f"KVM_ENABLE_CAP({cap})", lib.ioctl(self.fd, lib.KVM_ENABLE_CAP, c))

    def set_msr_filter(self, denied_ranges: list[tuple[int, int]]) -> None:
        """Deny (route to userspace) reads and writes of each ``(base, count)`` MSR range."""
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep = []
        for i, (base, count) in enumerate(denied_ranges):
            bitmap = ffi.new("__u8[]", (count + 7) // 8)  # all zero: denied
            keep.append(bitmap)
            f.ranges[i].flags = lib.KVM_MSR_FILTER_READ | lib.KVM_MSR_FILTER_WRITE
            f.ranges[i].nmsrs = count
            f.ranges[i].base = base
            f.ranges[i].bitmap = bitmap
        _check("KVM_X86_SET_MSR_FILTER", lib.ioctl(self.fd, lib.KVM_X86_SET_MSR_FILTER, f))

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _check(f"KVM_CREATE_VCPU({index})", lib.ioctl(self.fd, lib.KVM_CREATE_VCPU, ffi.cast("long", index)))
        vcpu = Vcpu(self, fd, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        os.close(self.fd)


class Vcpu:
    """A vCPU: its kvm_run page, registers and events.

    With KVM_CAP_SYNC_REGS the general registers travel in ``kvm_run`` itself, so
    reading or writing them on an exit costs no ioctl.
    """

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        size = vm.kvm.vcpu_mmap_size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_struct: Any = ffi.cast("struct kvm_run *", ffi.from_buffer(self._map))
        self.run_view = memoryview(self._map)  # raw bytes of kvm_run, for struct-based hot paths
        self._sregs: Any = None  # per-exit cache of KVM_GET_SREGS
        # KVM_SET_DEBUGREGS and KVM_SET_XSAVE/KVM_SET_FPU calls so far, in C memory: the VTL switch
        # copies in C (vsm_copy_shared) count theirs there too.
        self.writes: Any = ffi.new("struct vsm_vcpu_writes *")
        self.sregs_writes = 0  # KVM_SET_SREGS calls so far (lets values derived from sregs be cached)
        sync = vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS)
        self.sync_regs = sync & lib.KVM_SYNC_X86_REGS
        # With KVM_SYNC_X86_SREGS the special registers arrive with every exit: reading
        # CPL, mode or CR2 then costs no ioctl (each one is several µs on some backends).
        self.sync_sregs = bool(self.sync_regs and sync & lib.KVM_SYNC_X86_SREGS)
        self.sregs_exported = False  # kvm_run holds this vCPU's sregs (it has exited once)
        # struct vsm_exit_recorder when the machine records port-I/O exits in C (vsm_kvm_run_recorded).
        self.exit_recorder: Any = None
        # struct vsm_fastpath when MSR reads or hypercalls are answered in C (vsm_kvm_run_fast).
        self.fastpath: Any = None
        if self.sync_regs:
            self.run_struct.kvm_valid_regs = lib.KVM_SYNC_X86_REGS | (lib.KVM_SYNC_X86_SREGS if self.sync_sregs else 0)

    # -- running -------------------------------------------------------------
    def run(self) -> int:
        """KVM_RUN once; returns 0 or ``-errno`` (``-EINTR`` when kicked)."""
        self._sregs = None
        r = lib.vsm_kvm_run(self.fd)
        self.exited()
        if r < 0 and r != -errno.EINTR and r != -errno.EAGAIN:
            raise KvmError("KVM_RUN", -r)
        return r

    # -- registers -------------------------------------------------------------
    def get_regs(self) -> Any:
        """The GPRs, RIP and RFLAGS (a live view into kvm_run when sync regs are on)."""
        if self.sync_regs:
            return self.run_struct.s.regs.regs
        regs = ffi.new("struct kvm_regs *")
        _check("KVM_GET_REGS", lib.ioctl(self.fd, lib.KVM_GET_REGS, regs))
        return regs

    def set_regs(self, regs: Any) -> None:
        if self.sync_regs:
            if regs != self.run_struct.s.regs.regs:
                ffi.memmove(ffi.addressof(self.run_struct.s.regs.regs), regs, ffi.sizeof("struct kvm_regs"))
            self.run_struct.kvm_dirty_regs |= lib.KVM_SYNC_X86_REGS
            return
        _check("KVM_SET_REGS", lib.ioctl(self.fd, lib.KVM_SET_REGS, regs))

    def mark_regs_dirty(self) -> None:
        """After editing the view returned by :meth:`get_regs` in place."""
        if self.sync_regs:
            self.run_struct.kvm_dirty_regs |= lib.KVM_SYNC_X86_REGS
        else:
            raise RuntimeError("mark_regs_dirty without sync regs")

    def flush_regs(self) -> None:
        """Push sync-reg edits now (before an ioctl that reads registers)."""
        if self.sync_regs and self.run_struct.kvm_dirty_regs & lib.KVM_SYNC_X86_REGS:
            _check("KVM_SET_REGS", lib.ioctl(self.fd, lib.KVM_SET_REGS, ffi.addressof(self.run_struct.s.regs.regs)))
            self.run_struct.kvm_dirty_regs &= ~lib.KVM_SYNC_X86_REGS

    def get_sregs(self) -> Any:
        """Special registers, read once per exit: the copy is kept until the vCPU runs again.

        Several handlers of one exit (mode, CPL, CR2...) each need them; one ioctl serves
        all. Treat the result as read-only unless you hand it back to :meth:`set_sregs`.
        """
        cached = self._sregs
        if cached is not None:
            return cached
        if self.sregs_exported:
            self._sregs = ffi.addressof(self.run_struct.s.regs.sregs)
            return self._sregs
        s = ffi.new("struct kvm_sregs *")
        _check("KVM_GET_SREGS", lib.ioctl(self.fd, lib.KVM_GET_SREGS, s))
        self._sregs = s
        return s

    def set_sregs(self, s: Any) -> None:
        """KVM_SET_SREGS, never injecting an interrupt.

        KVM queues the lowest vector set in ``interrupt_bitmap`` as an injected interrupt,
        and the copy KVM exports in ``kvm_run`` (or an earlier KVM_GET_SREGS) can still name a
        vector that has since been delivered: writing it back delivers it again, even with
        RFLAGS.IF = 0 (issue 12 item 3). No caller means to inject through sregs (interrupts
        go through KVM_INTERRUPT), and an empty bitmap leaves an injection KVM has in flight
        untouched, so the bitmap is always cleared first.
        """
        self._sregs = None
        self.sregs_writes += 1
        for i in range(len(s.interrupt_bitmap)):
            s.interrupt_bitmap[i] = 0
        _check("KVM_SET_SREGS", lib.ioctl(self.fd, lib.KVM_SET_SREGS, s))
        if self.sregs_exported:
            mirror = ffi.addressof(self.run_struct.s.regs.sregs)
            if s != mirror:
                ffi.memmove(mirror, s, ffi.sizeof("struct kvm_sregs"))  # keep kvm_run's copy current
            self._sregs = mirror
        else:
            self._sregs = s

    def exited(self) -> None:
        """KVM_RUN returned: registers KVM exported into kvm_run are current again."""
        self._sregs = None
        if self.sync_sregs:
            self.sregs_exported = True

    def invalidate_cache(self) -> None:
        """The vCPU ran (or KVM changed its state): cached register copies are stale."""
        self._sregs = None

    def _get(self, ctype: str, request: str) -> Any:
        """A new ``ctype`` filled by the ``request`` ioctl (KVM_GET_*)."""
        out = ffi.new(ctype)
        _check(request, lib.ioctl(self.fd, getattr(lib, request), out))
        return out

    def _set(self, request: str, value: Any) -> None:
        _check(request, lib.ioctl(self.fd, getattr(lib, request), value))

    def get_fpu(self) -> Any:
        return self._get("struct kvm_fpu *", "KVM_GET_FPU")

    @property
    def debugregs_writes(self) -> int:
        """KVM_SET_DEBUGREGS calls so far (lets callers that cache a stopped vCPU's debug registers notice)."""
        return int(self.writes.dbg)

    @property
    def xsave_writes(self) -> int:
        """KVM_SET_XSAVE / KVM_SET_FPU calls so far (lets callers that cache a stopped vCPU's FPU state notice)."""
        return int(self.writes.xsave)

    def set_fpu(self, f: Any) -> None:
        self.writes.xsave += 1
        self._set("KVM_SET_FPU", f)

    def get_xsave(self) -> Any:
        return self._get("struct kvm_xsave *", "KVM_GET_XSAVE")

    def set_xsave(self, x: Any) -> None:
        self.writes.xsave += 1
        self._set("KVM_SET_XSAVE", x)

    def get_xcrs(self) -> Any:
        return self._get("struct kvm_xcrs *", "KVM_GET_XCRS")

    def set_xcrs(self, x: Any) -> None:
        self._set("KVM_SET_XCRS", x)

    def get_debugregs(self) -> Any:
        return self._get("struct kvm_debugregs *", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, d: Any) -> None:
        self.writes.dbg += 1
        self._set("KVM_SET_DEBUGREGS", d)

    def get_events(self) -> Any:
        return self._get("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS")

    def set_events(self, e: Any) -> None:
        self._set("KVM_SET_VCPU_EVENTS", e)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        m = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = _check("KVM_GET_MSRS", lib.ioctl(self.fd, lib.KVM_GET_MSRS, m))
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        m = ffi.new("struct kvm_msrs *", {"entries": len(values)})
        m.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            m.entries[i].index = idx
            m.entries[i].data = val
        n = _check("KVM_SET_MSRS", lib.ioctl(self.fd, lib.KVM_SET_MSRS, m))
        if n != len(values):
            bad = list(values)[n]
            raise KvmError(f"KVM_SET_MSRS(MSR {bad:#x})", errno.EINVAL)

    def set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        c = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
        c.nent = len(entries)
        for i, (fn, idx, flags, a, b, cc, d) in enumerate(entries):
            e = c.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, flags, a, b, cc, d
        _check("KVM_SET_CPUID2", lib.ioctl(self.fd, lib.KVM_SET_CPUID2, c))

    def interrupt(self, vector: int) -> None:
        irq = ffi.new("struct kvm_interrupt *", {"irq": vector})
        _check(f"KVM_INTERRUPT({vector:#x})", lib.ioctl(self.fd, lib.KVM_INTERRUPT, irq))

    def nmi(self) -> None:
        _check("KVM_NMI", lib.ioctl(self.fd, lib.KVM_NMI, ffi.cast("long", 0)))

    def translate(self, gva: int) -> tuple[int, bool, bool]:
        t = ffi.new("struct kvm_translation *", {"linear_address": gva})
        _check("KVM_TRANSLATE", lib.ioctl(self.fd, lib.KVM_TRANSLATE, t))
        return t.physical_address, bool(t.valid), bool(t.writeable)

    def tsc_khz(self) -> int:
        return _check("KVM_GET_TSC_KHZ", lib.ioctl(self.fd, lib.KVM_GET_TSC_KHZ, ffi.cast("int", 0)))

    def _tsc_attr(self, value: Any) -> Any:
        attr = ffi.new("struct kvm_device_attr *")
        attr.group = lib.KVM_VCPU_TSC_CTRL
        attr.attr = lib.KVM_VCPU_TSC_OFFSET
        attr.addr = int(ffi.cast("uintptr_t", value))
        return attr

    def has_tsc_offset_attr(self) -> bool:
        attr = self._tsc_attr(ffi.new("__u64 *"))
        return lib.ioctl(self.fd, lib.KVM_HAS_DEVICE_ATTR, attr) == 0

    def get_tsc_offset(self) -> int:
        value = ffi.new("__u64 *")
        _check("KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)", lib.ioctl(self.fd, lib.KVM_GET_DEVICE_ATTR, self._tsc_attr(value)))
        return int(value[0])

    def set_tsc_offset(self, offset: int) -> None:
        value = ffi.new("__u64 *", offset & 0xFFFFFFFFFFFFFFFF)
        _check("KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)", lib.ioctl(self.fd, lib.KVM_SET_DEVICE_ATTR, self._tsc_attr(value)))

    def close(self) -> None:
        self.run_view.release()
        try:
            self._map.close()
        except BufferError:
            pass
        os.close(self.fd)
