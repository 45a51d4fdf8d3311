"""The partition: guest RAM, one KVM VM per VTL, the VPs, devices, MSR routing and stopping.

The VPs and their run loop are :mod:`vmm.virtual_processor`; this module owns what
is shared by all of them (docs/architecture.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from vsmtrace.vmm.config import MachineConfig
from vsmtrace.vmm.console_input import STDIN_FEEDER
from vsmtrace.vmm.console_output import ConsoleLines
from vsmtrace.vmm.cpu_state import MSR_IA32_TSC, apply_boot_state
from vsmtrace.vmm.cpuid import CpuidPolicy, build_cpuid
from vsmtrace.vmm.cpuid_probe import ineffective_hiding
from vsmtrace.vmm.deterministic import DeterministicTime
from vsmtrace.vmm.devices.apic import ApicRouter
from vsmtrace.vmm.devices.bus import MmioBus, PioBus
from vsmtrace.vmm.devices.cmos_rtc import RTC_INDEX_PORT, RTC_PORT_COUNT, CmosRtc
from vsmtrace.vmm.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from vsmtrace.vmm.devices.fw_cfg import FW_CFG_PORT_COUNT, FW_CFG_SELECTOR_PORT, FwCfg
from vsmtrace.vmm.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from vsmtrace.vmm.devices.ioapic import IOAPIC_BASE, IOAPIC_MMIO_SIZE, IoApic
from vsmtrace.vmm.devices.legacy import PIC_MASTER, PIC_PORTS, PIC_SLAVE, POST_PORT, Ignore, Pic8259Stub
from vsmtrace.vmm.devices.pc_testdev import IOMEM_BASE, IOMEM_SIZE, PcTestdev
from vsmtrace.vmm.devices.port92 import PORT92, Port92
from vsmtrace.vmm.devices.reset_control import RESET_CONTROL_PORT, ResetControl
from vsmtrace.vmm.devices.serial import COM1_BASE, COM1_IRQ, PORT_COUNT, Uart16550
from vsmtrace.vmm.events import EventKind, EventSink, NullSink
from vsmtrace.vmm.extension import CpuidEntry, MachineExtension, TrapHandler, overriding
from vsmtrace.vmm.firmware.acpi import IoApicInfo, build_acpi_tables
from vsmtrace.vmm.kvm.system import Kvm, KvmUnavailable, Vcpu, Vm, ffi, lib
from vsmtrace.vmm.loader.kernel import Module, load_kernel
from vsmtrace.vmm.memory import GuestMemory
from vsmtrace.vmm.memory_view import MemoryView
from vsmtrace.vmm.stops import (
    EXIT_GUEST_FAULT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RESET,
    EXIT_TIMEOUT,
    EXIT_VMM_ERROR,
    MsrFault,
)
from vsmtrace.vmm.timers import ManualClock, TimerService
from vsmtrace.vmm.virtual_processor import APIC_TIMER_HZ, VirtualProcessor, VpState
from vsmtrace.vmm.vp import Access, VtlAccessDenied
from vsmtrace.vmm.vtl_array import VtlArray

from vsmtrace import __version__

log = logging.getLogger("vsmtrace.machine")
E = TypeVar("E", bound=MachineExtension)

MSR_IA32_APIC_BASE = 0x1B
TSC_OFFSET_SAMPLES = 8  # KVM_GET_MSRS brackets tried when KVM cannot tell the TSC offset (init_clock)
U64_MASK = (1 << 64) - 1
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000
FW_CFG_VERSION_FILE = "etc/vsmtrace/version"
MSR_EXIT_REASONS = ("KVM_MSR_EXIT_REASON_INVAL", "KVM_MSR_EXIT_REASON_UNKNOWN", "KVM_MSR_EXIT_REASON_FILTER")
PORTS = 1 << 16



def _any(hooks: list[Callable[..., bool]]) -> Callable[..., bool] | None:
    """One hook that is true if any of ``hooks`` is (asked in order, stops at the first); None for none."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None
    return lambda *args: any(hook(*args) for hook in hooks)


