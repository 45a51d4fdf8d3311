"""Guest re-execution: run the recorded guest again under KVM, driven by its trace.

The second replay mode (docs/architecture.md, "The trace -> replay path"). A trace recorded with ``vsmtrace run
--deterministic`` has one EXIT event per KVM exit (reason, RIP, GPRs, the
interrupt-window flag of the entry) followed by everything the VMM did for that
exit: values returned to port, MMIO and MSR reads, emulation entries with the
registers and guest memory they wrote, interrupts injected before the next entry.

Re-execution builds a fresh machine from the trace metadata and the same guest
image, but never emulates a device: at each exit it checks reason, RIP and GPRs
against the next recorded EXIT, feeds the recorded read values back, applies the
recorded emulation outputs (registers, XMM, guest memory, exceptions), checks
the guest's writes against the recorded ones, and injects the recorded
interrupts before re-entering. The first mismatch is a :class:`Divergence`.
At the guest's exit the RAM hash must equal the recorded one.

VSM guests re-execute too: each VTL of the VP is its own vCPU, and the one the trace
says is active runs. Recorded VTL switches, protection changes and secure memory
intercepts are replayed with the live machine code (``VsmBackend.move_vp``,
``set_protections``, ``undo_denied_access``) driven by the recorded emulation
outputs; only the emulation itself (which VTL, which pages, which message) comes
from the trace.

Scope: one VP (refused otherwise).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vsmtrace.recorder.errors import TraceError
from vsmtrace.recorder.reader import open_trace
from vsmtrace.replayer.errors import Divergence, ReplayError
from vsmtrace.vmm.emulation_io import decode_exception, decode_value, enum_value_of, fields_of, loads
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.protocol import FLUSH_OPS, Entry, Op, Service, VsmOp, service_op

MSR_IA32_APIC_BASE = 0x1B

COLUMNS = [
    "seq", "vp", "vtl", "rip", "kind", "exit_reason", "exit_code", "gprs", "entry_flags", "address", "size",
    "is_write", "data", "msr", "value", "fault", "vector", "source", "entry", "emu_io", "emu_result",
    "exit_status", "detail", "serial_data", "emu_args", "from_vtl", "to_vtl", "reason", "args", "access", "gpa", "gva",
    "insn_bytes", "message", "target_vtl", "gpa_start", "pages", "new_mask",
]  # fmt: skip

#: Divergences the guest's own code can explain (a raw TSC value that reached it), by kind: fields.
#: Input mismatches (a port, MSR or VSM row) are the VMM's business and never blamed on RDTSC.
TSC_SUSPECT_FIELDS = {"EXIT": ("gprs.", "rip", "exit_reason"), "GUEST_EXIT": ("ram_sha256",)}

#: VTL switches the emulation requests inside an entry (``vsm.request_transition``): the
#: VTL_SWITCH event precedes the EMULATION event of that entry, the switch happens at the op.
REQUESTED_SWITCHES = frozenset({"call", "return"})
#: Every op of the VSM services starts with this.
VSM_OPS = service_op(Service.VSM, "")


@dataclass
class PendingVsm:
    """VSM rows of one exit that wait for the point where the live machine acted on them."""

    switches: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # VTL_SWITCH rows for call/return
    entries: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # vtl_entry EMULATION rows
    protections: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # PROTECTION rows, checked at the end


@dataclass(frozen=True)
class MemoryDump:
    """``--dump-memory SEQ:GPA:LEN``: guest memory right after event SEQ was re-executed."""

    seq: int
    gpa: int
    length: int
    path: Path

    @classmethod
    def parse(cls, spec: str, default_dir: Path) -> MemoryDump:
        parts = spec.split(":")
        if len(parts) not in (3, 4):
            raise ValueError(f"--dump-memory wants SEQ:GPA:LEN[:FILE], got {spec!r}")
        try:
            seq, gpa, length = (int(p, 0) for p in parts[:3])
        except ValueError:
            raise ValueError(f"--dump-memory wants integers in SEQ:GPA:LEN, got {spec!r}") from None
        if seq < 0 or gpa < 0 or length <= 0:
            raise ValueError(f"--dump-memory: SEQ and GPA must be >= 0 and LEN > 0, got {spec!r}")
        path = Path(parts[3]) if len(parts) == 4 else default_dir / f"mem-{seq}-{gpa:#x}-{length}.bin"
        return cls(seq, gpa, length, path)


@dataclass
class ReexecReport:
    exits: int
    events: int
    seconds: float
    recorded_seconds: float
    divergence: Divergence | None
    exit_status: int | None
    ram_checked: bool
    dumps: list[Path] = dataclasses.field(default_factory=list)
    serial: bytes = b""
    cause: str | None = None  # the likely reason for the divergence, when the guest's code shows one (RDTSC)


def _gpr_diff(recorded: bytes, actual: bytes) -> tuple[str, int, int] | None:
    from vsmtrace.vmm.deterministic import unpack_gprs

    a, b = unpack_gprs(recorded), unpack_gprs(actual)
    for name, value in a.items():
        if b[name] != value:
            return name, value, b[name]
    return None


class Reexecutor:
    """Re-executes one deterministic trace; call :meth:`run`."""

    def __init__(self, path: str | Path, *, dumps: list[MemoryDump] | None = None) -> None:
        self.path = Path(path)
        try:
            trace = open_trace(self.path)
            table = trace.table()
        except TraceError as exc:
            raise ReplayError(str(exc)) from None
        md = trace.metadata
        self.metadata = md
        cfg = md.get("vm_config") or {}
        self.vm_config = cfg
        if not cfg.get("deterministic"):
            raise ReplayError(
                f"trace was not recorded with --deterministic: {self.path} has real-time timers and no per-exit "
                "records, so the guest cannot be re-executed (record it with `vsmtrace run --deterministic --smp 1`)"
            )
        if int(cfg.get("vps", 0)) != 1:
            raise ReplayError(
                f"{self.path}: re-execution needs a 1-VP trace, this one has {cfg.get('vps')} VPs (their interleaving "
                "is not decided at exits); use `vsmtrace replay` (VMM replay)"
            )
        have = set(table.column_names)
        self.rows: list[dict[str, Any]] = table.select([c for c in COLUMNS if c in have]).to_pylist()
        self.rows.sort(key=lambda r: r["seq"])
        # Only the per-exit records of --deterministic carry GPRs; other EXIT rows (e.g. a HLT note) are informational.
        for r in self.rows:
            if r["kind"] == EventKind.EXIT.name and r.get("gprs") is None:
                r["kind"] = "EXIT_NOTE"
        if not any(r["kind"] == EventKind.EXIT.name for r in self.rows):
            raise ReplayError(f"{self.path}: trace was not recorded with --deterministic: it has no EXIT events")
        self.image = self._check_image(md.get("guest_image"))
        self.machine: Any = None  # the re-executing vmm.machine.Machine, while run() runs
        self.vsm: Any = None  # its vmm.backends.vsm.VsmBackend, if the trace has VSM
        self.dumps = sorted(dumps or [], key=lambda d: d.seq)
        last_time = table.column("time_ns")[table.num_rows - 1].as_py() if table.num_rows else 0
        self.recorded_seconds = (last_time or 0) / 1e9

    def _check_image(self, image: Any) -> Path:
        if not isinstance(image, dict) or "path" not in image or "sha256" not in image:
            raise ReplayError(f"{self.path}: the trace does not name its guest image (path and SHA-256)")
        p = Path(image["path"])
        if not p.exists():
            raise ReplayError(f"guest image {p} is missing: re-execution needs the exact image the trace was recorded with")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != image["sha256"]:
            raise ReplayError(f"guest image {p} changed since recording (SHA-256 {digest[:16]}…, trace has {image['sha256'][:16]}…)")
        return p

    # -- machine ---------------------------------------------------------------------------------
    def _build_machine(self) -> Any:
        from vsmtrace.vmm.builder import build_machine
        from vsmtrace.vmm.config import MachineConfig
        from vsmtrace.vmm.trace_metadata import recorded_policy

        cfg = self.vm_config
        policy = recorded_policy(cfg)
        config = MachineConfig(
            kernel=self.image,
            smp=1,
            memory_mib=int(cfg["memory_mib"]),
            cmdline=cfg.get("cmdline", ""),
            initrds=[Path(p) for p in cfg.get("initrds", [])],
            serial_out=io.BytesIO(),
            vtls=int(cfg.get("vtls", 1)),
            hyperv=policy,
            deterministic=True,
        )
        machine = build_machine(config)
        machine.boot()
        return machine

    # -- the loop --------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, int], None] | None = None) -> ReexecReport:
        from vsmtrace.vmm.backends.vsm import VsmBackend
        from vsmtrace.vmm.deterministic import ENTRY_IRQ_WINDOW, pack_gprs, ram_sha256
        from vsmtrace.vmm.kvm.exits import exit_name

        machine = self._build_machine()
        self.machine = machine
        self.vsm = machine.extension(VsmBackend)
        vp = machine.vps[0]
        rows = self.rows
        dumps = list(self.dumps)
        written: list[Path] = []
        serial = bytearray()
        exits = 0
        status: int | None = None
        ram_checked = False
        divergence: Divergence | None = None
        cause: str | None = None
        previous_rip: int | None = None  # the RIP of the last exit reproduced: the code ran from there
        t0 = time.monotonic()
        i = 0
        n = len(rows)

        def dump_through(seq: int) -> None:
            while dumps and dumps[0].seq <= seq:
                d = dumps.pop(0)
                d.path.write_bytes(machine.memory.read(d.gpa, d.length))
                written.append(d.path)

        try:
            while True:
                while i < n and rows[i]["kind"] != "EXIT":
                    i += 1
                if i >= n:
                    break  # the recording ended (timeout, interrupt): everything recorded was reproduced
                rec = rows[i]
                seq = rec["seq"]
                if rec["vtl"] != vp.vtl:  # the recorded exit came from another VTL's vCPU
                    raise Divergence(seq, "EXIT", "vtl", rec["vtl"], vp.vtl)
                try:
                    reason = vp.enter_once(irq_window=bool((rec["entry_flags"] or 0) & ENTRY_IRQ_WINDOW))
                except OSError as exc:
                    raise ReplayError(f"KVM_RUN failed while re-executing event {seq}: errno {exc.errno}") from None
                exits += 1
                regs = vp.vcpu.get_regs()
                if reason != rec["exit_code"]:
                    raise Divergence(seq, "EXIT", "exit_reason", rec["exit_reason"], exit_name(reason))
                if int(regs.rip) != rec["rip"]:
                    raise Divergence(seq, "EXIT", "rip", hex(rec["rip"]), hex(int(regs.rip)))
                if rec["gprs"] is not None:
                    diff = _gpr_diff(rec["gprs"], pack_gprs(regs))
                    if diff is not None:
                        raise Divergence(seq, "EXIT", f"gprs.{diff[0]}", hex(diff[1]), hex(diff[2]))
                dump_through(seq)
                previous_rip = rec["rip"]
                if progress is not None:
                    progress(i, n)
                i += 1
                pio_index = 0
                pending = PendingVsm()
                while i < n and rows[i]["kind"] != "EXIT":
                    row = rows[i]
                    kind = row["kind"]
                    if kind == "PIO":
                        self._pio(row, vp, reason, pio_index)
                        pio_index += 1
                    elif kind == "MMIO":
                        self._mmio(row, vp, reason, machine.memory)
                    elif kind == "MSR":
                        self._msr(row, vp, reason)
                        if row["msr"] == MSR_IA32_APIC_BASE and row["is_write"] and not row["fault"]:
                            vp.sync_kvm_apic_base(vp.vtl, int(row["value"]))  # KVM's CPUID.01H:EDX.APIC follows it
                    elif kind == "EMULATION":
                        if row["entry"] == Entry.VTL_ENTRY:
                            pending.entries.append(row)  # the switch it belongs to follows; it runs right after it
                        else:
                            self._emulation(row, vp, pending)
                    elif kind == "VTL_SWITCH":
                        if row["reason"] in REQUESTED_SWITCHES:
                            pending.switches.append(row)  # performed at the entry's vsm.request_transition
                        else:
                            self._switch(row, vp, pending)
                    elif kind == "INTERCEPT":
                        self._intercept(row, vp, reason)
                    elif kind == "PROTECTION":
                        pending.protections.append(row)
                    elif kind == "INTERRUPT":
                        if row["source"] != "exception":  # exceptions come with their emulation entry's outputs
                            if row["vtl"] != vp.vtl:
                                raise Divergence(row["seq"], kind, "vtl", row["vtl"], vp.vtl)
                            vp.vcpu.flush_regs()
                            vp.vcpu.interrupt(int(row["vector"]))
                    elif kind == "SERIAL":
                        serial += row["serial_data"] or b""
                    elif kind == "GUEST_EXIT":
                        status = row["exit_status"]
                        detail = json.loads(row["detail"]) if row["detail"] else {}
                        if "ram_sha256" in detail:
                            got = ram_sha256(machine)
                            if got != detail["ram_sha256"]:
                                raise Divergence(row["seq"], kind, "ram_sha256", detail["ram_sha256"], got)
                            ram_checked = True
                    dump_through(row["seq"])
                    i += 1
                self._settle(pending, seq, vp)
                if status is not None:
                    break
        except Divergence as div:
            divergence = div
            cause = self._tsc_cause(div, vp, previous_rip)
        finally:
            seconds = time.monotonic() - t0
            machine.close()
        return ReexecReport(
            exits=exits,
            events=i,
            seconds=seconds,
            recorded_seconds=self.recorded_seconds,
            divergence=divergence,
            exit_status=status,
            ram_checked=ram_checked,
            dumps=written,
            serial=bytes(serial),
            cause=cause,
        )

    def _tsc_cause(self, div: Divergence, vp: Any, previous_rip: int | None) -> str | None:
        """RDTSC as the reason for ``div`` if the code running between the last two exits reads the TSC."""
        from vsmtrace.replayer.guest_code import STACK_SCAN_BYTES, GuestCode

        if not any(div.field.startswith(f) for f in TSC_SUSPECT_FIELDS.get(div.kind, ())):
            return None
        code = GuestCode.load(self.image)
        if code is None:
            return None
        regs = vp.vcpu.get_regs()
        rips = [int(regs.rip)] + ([previous_rip] if previous_rip is not None else [])
        memory = self.machine.memory
        rsp = int(regs.rsp)  # test guests identity-map: the stack's GVA is its GPA
        length = STACK_SCAN_BYTES
        while length and not memory.is_ram(rsp, length):
            length //= 2
        stack = memory.read(rsp, length) if length else b""
        return code.tsc_cause(rips, stack)

    # -- VSM: switches, protections, intercepts ----------------------------------------------------
    def _switch(self, row: dict[str, Any], vp: Any, pending: PendingVsm, transition: dict[str, Any] | None = None) -> None:
        """Replay one VTL_SWITCH with the live switch code; an entry into a higher VTL then gets its vtl_entry outputs.

        ``transition`` is the VtlTransition of the ``vsm.request_transition`` op that asked
        for it (call/return), which also carries a non-fast return's RAX/RCX.
        """
        from vsmtrace.vmm.backends.vsm import ENTRY_REASON
        from vsmtrace.vmm.vsm.services import SwitchReason

        seq, from_vtl, to_vtl = row["seq"], row["from_vtl"], row["to_vtl"]
        if from_vtl != vp.vtl:
            raise Divergence(seq, "VTL_SWITCH", "from_vtl", from_vtl, vp.vtl)
        return_rax_rcx = None
        if transition is not None:
            asked = (transition["from_vtl"], transition["to_vtl"], enum_value_of(transition["reason"]))
            if asked != (from_vtl, to_vtl, row["reason"]):
                raise ReplayError(f"event {seq}: VTL_SWITCH {from_vtl}->{to_vtl} ({row['reason']}) was requested as {asked}: inconsistent trace")
            if transition["return_rax_rcx"] is not None:
                return_rax_rcx = tuple(transition["return_rax_rcx"])
        rip, args = self.vsm.move_vp(vp, to_vtl, SwitchReason(row["reason"]), return_rax_rcx)
        if rip != row["rip"]:
            raise Divergence(seq, "VTL_SWITCH", "rip", hex(row["rip"]), hex(rip))
        if list(args or []) != list(row["args"] or []):
            raise Divergence(seq, "VTL_SWITCH", "args", row["args"], list(args or []))
        if to_vtl > from_vtl:
            if not pending.entries:
                raise ReplayError(f"event {seq}: VTL_SWITCH into VTL{to_vtl} without its vtl_entry emulation entry: inconsistent trace")
            entry = pending.entries.pop(0)
            entry_reason = int(ENTRY_REASON[SwitchReason(row["reason"])])
            if loads(entry["emu_args"]) != [vp.index, to_vtl, entry_reason, from_vtl]:
                raise ReplayError(f"event {entry['seq']}: vtl_entry {entry['emu_args']!r} does not match VTL_SWITCH event {seq}: inconsistent trace")
            self._emulation(entry, vp, pending)

    def _intercept(self, row: dict[str, Any], vp: Any, reason: int) -> None:
        """The denied access exited again: undo it as live did, and check the intercept message."""
        from vsmtrace.vmm.backends.vsm import ACCESS_NAMES
        from vsmtrace.vmm.kvm.exits import EXIT_INTERNAL_ERROR, EXIT_MMIO, exit_name
        from vsmtrace.vmm.stops import GuestStop
        from vsmtrace.vmm.vp import Access

        seq = row["seq"]
        access = next(a for a, name in ACCESS_NAMES.items() if name == row["access"])
        backend = self.vsm
        gva: int | None = None
        if access is Access.EXECUTE:
            if reason != EXIT_INTERNAL_ERROR:
                raise Divergence(seq, "INTERCEPT", "exit", "internal_error", exit_name(reason))
            target = backend.fetch_target(vp)
            if target is None:
                raise Divergence(seq, "INTERCEPT", "gpa", hex(row["gpa"]), "no RAM at RIP")
            (gpa, gva), length = target, 1
        else:
            if reason != EXIT_MMIO:
                raise Divergence(seq, "INTERCEPT", "exit", "mmio", exit_name(reason))
            mmio = vp.mmio_exit()
            gpa, length = mmio.gpa, mmio.size
            if mmio.is_write != (access is Access.WRITE):
                raise Divergence(seq, "INTERCEPT", "access", row["access"], "write" if mmio.is_write else "read")
        if gpa != row["gpa"]:
            raise Divergence(seq, "INTERCEPT", "gpa", hex(row["gpa"]), hex(gpa))
        if backend.views[vp.vtl].check(gpa, length, access):
            raise Divergence(seq, "INTERCEPT", "access", f"{row['access']} denied", "allowed by the current protections")
        try:
            denied = backend.undo_denied_access(vp, gpa, access, length, gva)
        except GuestStop as stop:
            raise Divergence(seq, "INTERCEPT", "insn_bytes", (row["insn_bytes"] or b"").hex(), str(stop)) from None
        for name, got in (("gva", denied.gva), ("insn_bytes", denied.insn_bytes), ("message", denied.message.pack())):
            if got != row[name]:
                show = (lambda v: v.hex()) if isinstance(got, bytes) else (lambda v: v if v is None else hex(v))
                raise Divergence(seq, "INTERCEPT", name, show(row[name]), show(got))

    def _settle(self, pending: PendingVsm, exit_seq: int, vp: Any) -> None:
        """End of an exit's events: every deferred VSM row must have been acted on; protections as recorded."""
        from vsmtrace.vmm.memory import PAGE_SHIFT
        from vsmtrace.vmm.vsm.state import mask_to_access

        left = pending.switches + pending.entries
        if left:
            raise ReplayError(
                f"event {left[0]['seq']} ({left[0]['kind']}) after exit {exit_seq} was never acted on (no recorded entry "
                "requested that VTL switch): inconsistent trace"
            )
        views = self.machine.views
        for row in pending.protections:
            want = mask_to_access(row["new_mask"])
            first = row["gpa_start"] >> PAGE_SHIFT
            for page in range(first, first + row["pages"]):
                got = views[row["target_vtl"]].allowed(page)
                if got != want:
                    raise Divergence(row["seq"], "PROTECTION", "new_mask", f"{_rwx(want)} at page {page:#x}", _rwx(got))

    # -- feeding one exit --------------------------------------------------------------------------
    @staticmethod
    def _pio(row: dict[str, Any], vp: Any, reason: int, index: int) -> None:
        from vsmtrace.vmm.kvm.exits import EXIT_IO

        seq = row["seq"]
        if reason != EXIT_IO:
            raise Divergence(seq, "PIO", "exit", "io", "not an I/O exit")
        io_ = vp.pio_exit()
        for name, rec, got in (("address", row["address"], io_.port), ("size", row["size"], io_.size), ("is_write", row["is_write"], io_.is_write)):
            if rec != got:
                raise Divergence(seq, "PIO", name, rec, got)
        if index >= io_.count:
            raise Divergence(seq, "PIO", "count", index + 1, io_.count)
        if io_.is_write:
            value = vp.pio_value(index)
            if value != row["data"]:
                raise Divergence(seq, "PIO", "data", hex(row["data"]), hex(value))
        else:
            vp.complete_pio_in(index, int(row["data"]))

    @staticmethod
    def _mmio(row: dict[str, Any], vp: Any, reason: int, memory: Any) -> None:
        from vsmtrace.vmm.kvm.exits import EXIT_MMIO

        seq = row["seq"]
        if reason != EXIT_MMIO:
            raise Divergence(seq, "MMIO", "exit", "mmio", "not an MMIO exit")
        m = vp.mmio_exit()
        for name, rec, got in (("address", row["address"], m.gpa), ("size", row["size"], m.size), ("is_write", row["is_write"], m.is_write)):
            if rec != got:
                raise Divergence(seq, "MMIO", name, rec, got)
        if m.is_write:
            value = int.from_bytes(m.data, "little")
            if value != row["data"]:
                raise Divergence(seq, "MMIO", "data", hex(row["data"]), hex(value))
            if memory.is_ram(row["address"], row["size"]):  # RAM behind a VTL protection hole: the VMM completed it
                memory.write(row["address"], m.data)
        else:
            vp.complete_mmio_read(int(row["data"]))

    @staticmethod
    def _msr(row: dict[str, Any], vp: Any, reason: int) -> None:
        from vsmtrace.vmm.kvm.exits import EXIT_RDMSR, EXIT_WRMSR

        seq = row["seq"]
        want = EXIT_WRMSR if row["is_write"] else EXIT_RDMSR
        if reason != want:
            raise Divergence(seq, "MSR", "exit", exit_name_of(want), exit_name_of(reason))
        msr = vp.msr_exit()
        if msr.index != row["msr"]:
            raise Divergence(seq, "MSR", "msr", hex(row["msr"]), hex(msr.index))
        if row["is_write"]:
            if row["value"] is not None and msr.value != row["value"]:
                raise Divergence(seq, "MSR", "value", hex(row["value"]), hex(msr.value))
            vp.complete_msr(None, bool(row["fault"]))
        else:
            vp.complete_msr(None if row["fault"] else int(row["value"] or 0), bool(row["fault"]))

    def _emulation(self, row: dict[str, Any], vp: Any, pending: PendingVsm) -> None:
        """Apply what the recorded emulation entry asked of the machine, in the recorded order.

        Registers, XMM, guest memory, exceptions and TLB flushes go straight in; VSM service
        calls (VTL creation, initial contexts, protections, VTL switches) go through the
        live ``VsmBackend``.
        """
        from vsmtrace.vmm.backends.hyperv import rewind_trap

        memory = vp.machine.memory
        for op, args, result in loads(row["emu_io"]) or []:
            if decode_exception(result) is not None:
                continue  # the machine refused this output (e.g. a write through a protected view): it had no effect
            if op == Op.SET_REGISTER:
                _vp, vtl, name, value = args
                vp.regfiles[vtl].set(name, decode_value(value))
            elif op == Op.SET_XMM:
                _vp, vtl, index, value = args
                vp.regfiles[vtl].set_xmm(index, value)
            elif op == Op.WRITE_GPA:
                _vtl, gpa, data = args
                memory.write(gpa, decode_value(data))
            elif op == Op.INJECT_EXCEPTION:
                _vp, vtl, vector, error_code = args
                vp.inject_exception(vtl, vector, error_code)
            elif op in FLUSH_OPS:
                _vps, vtl = args
                vp.flush_vtl_tlb(vtl)
            elif op.startswith(VSM_OPS):
                self._vsm_service(row, op, args, vp, pending)
        if row["entry"] == Entry.HYPERCALL:
            result = loads(row["emu_result"])
            fields = fields_of(result)
            if fields.get("retry") or fields.get("exception") is not None:
                rewind_trap(vp)  # as the backend did (backends/hyperv.py, on_trap)

    def _vsm_service(self, row: dict[str, Any], op: str, args: list[Any], vp: Any, pending: PendingVsm) -> None:
        """A ``VsmServices`` call the recorded entry made: performed by the live backend."""
        from vsmtrace.vmm.vp import Access
        from vsmtrace.vmm.vsm.services import InitialVpContext, PageProtection

        backend = self.vsm
        if op == VsmOp.REQUEST_TRANSITION:
            if not pending.switches:
                raise ReplayError(f"event {row['seq']}: a VTL switch was requested but no VTL_SWITCH event records it: inconsistent trace")
            self._switch(pending.switches.pop(0), vp, pending, fields_of(args[0]))
        elif op == VsmOp.SET_PROTECTIONS:
            target, runs = args
            backend.set_protections(
                target, [PageProtection(f["first_page"], f["count"], Access(f["allowed"])) for f in map(fields_of, runs)]
            )
        elif op == VsmOp.LOAD_VP_CONTEXT:
            index, vtl, context = args
            backend.load_vp_context(index, vtl, InitialVpContext(decode_value(fields_of(context)["registers"])))
        elif op == VsmOp.CREATE_VTL:
            backend.create_vtl(args[0])
        elif op == VsmOp.START_VP:
            raise ReplayError(f"event {row['seq']}: the guest started another VP, which a 1-VP re-execution cannot do")
        # vsm.vp_started is an input: nothing to do


