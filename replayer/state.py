"""What the replayer reconstructs at any event: registers, VSM, SynIC, timers, protections.

Registers are "as last seen": the emulation only sees what it asked for (a
hypercall reads RCX, RDX, ...), so each register carries the event at which it
was last read or written. Everything else comes from the replayed Hyper-V and
VSM objects themselves, which are in exactly the state the live ones were.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
from vsmtrace.recorder.arrays import scalar
from vsmtrace.vmm.emulation_io import decode_value, fields_of
from vsmtrace.vmm.protocol import Op, VsmOp
from vsmtrace.vmm.vp import Access, Segment, Table

if TYPE_CHECKING:
    from vsmtrace.vmm.vsm import Vsm

ACCESS_LETTERS = ((Access.READ, "R"), (Access.WRITE, "W"), (Access.EXECUTE, "X"))
#: The I/O ops the state keeps track of (registers as last seen, enabled VTLs, protections).
TRACKED_OPS = frozenset({Op.GET_REGISTER, Op.SET_REGISTER, VsmOp.CREATE_VTL, VsmOp.SET_PROTECTIONS})


def access_text(allowed: int) -> str:
    return "".join(letter if allowed & flag else "-" for flag, letter in ACCESS_LETTERS)


@dataclass
class ReplayState:
    """What a user inspects at an event; the parts kept from the I/O logs are brought up to date when read.

    Replay itself never looks at them, so it only notes which entries it replayed; reading
    ``registers``, ``enabled_vtls`` or ``protections`` folds those entries' logs in (a
    ``--state`` query pays for that once, a plain verification not at all).
    """

    vps: int
    vtls: int
    seq: int = -1
    entries: int = 0
    hv: Any = None
    vsm: Vsm | None = None
    table: pa.Table | None = None  # the trace: last RIPs and active VTLs are derived from its events
    _registers: dict[tuple[int, int], dict[str, tuple[Any, int]]] = field(default_factory=dict)  # (vp, vtl) → name → (value, seq)
    _enabled_vtls: set[int] = field(default_factory=lambda: {0})
    _protections: dict[int, dict[int, int]] = field(default_factory=dict)  # target VTL → page → allowed
    _unfolded: list[Any] = field(default_factory=list)  # entries replayed whose I/O logs are not folded in yet

    @classmethod
    def for_config(cls, config: dict[str, Any]) -> ReplayState:
        return cls(vps=int(config["vps"]), vtls=int(config.get("vtls", 1)))

    def attach(self, hv: Any, vsm: Any) -> None:
        self.hv, self.vsm = hv, vsm

    # -- fed by the replay ------------------------------------------------------------------------
    def after_entry(self, entry: Any) -> None:
        """``entry`` (with ``seq`` and its decoded log ``io``) was replayed identically."""
        self.seq = entry.seq
        self.entries += 1
        self._unfolded.append(entry)

    @property
    def registers(self) -> dict[tuple[int, int], dict[str, tuple[Any, int]]]:
        """(vp, vtl) → register name → (value, event where it was last read or written)."""
        self._fold()
        return self._registers

    @property
    def enabled_vtls(self) -> set[int]:
        self._fold()
        return self._enabled_vtls

    @property
    def protections(self) -> dict[int, dict[int, int]]:
        """Target VTL → page → allowed access (pages never changed are absent)."""
        self._fold()
        return self._protections

    def _fold(self) -> None:
        for entry in self._unfolded:
            for op, args, result in entry.io:
                if op in TRACKED_OPS:
                    self._apply(entry.seq, op, args, result)
        self._unfolded.clear()

    def _apply(self, seq: int, op: str, args: list[Any], result: Any) -> None:
        if op == Op.GET_REGISTER:
            vp, vtl, name = args
            self._registers.setdefault((vp, vtl), {})[name] = (decode_value(result), seq)
        elif op == Op.SET_REGISTER:
            vp, vtl, name, value = args
            self._registers.setdefault((vp, vtl), {})[name] = (decode_value(value), seq)
        elif op == VsmOp.CREATE_VTL:
            self._enabled_vtls.add(int(args[0]))
        elif op == VsmOp.SET_PROTECTIONS:
            target, runs = args
            pages = self._protections.setdefault(int(target), {})
            for run in runs:
                f = fields_of(run)
                for page in range(f["first_page"], f["first_page"] + f["count"]):
                    pages[page] = int(f["allowed"])

    def finish_at(self, seq: int) -> None:
        """Make this the state right after event ``seq`` (RIPs and VTLs come from the events up to it)."""
        self.seq = seq

    def last_rips(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(vp, vtl) -> (last RIP, its event) from the trace's events up to :attr:`seq`, computed on demand."""
        if self.table is None:
            return {}
        seqs = self.table.column("seq")
        upto = self.table.filter(pc.less_equal(seqs, scalar(self.seq, seqs.type))).select(["seq", "vp", "vtl", "rip"])
        rip = upto.column("rip")
        upto = upto.filter(pc.and_(pc.is_valid(rip), pc.not_equal(rip, scalar(0, rip.type))))
        rips: dict[tuple[int, int], tuple[int, int]] = {}
        for seq, vp, vtl, rip in zip(*(upto.column(c).to_pylist() for c in ("seq", "vp", "vtl", "rip")), strict=True):
            rips[(vp, vtl)] = (rip, seq)
        return rips

    def active_vtls(self) -> dict[int, int]:
        """VP -> the VTL it was in after event :attr:`seq`, from the VTL_SWITCH events.

        Entries by interrupt or intercept never pass through the emulation's
        request_transition, so the recorded switches are the authority.
        """
        if self.table is None:
            return {}
        kinds = pc.cast(self.table.column("kind"), pa.string())
        seqs = self.table.column("seq")
        mask = pc.and_(pc.equal(kinds, scalar("VTL_SWITCH", pa.string())), pc.less_equal(seqs, scalar(self.seq, seqs.type)))
        switches = self.table.filter(mask).select(["vp", "to_vtl"])
        active: dict[int, int] = {}
        for vp, to_vtl in zip(switches.column("vp").to_pylist(), switches.column("to_vtl").to_pylist(), strict=True):
            active[vp] = to_vtl
        return active

    # -- views ------------------------------------------------------------------------------------------
    def protection_runs(self, target_vtl: int) -> list[tuple[int, int, str]]:
        """(first page, count, "RWX") runs of pages whose access differs from full access."""
        pages = sorted(p for p, a in self.protections.get(target_vtl, {}).items() if a != int(Access.READ | Access.WRITE | Access.EXECUTE))
        runs: list[tuple[int, int, str]] = []
        for p in pages:
            text = access_text(self.protections[target_vtl][p])
            if runs and runs[-1][0] + runs[-1][1] == p and runs[-1][2] == text:
                first, count, _ = runs[-1]
                runs[-1] = (first, count + 1, text)
            else:
                runs.append((p, 1, text))
        return runs

    def synic_state(self, vp: int, vtl: int) -> dict[str, Any]:
        synic = self.hv.synic(vp, vtl)
        timers = self.hv.stimers(vp, vtl)
        msrs = self.hv.msrs(vp, vtl)
        return {
            "scontrol": synic.scontrol,
            "simp": synic.simp,
            "siefp": synic.siefp,
            "sints": list(synic.sints),
            "queued_messages": [len(q) for q in synic.queues],
            "stimers": [
                {"config": t.config, "count": t.count, "deadline": t.deadline} for t in timers.timers
            ],
            "vp_assist_page": getattr(msrs, "vp_assist_page", 0),
        }

    def partition_state(self) -> dict[str, Any] | None:
        """Partition-wide Hyper-V state: the partition id and each VTL's partition MSRs."""
        if self.hv is None:
            return None
        vtls = {}
        for vtl in range(self.vtls):
            m = self.hv.vtl_msrs(vtl)
            vtls[f"vtl{vtl}"] = {"guest_os_id": m.guest_os_id, "hypercall": m.hypercall, "reference_tsc": m.reference_tsc}
        return {"partition_id": self.hv.partition_id, "msrs": vtls}

    def vsm_state(self) -> Any:
        """The replayed VSM logic's own state (``vmm.vsm.state.VsmState``), as plain values."""
        if self.vsm is None:
            return None
        return _plain(dataclasses.asdict(self.vsm.state))

    def to_dict(self) -> dict[str, Any]:
        vps: dict[str, Any] = {}
        rips = self.last_rips()
        active = self.active_vtls()
        for vp in range(self.vps):
            per_vtl: dict[str, Any] = {}
            for vtl in range(self.vtls):
                regs = {name: {"value": _plain(v), "seq": s} for name, (v, s) in sorted(self.registers.get((vp, vtl), {}).items())}
                rip = rips.get((vp, vtl))
                entry: dict[str, Any] = {"registers": regs, "last_rip": None if rip is None else {"value": rip[0], "seq": rip[1]}}
                if self.hv is not None:
                    entry["synic"] = self.synic_state(vp, vtl)
                per_vtl[f"vtl{vtl}"] = entry
            vps[f"vp{vp}"] = {"active_vtl": active.get(vp, 0), **per_vtl}
        return {
            "seq": self.seq,
            "entries_replayed": self.entries,
            "enabled_vtls": sorted(self.enabled_vtls),
            "partition": self.partition_state(),
            "vps": vps,
            "vsm": self.vsm_state(),
            "protections": {
                f"vtl{t}": [{"first_gpa": p << 12, "pages": n, "allowed": a} for p, n, a in self.protection_runs(t)]
                for t in sorted(self.protections)
            },
        }

    def format_text(self) -> str:
        d = self.to_dict()
        lines = [f"state after event {d['seq']} ({d['entries_replayed']} emulation entries replayed)"]
        lines.append(f"enabled VTLs: {', '.join(f'VTL{v}' for v in d['enabled_vtls'])}")
        part = d["partition"]
        if part is not None:
            lines.append(f"partition id {part['partition_id']:#x}")
            for vtl_name, m in part["msrs"].items():
                if any(m.values()):
                    lines.append(f"  {vtl_name}: " + " ".join(f"{k}={v:#x}" for k, v in m.items()))
        for vp_name, vp in d["vps"].items():
            lines.append(f"{vp_name}: active VTL{vp['active_vtl']}")
            for vtl_name in sorted(k for k in vp if k.startswith("vtl")):
                v = vp[vtl_name]
                rip = v["last_rip"]
                lines.append(f"  {vtl_name}: last rip {rip['value']:#x} (event {rip['seq']})" if rip else f"  {vtl_name}: not seen")
                for name, reg in v["registers"].items():
                    value = reg["value"]
                    shown = f"{value:#x}" if isinstance(value, int) else (
                        " ".join(f"{a}={_text_value(b)}" for a, b in value.items()) if isinstance(value, dict) else value
                    )
                    lines.append(f"    {name:<10} {shown}  (event {reg['seq']})")
                syn = v.get("synic")
                if syn and (syn["scontrol"] or syn["simp"] or syn["siefp"]):
                    lines.append(f"    synic: scontrol={syn['scontrol']:#x} simp={syn['simp']:#x} siefp={syn['siefp']:#x}")
                    active = [f"sint{i}={s:#x}" for i, s in enumerate(syn["sints"]) if s != 0x10000]
                    if active:
                        lines.append(f"      {' '.join(active)}")
                    for i, t in enumerate(syn["stimers"]):
                        if t["config"]:
                            lines.append(f"      stimer{i}: config={t['config']:#x} count={t['count']} deadline={t['deadline']}")
        for vtl_name, runs in d["protections"].items():
            lines.append(f"protections of {vtl_name}'s view ({len(runs)} runs):")
            for r in runs[:50]:
                lines.append(f"  {r['first_gpa']:#014x} +{r['pages']:<6} pages {r['allowed']}")
        if d["vsm"] is not None:
            lines.append("vsm:")
            lines += _text_lines(d["vsm"], "  ")
        return "\n".join(lines)