def _each(hooks: list[Callable[..., None]]) -> Callable[..., None] | None:
    """One hook that calls each of ``hooks`` in order; None for none."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def call(*args: Any) -> None:
        for hook in hooks:
            hook(*args)

    return call


class GuestClock:
    """Host monotonic time, and the guest's real TSC (host TSC + KVM's offset).

    TSC-deadline timers compare against the TSC the guest reads, so the clock
    must return exactly that, not a TSC made up from elapsed time.
    """

    def __init__(self, tsc_offset: int) -> None:
        self.tsc_offset = tsc_offset

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def tsc(self) -> int:
        return (int(lib.vsm_rdtsc()) + self.tsc_offset) & 0xFFFFFFFFFFFFFFFF


def _port_bitmap(ports: Iterable[int]) -> Any:
    """A C bitmap of the 65536 I/O ports (one bit each) with these ports set."""
    bitmap = ffi.new("uint8_t[]", PORTS // 8)
    for port in ports:
        bitmap[port >> 3] |= 1 << (port & 7)
    return bitmap


class Machine:
    """A partition: guest RAM, one KVM VM per VTL, VPs, devices and the event sink."""

    def __init__(
        self,
        config: MachineConfig,
        sink: EventSink | None = None,
        *,
        kvm_path: str | None = None,
        extensions: Sequence[MachineExtension] = (),
    ) -> None:
        """A bare machine plus ``extensions`` (vmm/builder.py chooses them from the configuration)."""
        config.validate()
        self.config = config
        self.sink: EventSink = sink if sink is not None else NullSink()
        self.kvm = Kvm(kvm_path or config.kvm_device)
        self._check_capabilities()
        self.capabilities = self._capabilities()
        self.memory = GuestMemory(config.memory_mib)
        self.stopping = False
        self.booted = False
        self.stop_event = threading.Event()
        self.exit_status: int | None = None
        self.stop_message = ""
        self.interrupted = False  # set by interrupt() (a signal handler), acted on by run()
        self.rebooting = False  # the run ended in a reset the caller carries out (a fresh machine, vsmtrace.session)
        self.refclock: Any = None  # struct vsm_refclock, see reference_counter
        self._fast_io_keep: list[Any] = []  # (function, context) of the C I/O servers the fast path calls
        self._idle_out: Any = None  # bitmap of ports whose OUT the fast path completes (attach_fastpath)
        self._stop_lock = threading.Lock()
        self._warned: set[object] = set()
        self._halt_lock = threading.Lock()
        self.halted_no_if: set[int] = set()
        #: VPs suspended in a flush hypercall by a TLB lock, with what they wait for.
        self.suspended: dict[int, tuple[str, Callable[[], bool]]] = {}
        self._recorded_ports: Any = None  # bitmap of ports whose OUTs KVM_RUN records in C

        self.views: VtlArray[MemoryView] | None = None  # one per VTL, once RAM is mapped (map_ram)
        self.apic_timer_hz = APIC_TIMER_HZ
        self.cpuid_policy = CpuidPolicy()

        self.vms: VtlArray[Vm] = VtlArray(config.vtls, lambda _vtl: self._create_vm())
        self.supported_cpuid = self.kvm.supported_cpuid()

        self.pio = PioBus()
        self.mmio = MmioBus()
        self.serial = Uart16550(config.serial_out, on_output=self._on_serial)
        self.console = ConsoleLines()  # the UART's output as SERIAL events, a line each
        self.pio.add(COM1_BASE, PORT_COUNT, self.serial)
        self.pio.add(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit(self._on_debug_exit))
        self.fw_cfg = FwCfg(self.memory.size, config.smp, config.cmdline)
        self.fw_cfg.add_file(FW_CFG_VERSION_FILE, __version__.encode())  # lets a guest tell it runs under vsmtrace
        self.pio.add(FW_CFG_SELECTOR_PORT, FW_CFG_PORT_COUNT, self.fw_cfg)
        for port, device in ((RESET_CONTROL_PORT, ResetControl(self.request_reset)), (PORT92, Port92(self.request_reset)),
                             (I8042_DATA_PORT, (kbc := I8042(self.request_reset))), (I8042_COMMAND_PORT, kbc)):  # fmt: skip
            self.pio.add(port, 1, device)
        pic = Pic8259Stub()
        self.pio.add(PIC_MASTER, PIC_PORTS, pic)
        self.pio.add(PIC_SLAVE, PIC_PORTS, pic)
        self.pio.add(POST_PORT, 1, Ignore())
        self.pio.add(RTC_INDEX_PORT, RTC_PORT_COUNT, CmosRtc())

        self.timers: TimerService | None = None
        self.routers: VtlArray[ApicRouter] = VtlArray(
            len(self.vms), lambda _vtl: ApicRouter(on_init=self._route_init, on_sipi=self._route_sipi, on_nmi=self._route_nmi)
        )
        # The I/O APIC sends to VTL0's local APICs (a higher VTL has no legacy devices).
        self.ioapic = IoApic(self.routers[0])
        self.ioapic_info = IoApicInfo(self.ioapic.reset_id, IOAPIC_BASE, 0)  # what the MADT lists
        self.mmio.add(IOAPIC_BASE, IOAPIC_MMIO_SIZE, self.ioapic)
        self.serial.irq = lambda level: self.ioapic.set_isa_irq(COM1_IRQ, level)
        self.pc_testdev = PcTestdev(self.ioapic.set_isa_irq, self.ioapic.set_irq)
        for first, count in self.pc_testdev.port_ranges():
            self.pio.add(first, count, self.pc_testdev)
        self.mmio.add(IOMEM_BASE, IOMEM_SIZE, self.pc_testdev)
        self.vps: list[VirtualProcessor] = []
        # The layers above the bare machine (Hyper-V, VSM), then what they contribute; the
        # exit-path hooks are resolved once, so a machine without them pays nothing.
        self.extensions: tuple[MachineExtension, ...] = tuple(extensions)
        for ext in self.extensions:
            ext.attach(self)
        exts = list(self.extensions)
        self.extra_cpuid: list[CpuidEntry] = [e for ext in exts for e in ext.cpuid_entries()]
        self.cpuid_policy.hypervisor_bit = any(ext.hypervisor_present() for ext in exts)
        if config.hyperv is not None and config.hyperv.enabled and not self.cpuid_policy.hypervisor_bit:
            raise TypeError("this configuration enables Hyper-V: build the machine with vsmtrace.vmm.builder.build_machine")
        self.msr_handlers: list[tuple[int, int, Any]] = [r for ext in exts for r in ext.msr_ranges()]
        self.trap_ports: dict[int, TrapHandler] = {p: h for ext in exts for p, h in ext.trap_ports().items()}
        for ext in exts:
            for port, count, device in ext.pio_devices():
                self.pio.add(port, count, device)
        self._fast_msrs = overriding(exts, "fast_msr_values")
        self._fast_io = overriding(exts, "fast_io_server")
        self.mmio_hook: Callable[[VirtualProcessor, int, int, bool], bool] | None = _any(overriding(exts, "on_mmio"))
        self.internal_error_hook: Callable[[VirtualProcessor], bool] | None = _any(overriding(exts, "on_internal_error"))
        self.wake_hook: Callable[[VirtualProcessor], bool] | None = _any(overriding(exts, "can_wake"))
        self.pre_entry_hook: Callable[[VirtualProcessor], None] | None = _each(overriding(exts, "pre_entry"))
        self.on_interrupt_acknowledged: Callable[[VirtualProcessor, int], None] | None = _each(
            overriding(exts, "interrupt_acknowledged")
        )
        self.on_apic_eoi: Callable[[int, int, int], None] | None = _each(overriding(exts, "apic_eoi"))
        clocks = overriding(exts, "reference_time")
        self._reference_clock: Callable[[], int | None] | None = clocks[0] if clocks else None
        self.tsc_hz = 0
        self.tsc_offset = 0
        self.tsc_offset_exact = False  # KVM_VCPU_TSC_OFFSET gave it (else estimated, see init_clock)
        self.clock: GuestClock | ManualClock | None = None
        self.deterministic: DeterministicTime | None = None  # --deterministic: time moves at exits only
        # The vCPUs exist from here on (their CPUID is final); boot() loads the kernel and
        # lets later layers (Hyper-V, VSM) attach, after a recorder may have been plugged in.
        self.vps = [VirtualProcessor(self, i) for i in range(config.smp)]
        # CPUID bits the policy hides that guest kernel code still sees (vmm/cpuid_probe.py)
        self.cpuid_hiding_ineffective = ineffective_hiding(self.kvm, self.vps[0].cpuid_tables[0], self.cpuid_policy)
        for vp in self.vps:
            for vtl, apic in enumerate(vp.apics):
                self.routers[vtl].add(apic)
            vp.apics[0].on_eoi_broadcast = self.ioapic.eoi

    # -- construction ----------------------------------------------------------------
    def _check_capabilities(self) -> None:
        k = self.kvm
        k.require(lib.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY")
        k.require(lib.KVM_CAP_X86_USER_SPACE_MSR, "KVM_CAP_X86_USER_SPACE_MSR (user-space MSR exits)")
        k.require(lib.KVM_CAP_X86_MSR_FILTER, "KVM_CAP_X86_MSR_FILTER")
        k.require(lib.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT")
        k.require(lib.KVM_CAP_GET_TSC_KHZ, "KVM_CAP_GET_TSC_KHZ")
        max_vcpus = k.check_extension(lib.KVM_CAP_MAX_VCPUS) or 1
        if self.config.smp > max_vcpus:
            raise KvmUnavailable(f"this KVM supports at most {max_vcpus} vCPUs per VM, --smp asked for {self.config.smp}")

    def _capabilities(self) -> dict[str, int]:
        names = [n for n in dir(lib) if n.startswith("KVM_CAP_")]
        return {n[len("KVM_CAP_") :].lower(): self.kvm.check_extension(getattr(lib, n)) for n in names}

    def _create_vm(self) -> Vm:
        vm = self.kvm.create_vm()
        for setter, addr in ((vm.set_tss_addr, TSS_ADDR), (vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                setter(addr)
            except OSError:
                pass  # not needed (or not offered) by every backend
        reasons = 0
        for name in MSR_EXIT_REASONS:
            reasons |= getattr(lib, name)
        vm.enable_cap(lib.KVM_CAP_X86_USER_SPACE_MSR, reasons)
        return vm

    def map_ram(self) -> None:
        """Map all guest RAM into every VTL's VM (VSM narrows lower-VTL views later)."""
        self.views = VtlArray(len(self.vms), lambda vtl: MemoryView(self.vms[vtl], self.memory, vtl))
        for view in self.views:
            view.apply()

    def set_msr_filter(self, extra: list[tuple[int, int]] | None = None) -> None:
        ranges = [(MSR_IA32_APIC_BASE, 1), (MSR_IA32_TSC_DEADLINE, 1)] + list(extra or [])
        for vm in self.vms:
            vm.set_msr_filter(ranges)

    def cpuid_for(self, vp_index: int, vtl: int) -> list[tuple[int, int, int, int, int, int, int]]:
        self.cpuid_policy.extra_leaves = list(self.extra_cpuid)
        return build_cpuid(self.supported_cpuid, vp_index, self.config.smp, self.cpuid_policy)

    def boot(self) -> None:
        """Load the kernel and create the VPs (call once, before :meth:`run`)."""
        cfg = self.config
        self.map_ram()
        self.set_msr_filter([(first, last - first + 1) for first, last, _ in self.msr_handlers])
        modules = [Module(p, str(p)) for p in cfg.initrds]
        acpi = build_acpi_tables(cfg.smp, self.ioapic_info)
        self.memory.write(acpi.base, acpi.blob)
        boot = load_kernel(cfg.kernel, self.memory, cmdline=cfg.cmdline, modules=modules, rsdp=acpi.rsdp)
        self.sync_tsc_offsets()
        self.check_cpuid_hiding(boot.protocol)
        for ext in self.extensions:
            ext.vps_created()
        if self.sink.enabled:
            for vp in self.vps:
                for vtl, table in enumerate(vp.cpuid_tables):
                    for fn, idx, _flags, a, b, c, d in table:
                        self.sink.emit(EventKind.CPUID, vp.index, vtl, None, leaf=fn, subleaf=idx, eax=a, ebx=b, ecx=c, edx=d)
        apply_boot_state(self.vps[0].vcpus[0], boot)
        self.booted = True

    def check_cpuid_hiding(self, protocol: str) -> None:
        """Say once which CPUID bits the policy hides in vain (measured when the machine was built).

        A warning for PVH kernels (real operating systems consult these bits); only a
        log line for vsmtrace's own guests, which are built without those instructions.
        """
        if not self.cpuid_hiding_ineffective:
            return
        names = ", ".join(self.cpuid_hiding_ineffective)
        message = (
            f"this KVM ignores vsmtrace's CPUID hiding of {names}: guest kernel code still sees them "
            "(Linux: boot with noxsave clearcpuid=popcnt; see docs/linux-guest.md)"
        )
        log.log(logging.WARNING if protocol == "pvh" else logging.INFO, "%s", message)

    def attach_exit_recorders(self) -> None:
        """Let KVM_RUN itself record OUTs to device ports (``vsm_kvm_run_recorded``) if the sink can.

        The sink's ``native_io`` is its C append function and argument. Needs the synced
        registers (RIP comes from kvm_run); not with --deterministic, whose EXIT event must
        come before the PIO event of the same exit. Trap ports are served, not recorded,
        so they stay out of the bitmap.
        """
        native = getattr(self.sink, "native_io", None) if self.sink.enabled else None
        if native is None or self.deterministic is not None:
            return
        ports = self._recorded_ports = _port_bitmap(port for port in self.pio.devices if port not in self.trap_ports)
        idle_out = self._idle_out_bitmap()
        fn, store = native
        for vp in self.vps:
            for vtl, vcpu in enumerate(vp.vcpus):
                if not vcpu.sync_regs:
                    continue
                rec = ffi.new("struct vsm_exit_recorder *")
                rec.run = vcpu.run_struct
                rec.record = ffi.cast("vsm_io_sink", fn)
                rec.store = ffi.cast("void *", store)
                rec.kind = int(EventKind.PIO)
                rec.vp = vp.index
                rec.vtl = vtl
                rec.ports = ports
                if idle_out is not None:
                    rec.idle_out = idle_out
                vcpu.exit_recorder = rec

    def _idle_out_bitmap(self) -> Any:
        """Bitmap of the ports whose device's writes change nothing (``writes_have_no_effect``), or None:
        C completes OUTs to them (``vsm_kvm_run_fast``, and ``vsm_kvm_run_recorded`` after recording)."""
        if self._idle_out is None:
            idle = [port for port, device in self.pio.devices.items()
                    if getattr(device, "writes_have_no_effect", False) and port not in self.trap_ports]  # fmt: skip
            if idle:
                self._idle_out = _port_bitmap(idle)
        return self._idle_out

    def reference_counter(self, scale: int, offset: int) -> Callable[[], int]:
        """The partition reference counter in C (``vsm_reference_time``): guest TSC through the
        TSC page formula with these parameters, never going back, shared with the MSR fast path."""
        self.refclock = ffi.new("struct vsm_refclock *", {"tsc_offset": self.tsc_offset, "scale": scale, "offset": offset})
        clock, read = self.refclock, lib.vsm_reference_time
        return lambda: int(read(clock))

    def attach_fastpath(self) -> None:
        """Answer MSR reads that change no state, OUTs to devices whose writes change nothing, and the
        hypercalls an extension serves in C, without Python's GIL (``vsm_kvm_run_fast``).

        The extensions' ``fast_msr_values(vp, vtl)`` give those MSRs with their fixed answer, or None for the
        reference counter (answered from :meth:`reference_counter`'s clock, if there is one);
        ``fast_io_server(vp, vtl)`` a C server offered each port-I/O exit first.
        Not with --deterministic (every exit is an event there). While recording, only on vCPUs
        that record port I/O in C (``attach_exit_recorders``; the loop records those OUTs as
        ``vsm_kvm_run_recorded`` does) and only with servers that record what they answer (the
        VTL switches: docs/architecture.md, "Exit paths in C"); MSR reads and idle OUTs are then
        the recorder's.
        """
        if not self.config.fast_paths or self.deterministic is not None:
            return
        recording = bool(self.sink.enabled)
        if recording and getattr(self.sink, "native_record", None) is None:
            return  # a sink that cannot take what C answers (e.g. --verbose's): every exit through Python
        # While recording, MSR reads and idle OUTs are the recorder's: only servers that record stay.
        fast_msrs = () if recording else self._fast_msrs
        idle_out = None if recording else self._idle_out_bitmap()
        if not (fast_msrs or self._fast_io or idle_out is not None):
            return
        for vp in self.vps:
            for vtl, vcpu in enumerate(vp.vcpus):
                vcpu.fastpath = None
                table: dict[int, int | None] = {}
                for values in fast_msrs:
                    table.update(values(vp.index, vtl))
                if recording and vcpu.exit_recorder is None:
                    continue
                server = next((s for s in (f(vp.index, vtl) for f in self._fast_io) if s is not None), None)
                if not (table or server or idle_out):
                    continue
                fp = ffi.new("struct vsm_fastpath *")
                fp.fd, fp.vtl, fp.run = vcpu.fd, vtl, vcpu.run_struct
                if recording:
                    fp.rec = vcpu.exit_recorder
                if idle_out is not None:
                    fp.idle_out = idle_out
                fixed = sorted((index, value) for index, value in table.items() if value is not None)
                for i, (index, value) in enumerate(fixed[: len(fp.index)]):
                    fp.index[i] = index
                    fp.value[i] = value
                    fp.n = i + 1
                timed = [index for index, value in table.items() if value is None]
                if timed and self.refclock is not None:
                    fp.time_msr = timed[0]
                    fp.clock = self.refclock
                if server is not None:
                    fp.serve_io = ffi.cast("vsm_io_server", server[0])
                    fp.io_ctx = ffi.cast("void *", server[1])
                    self._fast_io_keep.append(server)  # the C side holds raw pointers into these
                vcpu.fastpath = fp
            fastpaths = [vcpu.fastpath for vcpu in vp.vcpus]
            if 1 < len(fastpaths) <= lib.VSM_VP_VTLS and all(fp is not None for fp in fastpaths):
                # An I/O server may move the VP between these vCPUs (a VTL call or return answered in C).
                vp.fast_run = ffi.new("struct vsm_vp_run *")
                for vtl, fp in enumerate(fastpaths):
                    vp.fast_run.vtl[vtl] = fp
                    fp.vp = vp.fast_run

    # -- services for devices and layers ------------------------------------------------------
    def emit(self, kind: EventKind, vp: VirtualProcessor | None, **fields: Any) -> None:
        sink = self.sink
        if not sink.enabled:
            return
        if vp is None:
            sink.emit(kind, 0, 0, 0, **fields)
        else:
            sink.emit(kind, vp.index, vp.vtl, vp.rip(), **fields)

    def warn_once(self, key: object, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def init_clock(self, vcpu: Vcpu) -> None:
        """Learn the guest TSC rate and offset from the first vCPU; every APIC needs them."""
        self.tsc_hz = vcpu.tsc_khz() * 1000
        self.tsc_offset_exact = vcpu.has_tsc_offset_attr()
        offset = vcpu.get_tsc_offset() if self.tsc_offset_exact else self._estimate_tsc_offset(vcpu)
        self.tsc_offset = offset - (1 << 64) if offset >= 1 << 63 else offset  # KVM's u64, as a signed offset
        if self.config.deterministic:
            self.deterministic = DeterministicTime(self)
            self.clock, self.timers = self.deterministic.clock, self.deterministic.timers
            # Filtered (hence exiting) from boot on: KVM would otherwise answer with host cycles.
            self.msr_handlers.append((MSR_IA32_TSC, MSR_IA32_TSC, self.deterministic))
            return
        self.clock = GuestClock(self.tsc_offset)
        self.timers = TimerService(self.clock)

    @staticmethod
    def _estimate_tsc_offset(vcpu: Vcpu) -> int:
        """Guest TSC minus host TSC without KVM_VCPU_TSC_OFFSET: the tightest of a few brackets.

        KVM read the guest TSC somewhere between the host TSC before and after the
        KVM_GET_MSRS call; taking the *earlier* one errs towards a guest TSC slightly ahead,
        so TIME_REF_COUNT (derived from it) may lead the TSC page by at most the bracket
        but never runs behind it.
        """
        best: tuple[int, int] | None = None
        for _ in range(TSC_OFFSET_SAMPLES):
            before = int(lib.vsm_rdtsc())
            guest = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC]
            width = int(lib.vsm_rdtsc()) - before
            if best is None or width < best[0]:
                best = (width, guest - before)
        assert best is not None
        return best[1]

    def sync_tsc_offsets(self) -> None:
        """Give every VP's vCPUs the machine's TSC offset (one guest TSC, one reference clock).

        KVM normally matches the TSCs of vCPUs created together, but the reference counter
        is derived from one offset for the whole partition, so make sure rather than hope.
        """
        if not self.tsc_offset_exact or self.deterministic is not None:
            return
        for vp in self.vps:
            for vcpu in vp.vcpus:
                if vcpu.get_tsc_offset() != self.tsc_offset & U64_MASK:
                    vcpu.set_tsc_offset(self.tsc_offset)

    def guest_tsc(self) -> int:
        return int(lib.vsm_rdtsc()) + self.tsc_offset

    def read_gpa(self, vtl: int, gpa: int, size: int, access: Access = Access.READ) -> bytes:
        """Guest memory as ``vtl`` may see it: a hypercall can never reach past the caller's protections."""
        if self.views is not None and not self.views[vtl].check(gpa, size, access):
            raise VtlAccessDenied(vtl, gpa, access)
        return self.memory.read(gpa, size)

    def write_gpa(self, vtl: int, gpa: int, data: bytes) -> None:
        if self.views is not None and not self.views[vtl].check(gpa, len(data), Access.WRITE):
            raise VtlAccessDenied(vtl, gpa, Access.WRITE)
        self.memory.write(gpa, data)

    def vp(self, index: int) -> VirtualProcessor:
        return self.vps[index]

    def apic_eoi(self, vp_index: int, vtl: int, vector: int) -> None:
        if self.on_apic_eoi is not None:
            self.on_apic_eoi(vp_index, vtl, vector)

    def flush_vps(self, vp_indices: Sequence[int], vtl: int) -> None:
        """Make the listed VPs drop cached translations of ``vtl`` (``vmm.hyperv.facade.TlbFlusher``).

        Reloading a vCPU's special registers makes KVM drop its translations; each target
        VP does that before its next guest entry, and this returns once no target can run
        guest code without having done so (see VirtualProcessor.request_tlb_flush).
        """
        for index in vp_indices:
            if 0 <= index < len(self.vps):
                self.vps[index].request_tlb_flush(vtl)

    def extension(self, kind: type[E]) -> E | None:
        """The extension of this type the machine was built with, if any."""
        for ext in self.extensions:
            if isinstance(ext, kind):
                return ext
        return None

    def current_vp(self) -> VirtualProcessor | None:
        """The VP whose thread is calling, if any."""
        current = threading.current_thread()
        for vp in self.vps:
            if vp.thread is current:
                return vp
        return None

    def reference_time(self) -> int:
        clock = self._reference_clock
        if clock is None:
            raise RuntimeError("no reference clock without Hyper-V")
        return int(clock())  # type: ignore[arg-type]

    @property
    def vp_count(self) -> int:
        return len(self.vps)

    def assert_interrupt(self, vp_index: int, vtl: int, vector: int) -> None:
        self.vps[vp_index].apics[vtl].accept_interrupt(vector)

    # -- MSRs ------------------------------------------------------------------------------------
    def msr_records_itself(self, index: int) -> bool:
        """Is this MSR served by a layer that emits its own MSR event (the Hyper-V emulation)?"""
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                return bool(getattr(handler, "records_events", False))
        return False

    def msr_read(self, vp: VirtualProcessor, index: int) -> int:
        apic = vp.apic
        if index == MSR_IA32_APIC_BASE:
            return apic.base_msr
        if index == MSR_IA32_TSC_DEADLINE:
            return apic.tsc_deadline
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST:
            return apic.msr_read(index)
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                return handler.msr_read(vp, index)
        raise MsrFault(index)

    def msr_write(self, vp: VirtualProcessor, index: int, value: int) -> None:
        apic = vp.apic
        if index == MSR_IA32_APIC_BASE:
            enabled = apic.hw_enabled
            apic.base_msr = value
            vp.interrupt_hint = True
            if apic.hw_enabled != enabled:
                vp.sync_kvm_apic_base(vp.vtl, apic.base_msr)
            return
        if index == MSR_IA32_TSC_DEADLINE:
            apic.tsc_deadline = value
            return
        if MSR_X2APIC_FIRST <= index <= MSR_X2APIC_LAST:
            apic.msr_write(index, value)
            vp.interrupt_hint = True
            vp.vcpu.run_struct.cr8 = vp.last_cr8 = apic.cr8
            return
        for first, last, handler in self.msr_handlers:
            if first <= index <= last:
                handler.msr_write(vp, index, value)
                return
        raise MsrFault(index)

    # -- APIC routing callbacks ----------------------------------------------------------------
    def _route_init(self, apic_id: int) -> None:
        if apic_id < len(self.vps):
            self.vps[apic_id].on_init()

    def _route_sipi(self, apic_id: int, vector: int) -> None:
        if apic_id < len(self.vps):
            self.vps[apic_id].on_sipi(vector)

    def _route_nmi(self, apic_id: int) -> None:
        if apic_id < len(self.vps):
            vp = self.vps[apic_id]
            vp.vcpu.nmi()
            vp.kick()

    # -- halts: detect a guest that can never run again ----------------------------------------
    def note_halt(self, vp: VirtualProcessor, interruptible: bool) -> None:
        if interruptible:
            return
        with self._halt_lock:
            self.halted_no_if.add(vp.index)
        self._stop_if_stuck(vp)

    def note_suspended(self, vp: VirtualProcessor, why: str, still: Callable[[], bool]) -> None:
        """``vp`` is suspended in a flush hypercall until a higher VTL releases a TLB lock.

        A suspended VP takes no interrupts (TLFS, HvCallFlushVirtualAddressSpace), and only
        VTL code running on some VP releases the lock; if no VP can run any more, the guest
        has deadlocked itself, and waiting for ``--timeout`` would only hide why. ``still``
        says whether it is still suspended: a release clears it before the VP wakes.
        """
        with self._halt_lock:
            self.suspended[vp.index] = (why, still)
        self._stop_if_stuck(vp)

    def _stop_if_stuck(self, vp: VirtualProcessor) -> None:
        with self._halt_lock:
            stuck = all(
                v.index in self.halted_no_if
                or (v.index in self.suspended and self.suspended[v.index][1]())
                or v.state is VpState.WAIT_FOR_SIPI
                or v.state is VpState.STOPPED
                for v in self.vps
            )
            halted = bool(self.halted_no_if)
            suspended = {index: why for index, (why, _still) in self.suspended.items()}
        if not stuck or (halted and self._woken_from_outside()):
            return
        if not suspended:
            reason = f"guest halted with interrupts disabled on every VP (last: VP {vp.index} at rip={vp.rip():#x})"
        else:
            waits = "; ".join(f"VP {index} {why}" for index, why in sorted(suspended.items()))
            reason = f"guest deadlock: no VP can run to release a TLB lock ({waits})"
        self.request_stop(EXIT_GUEST_FAULT, reason, vp=vp)

    def _woken_from_outside(self) -> bool:
        """Whether anything but the halted VTL's own interrupts could still wake a VP.

        With VSM that is an interrupt for a higher VTL, which needs a higher VTL to
        be enabled; until the guest enables one, a halt with IF=0 everywhere is final.
        """
        return any(ext.wakes_from_outside() for ext in self.extensions)

    def note_wake(self, vp: VirtualProcessor) -> None:
        with self._halt_lock:
            self.halted_no_if.discard(vp.index)
            self.suspended.pop(vp.index, None)

    # -- stopping ---------------------------------------------------------------------------------
    def _on_debug_exit(self, value: int, status: int) -> None:
        extra = {"detail": self.deterministic.exit_detail()} if self.deterministic is not None else {}
        self.console.flush(self.sink)  # what the guest printed comes before its exit in the trace
        self.emit(EventKind.GUEST_EXIT, None, exit_status=value, message=f"isa-debug-exit {value:#x} (status {status})", **extra)
        self.request_stop(status, "")

    def _on_serial(self, data: bytes) -> None:
        if self.sink.enabled:
            vp = self.current_vp()
            if vp is None:
                self.console.add(self.sink, data, -1, 0, 0)
            else:
                self.console.add(self.sink, data, vp.index, vp.vtl, vp.rip())

    def reboots(self) -> bool:
        """Does a guest reset reboot the machine? (QEMU's default; not with --no-reboot.)

        A recording or a --deterministic run ends at the reset instead: a trace holds one
        boot of one machine (replay rebuilds the emulation once).
        """
        return not self.config.no_reboot and not self.sink.enabled and self.deterministic is None

    def request_reset(self, cause: str, *, fault: bool = False) -> None:
        """The guest asked for a reset (``fault``: a triple fault): reboot, or end the run.

        Rebooting means the run ends with ``rebooting`` set and the caller starts a fresh
        machine from the same configuration (see vsmtrace.cli run): every vCPU, device,
        the Hyper-V/VSM state and RAM start over as at the first boot, so nothing of the
        old boot can leak into the new one. Otherwise the run ends with EXIT_RESET (a
        triple fault with EXIT_GUEST_FAULT, as before).
        """
        if self.reboots():
            with self._stop_lock:
                if self.exit_status is None:
                    self.rebooting = True
            log.info("guest reset (%s): rebooting", cause)
            self.request_stop(EXIT_OK, f"guest reset: {cause}")
            return
        if fault:
            self.request_stop(EXIT_GUEST_FAULT, cause)
        else:
            self.request_stop(EXIT_RESET, f"guest reset: {cause} (not rebooted: {self._no_reboot_reason()})")

    def _no_reboot_reason(self) -> str:
        if self.config.no_reboot:
            return "--no-reboot"
        if self.deterministic is not None:
            return "--deterministic"
        return "a trace records one boot"

    def request_stop(self, status: int, message: str, vp: VirtualProcessor | None = None) -> None:
        with self._stop_lock:
            if self.exit_status is not None:
                return
            self.exit_status = status
            self.stop_message = message
            self.stopping = True
        self.console.flush(self.sink)
        if message and status != EXIT_OK:
            self.emit(EventKind.ERROR, None, message=message)
        self.stop_event.set()
        for v in self.vps:
            v.kick()

    def run(self) -> int:
        """Run until the guest exits, fails, times out or the user interrupts; returns the exit status."""
        if not self.booted:
            self.boot()
        self.attach_exit_recorders()
        self.attach_fastpath()
        for vp in self.vps:
            vp.start()
        if self.config.serial_in_interactive:
            STDIN_FEEDER.attach(self.serial)  # one reader for every machine of this process (reboots)
        deadline = None if self.config.timeout_s is None else time.monotonic() + self.config.timeout_s
        try:
            while not self.stop_event.wait(0.1):
                if self.interrupted:
                    self.request_stop(EXIT_INTERRUPTED, "interrupted")
                if deadline is not None and time.monotonic() > deadline:
                    self.request_stop(EXIT_TIMEOUT, f"guest still running after --timeout {self.config.timeout_s:g} s")
                if all(v.state is VpState.STOPPED for v in self.vps):
                    self.request_stop(EXIT_VMM_ERROR, "every VP stopped without an exit status")
        except KeyboardInterrupt:
            self.request_stop(EXIT_INTERRUPTED, "interrupted")
        stop_by = time.monotonic() + 5
        for vp in self.vps:
            while vp.thread is not None and vp.thread.is_alive() and time.monotonic() < stop_by:
                try:
                    vp.thread.join(timeout=max(0.0, stop_by - time.monotonic()))
                except KeyboardInterrupt:  # a second Ctrl-C: already stopping, keep stopping in order
                    self.request_stop(EXIT_INTERRUPTED, "interrupted")
        self.console.flush(self.sink)  # bytes written after the stop request, before the VPs saw it
        for ext in self.extensions:
            ext.stopped()
        if self.timers is not None:
            self.timers.stop()
        assert self.exit_status is not None
        return self.exit_status

    def interrupt(self) -> None:
        """Ask :meth:`run` to stop the guest with status 130 (Ctrl-C).

        Only sets a flag that the run loop polls, so a signal handler may call it at
        any point, even while this thread holds the machine's locks.
        """
        self.interrupted = True

    def close(self) -> None:
        for vm in self.vms:
            vm.close()
        self.memory.close()
        self.kvm.close()