def _rwx(allowed: Any) -> str:
    """An allowed-access set as ``rwx`` letters (``-`` for each denied access)."""
    from vsmtrace.vmm.vp import Access

    return "".join(c if allowed & a else "-" for c, a in zip("rwx", (Access.READ, Access.WRITE, Access.EXECUTE), strict=True))


def exit_name_of(reason: int) -> str:
    from vsmtrace.vmm.kvm.exits import exit_name

    return exit_name(reason)


def format_report(report: ReexecReport) -> str:
    lines = []
    if report.divergence is None:
        lines.append(f"re-execution reproduced the trace: {report.exits} exits, {report.events} events checked")
        if report.exit_status is not None:
            lines.append(f"guest exit status {report.exit_status}; guest RAM {'identical' if report.ram_checked else 'not hashed in this trace'}")
    else:
        d = report.divergence
        lines.append(f"re-execution DIVERGED after {report.exits} exits")
        lines.append(f"  first divergence: event {d.seq} ({d.kind}), field {d.field}: recorded {d.recorded}, re-executed {d.replayed}")
        if report.cause is not None:
            lines.append(f"  likely cause: {report.cause}")
    lines.append(f"time: re-execution {report.seconds:.3f} s, recording {report.recorded_seconds:.3f} s")
    for p in report.dumps:
        lines.append(f"memory dump written to {p}")
    return "\n".join(lines)