def _text_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, int):
        return f"{value:#x}" if value > 9 else str(value)
    return str(value)


def _text_lines(obj: Any, indent: str) -> list[str]:
    """Plain data as indented ``key  value`` lines (integers above 9 in hex), for people rather than parsers."""
    if isinstance(obj, dict):
        if not obj:
            return [f"{indent}-"]
        width = max(len(str(k)) for k in obj)
        lines: list[str] = []
        for k, v in obj.items():
            if isinstance(v, dict | list | tuple) and v and any(isinstance(x, dict | list | tuple) for x in (v.values() if isinstance(v, dict) else v)):
                lines.append(f"{indent}{k}")
                lines += _text_lines(v, indent + "  ")
            elif isinstance(v, dict):
                lines.append(f"{indent}{str(k):<{width}}  " + (", ".join(f"{_text_value(a)}={_text_value(b)}" for a, b in v.items()) or "-"))
            elif isinstance(v, list | tuple):
                lines.append(f"{indent}{str(k):<{width}}  " + (" ".join(_text_value(x) for x in v) or "-"))
            else:
                lines.append(f"{indent}{str(k):<{width}}  {_text_value(v)}")
        return lines
    if isinstance(obj, list | tuple):
        lines = []
        for i, x in enumerate(obj):
            if isinstance(x, dict | list | tuple):
                lines.append(f"{indent}[{i}]")
                lines += _text_lines(x, indent + "  ")
            else:
                lines.append(f"{indent}{_text_value(x)}")
        return lines or [f"{indent}-"]
    return [f"{indent}{_text_value(obj)}"]


def _plain(value: Any) -> Any:
    if isinstance(value, Segment):
        return {"base": value.base, "limit": value.limit, "selector": value.selector, "attributes": value.attributes}
    if isinstance(value, Table):
        return {"base": value.base, "limit": value.limit}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    return value
