"""Guest re-execution: run the recorded guest again under KVM, driven by its trace.

The second replay mode of DESIGN.md. A trace recorded with ``vsmtrace run
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

Scope: one VP (refused otherwise), and no VTL switches or protection changes
(a VSM guest's VTL transitions are not re-driven yet; refused with the reason).
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

import pyarrow as pa
import pyarrow.compute as pc

from recorder.errors import TraceError
from recorder.reader import open_trace
from replayer.errors import Divergence, ReplayError
from vmm.emulation_io import decode_value, loads
from vmm.events import EventKind

COLUMNS = [
    "seq", "vp", "vtl", "rip", "kind", "exit_reason", "exit_code", "gprs", "entry_flags", "address", "size",
    "is_write", "data", "msr", "value", "fault", "vector", "source", "entry", "emu_io", "emu_result",
    "exit_status", "detail", "serial_data",
]  # fmt: skip

UNSUPPORTED_KINDS = {"VTL_SWITCH": "VTL switches", "PROTECTION": "VTL protection changes", "INTERCEPT": "secure memory intercepts"}


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


def _gpr_diff(recorded: bytes, actual: bytes) -> tuple[str, int, int] | None:
    from vmm.deterministic import unpack_gprs

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
            raise ReplayError(f"{self.path}: re-execution needs a 1-VP trace, this one has {cfg.get('vps')} VPs")
        kinds = pc.cast(table.column("kind"), pa.string())
        for kind, what in UNSUPPORTED_KINDS.items():
            hits = pc.indices_nonzero(pc.equal(kinds, kind))
            if len(hits):
                seq = table.column("seq")[int(hits[0].as_py())].as_py()
                raise ReplayError(f"{self.path}: re-execution does not drive {what} yet (first at event {seq}); use `vsmtrace replay` (VMM replay)")
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
        from vmm.config import MachineConfig
        from vmm.hyperv.cpuid import HypervPolicy
        from vmm.machine import Machine

        cfg = self.vm_config
        policy = None
        if cfg.get("hyperv_policy") is not None:
            known = {f.name for f in dataclasses.fields(HypervPolicy)}
            policy = HypervPolicy(**{k: v for k, v in cfg["hyperv_policy"].items() if k in known})
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
        machine = Machine(config)
        machine.boot()
        return machine

    # -- the loop --------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, int], None] | None = None) -> ReexecReport:
        from vmm.deterministic import ENTRY_IRQ_WINDOW, pack_gprs, ram_sha256
        from vmm.kvm.exits import exit_name
        from vmm.kvm.system import lib

        machine = self._build_machine()
        vp = machine.vps[0]
        vcpu = vp.vcpus[0]
        run = vcpu.run_struct
        rows = self.rows
        dumps = list(self.dumps)
        written: list[Path] = []
        serial = bytearray()
        exits = 0
        status: int | None = None
        ram_checked = False
        divergence: Divergence | None = None
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
                run.request_interrupt_window = 1 if (rec["entry_flags"] or 0) & ENTRY_IRQ_WINDOW else 0
                while True:
                    vcpu.invalidate_cache()
                    r = lib.vsm_kvm_run(vcpu.fd)
                    vcpu.exited()  # registers KVM exports with the exit are current again
                    if r >= 0:
                        break
                    if r != -4:  # EINTR: nothing kicks us, but retry rather than fail
                        raise ReplayError(f"KVM_RUN failed while re-executing event {rec['seq']}: errno {-r}")
                exits += 1
                reason = int(run.exit_reason)
                regs = vcpu.get_regs()
                seq = rec["seq"]
                if reason != rec["exit_code"]:
                    raise Divergence(seq, "EXIT", "exit_reason", rec["exit_reason"], exit_name(reason))
                if int(regs.rip) != rec["rip"]:
                    raise Divergence(seq, "EXIT", "rip", hex(rec["rip"]), hex(int(regs.rip)))
                if rec["gprs"] is not None:
                    diff = _gpr_diff(rec["gprs"], pack_gprs(regs))
                    if diff is not None:
                        raise Divergence(seq, "EXIT", f"gprs.{diff[0]}", hex(diff[1]), hex(diff[2]))
                dump_through(seq)
                if progress is not None:
                    progress(i, n)
                i += 1
                pio_index = 0
                while i < n and rows[i]["kind"] != "EXIT":
                    row = rows[i]
                    kind = row["kind"]
                    if kind == "PIO":
                        self._pio(row, run, reason, pio_index)
                        pio_index += 1
                    elif kind == "MMIO":
                        self._mmio(row, run, reason)
                    elif kind == "MSR":
                        self._msr(row, run, reason)
                    elif kind == "EMULATION":
                        self._emulation(row, vp, vcpu)
                    elif kind == "INTERRUPT":
                        if row["source"] != "exception":  # exceptions come with their emulation entry's outputs
                            vcpu.flush_regs()
                            vcpu.interrupt(int(row["vector"]))
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
                if status is not None:
                    break
        except Divergence as div:
            divergence = div
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
        )

    # -- feeding one exit --------------------------------------------------------------------------
    @staticmethod
    def _pio(row: dict[str, Any], run: Any, reason: int, index: int) -> None:
        from vmm.kvm.system import ffi, lib

        seq = row["seq"]
        if reason != lib.KVM_EXIT_IO:
            raise Divergence(seq, "PIO", "exit", "io", "not an I/O exit")
        io_ = run.io
        is_write = io_.direction == lib.KVM_EXIT_IO_OUT
        for name, rec, got in (("address", row["address"], io_.port), ("size", row["size"], io_.size), ("is_write", row["is_write"], is_write)):
            if rec != got:
                raise Divergence(seq, "PIO", name, rec, got)
        if index >= io_.count:
            raise Divergence(seq, "PIO", "count", index + 1, int(io_.count))
        size = io_.size
        data = ffi.cast("uint8_t *", run) + io_.data_offset + index * size
        if is_write:
            value = int.from_bytes(ffi.buffer(data, size), "little")
            if value != row["data"]:
                raise Divergence(seq, "PIO", "data", hex(row["data"]), hex(value))
        else:
            ffi.memmove(data, int(row["data"]).to_bytes(size, "little"), size)

    @staticmethod
    def _mmio(row: dict[str, Any], run: Any, reason: int) -> None:
        from vmm.kvm.system import ffi, lib

        seq = row["seq"]
        if reason != lib.KVM_EXIT_MMIO:
            raise Divergence(seq, "MMIO", "exit", "mmio", "not an MMIO exit")
        m = run.mmio
        for name, rec, got in (("address", row["address"], m.phys_addr), ("size", row["size"], m.len), ("is_write", row["is_write"], bool(m.is_write))):
            if rec != got:
                raise Divergence(seq, "MMIO", name, rec, got)
        if m.is_write:
            value = int.from_bytes(bytes(m.data[0 : m.len]), "little")
            if value != row["data"]:
                raise Divergence(seq, "MMIO", "data", hex(row["data"]), hex(value))
        else:
            ffi.memmove(m.data, int(row["data"]).to_bytes(m.len, "little"), m.len)

    @staticmethod
    def _msr(row: dict[str, Any], run: Any, reason: int) -> None:
        from vmm.kvm.system import lib

        seq = row["seq"]
        want = lib.KVM_EXIT_X86_WRMSR if row["is_write"] else lib.KVM_EXIT_X86_RDMSR
        if reason != want:
            raise Divergence(seq, "MSR", "exit", exit_name_of(want), exit_name_of(reason))
        msr = run.msr
        if msr.index != row["msr"]:
            raise Divergence(seq, "MSR", "msr", hex(row["msr"]), hex(int(msr.index)))
        if row["is_write"]:
            if row["value"] is not None and int(msr.data) != row["value"]:
                raise Divergence(seq, "MSR", "value", hex(row["value"]), hex(int(msr.data)))
        elif not row["fault"]:
            msr.data = int(row["value"] or 0)
        msr.error = 1 if row["fault"] else 0

    @staticmethod
    def _emulation(row: dict[str, Any], vp: Any, vcpu: Any) -> None:
        """Apply what the recorded emulation entry wrote into the guest (registers, memory, exceptions)."""
        from vmm.hyperv.hvdef import HV_HYPERCALL_TRAP_INSN_LEN

        memory = vp.machine.memory
        for op, args, _result in loads(row["emu_io"]) or []:
            if op == "set_register":
                _vp, vtl, name, value = args
                vp.regfiles[vtl].set(name, decode_value(value))
            elif op == "set_xmm":
                _vp, vtl, index, value = args
                vp.regfiles[vtl].set_xmm(index, value)
            elif op == "write_gpa":
                _vtl, gpa, data = args
                memory.write(gpa, decode_value(data))
            elif op == "inject_exception":
                _vp, vtl, vector, error_code = args
                target = vp.vcpus[vtl]
                target.flush_regs()
                events = target.get_events()
                events.exception.injected = 1
                events.exception.nr = vector
                events.exception.has_error_code = 1 if error_code is not None else 0
                events.exception.error_code = error_code or 0
                target.set_events(events)
            elif op == "tlb.flush_vps":
                vcpu.flush_regs()
                vcpu.set_sregs(vcpu.get_sregs())
        if row["entry"] == "hypercall":
            result = loads(row["emu_result"])
            fields = result.get("f", {}) if isinstance(result, dict) else {}
            if fields.get("retry") or fields.get("exception") is not None:
                regs = vcpu.get_regs()  # the backend rewinds onto the trapping OUT (see hyperv_backend.on_trap)
                if regs.rip & 0xFFF == HV_HYPERCALL_TRAP_INSN_LEN:
                    regs.rip -= HV_HYPERCALL_TRAP_INSN_LEN
                    vcpu.set_regs(regs)


def exit_name_of(reason: int) -> str:
    from vmm.kvm.exits import exit_name

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
    lines.append(f"time: re-execution {report.seconds:.3f} s, recording {report.recorded_seconds:.3f} s")
    for p in report.dumps:
        lines.append(f"memory dump written to {p}")
    return "\n".join(lines)
