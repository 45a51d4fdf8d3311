"""VTL switches answered in C while recording: what one native record stands for.

While a machine records, the hypercall fast path still answers a VTL call from VTL0 and a
fast VTL return from VTL1 when its mirror says the switch is plain
(vmm/backends/_hypercall_fastpath_build.py, ``hc_vtl_switch``), and records each as one
native record in the trace's C store: the registers the exit left, VTL1's control area before
a call wrote it, the time the switch took. A switch answered in C then costs the VP thread no
Python at all; the trace writer expands the record, at flush time and on its own thread, into
the rows the Python switch records for the same switch:

- a call: the entry notification's EMULATION (``vtl_entry``), VTL_SWITCH, HYPERCALL, and the
  hypercall's EMULATION with its I/O log;
- a return: VTL_SWITCH, HYPERCALL, and the hypercall's EMULATION.

Seqs and entry orders are the record's own (the store reserved them), so the trace is the one
the Python path would have written, but for times: every row of a record carries the time it
was stored, and ``duration_ns`` is measured in C. Replay runs these entries through the
emulation like any other, so a record that says something the emulation would not have done is
a divergence (tests/test_recorded_switch.py also compares the rows with the Python path's).
The ready conditions that let C answer a switch (vmm/backends/vsm.py, ``refresh_fast_switch``)
are what make the I/O logs below complete: no VINA, no TLB lock, VTL1's control area in RAM.
"""

from __future__ import annotations

import struct
from typing import Any

from vsmtrace.vmm.emulation_io import encode, json_writer
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.hyperv.hvdef import HvVpVtlControl, HypercallCode
from vsmtrace.vmm.hyperv.hypercall import HypercallOutcome
from vsmtrace.vmm.protocol import Entry, Op, VsmOp
from vsmtrace.vmm.vp import Access, CpuMode
from vsmtrace.vmm.vsm.services import EntryReason, SwitchReason, VtlTransition

#: A native record as the store hands it: (seq, time_ns, order, then the C side's 16 words).
SEQ, TIME, ORDER, TAG, VP, FROM_VTL, RIP, RCX, RAX, RDX, R8, R9, R10, CONTROL_GPA = range(14)
CONTROL_BYTES = slice(14, 17)  # VTL1's control area before a call wrote it (24 bytes as three words)
DURATION_NS, RESUME_RIP = 17, 18
#: The record's tags (``VSM_HC_RECORD_*`` of the C source; the fast path checks them at load).
CALL, RETURN = 1, 2
NO_CONTROL = (1 << 64) - 1
#: The store's status that makes C hand the next switch to Python (recorder/_store_build.py, VSMT_LATE).
STORE_LATE = 2

_WORDS = struct.Struct("<3Q")
_REGS_IN = struct.Struct("<QQ")  # the dispatcher's register reads of a VTL call/return: RCX (control), RAX (input)
_RETURN_REGS = struct.Struct("<QQ")
_RETURN_REGS_AT = 8  # VtlReturnX64Rax, VtlReturnX64Rcx
_LONG = int(CpuMode.LONG)
_HYPERCALL = EventKind.HYPERCALL
_NAMES = {CALL: HypercallCode.HvCallVtlCall.name, RETURN: HypercallCode.HvCallVtlReturn.name}
assert HvVpVtlControl.SIZE == _WORDS.size


class RecordedSwitches:
    """Expands the VTL switch records of one machine (``TraceWriter.register_native`` decoder)."""

    def __init__(self) -> None:
        self.dumps = json_writer()
        self.emit_hypercall = encode(_HYPERCALL)
        self.read = encode(Access.READ)
        self.entry_reason = encode(EntryReason.VTL_CALL)

    def __call__(self, record: tuple[int, ...]) -> list[tuple[EventKind, int, int, int | None, dict[str, Any]]]:
        tag = record[TAG]
        if tag not in _NAMES:
            raise ValueError(f"not a VTL switch record (tag {tag})")
        call = tag == CALL
        vp, vtl, rip, rcx, rax = record[VP], record[FROM_VTL], record[RIP], record[RCX], record[RAX]
        to_vtl = 1 - vtl
        reason = SwitchReason.CALL if call else SwitchReason.RETURN
        transition = VtlTransition(vp, vtl, to_vtl, reason)
        seq, order = record[SEQ], record[ORDER]
        hypercall_seq = seq + (2 if call else 1)
        dumps = self.dumps
        code = int(HypercallCode.HvCallVtlCall if call else HypercallCode.HvCallVtlReturn)
        hypercall_io = [
            [Op.MODE, [vp, vtl], _LONG],
            [Op.GET_REGISTER, [vp, vtl, "rip"], rip],
            [Op.CPL, [vp, vtl], 0],
            [Op.GET_REGISTER, [vp, vtl, "rcx"], rcx],
            [Op.GET_REGISTER, [vp, vtl, "rax"], rax],
            [VsmOp.REQUEST_TRANSITION, [encode(transition)], None],
            [Op.EMIT, [self.emit_hypercall], hypercall_seq],
        ]
        events: list[tuple[EventKind, int, int, int | None, dict[str, Any]]] = []
        if call:
            events.append((EventKind.EMULATION, vp, to_vtl, None, self._vtl_entry(record, order + 1)))
        events.append((
            EventKind.VTL_SWITCH, vp, vtl, record[RESUME_RIP],
            {
                "from_vtl": vtl, "to_vtl": to_vtl, "reason": reason.value,
                "args": (record[RDX], record[R8], record[R9], record[R10]) if call else None,
            },
        ))  # fmt: skip
        events.append((
            _HYPERCALL, vp, vtl, rip,
            {
                "code": code, "name": _NAMES[tag], "duration_ns": record[DURATION_NS], "control": rcx,
                "fast": False, "rep_count": 0, "rep_start": 0, "reps_done": 0, "status": None, "status_name": "NONE",
                "input": b"", "output": b"", "regs_in": _REGS_IN.pack(rcx, rax), "regs_out": b"",
            },
        ))  # fmt: skip
        events.append((
            EventKind.EMULATION, vp, vtl, None,
            {
                "entry": Entry.HYPERCALL, "emu_order": order, "emu_args": dumps([vp, vtl]), "emu_io": dumps(hypercall_io),
                "emu_result": dumps(encode(HypercallOutcome(code=code, vtl_action=transition))),
            },
        ))  # fmt: skip
        return events

    def _vtl_entry(self, record: tuple[int, ...], order: int) -> dict[str, Any]:
        """The entry notification of a call (``Vsm.on_vtl_entry``): VTL1's control area, read and rewritten."""
        vp, rax, rcx, gpa = record[VP], record[RAX], record[RCX], record[CONTROL_GPA]
        io: list[Any] = []
        if gpa != NO_CONTROL:
            before = _WORDS.pack(*record[CONTROL_BYTES])
            after = bytearray(before)
            after[:4] = int(EntryReason.VTL_CALL).to_bytes(4, "little")  # VINA status (byte 4) kept: VINA is off
            _RETURN_REGS.pack_into(after, _RETURN_REGS_AT, rax, rcx)  # the shared RAX/RCX, as VTL1 now holds them
            io = [
                [Op.READ_GPA, [1, gpa, HvVpVtlControl.SIZE, self.read], encode(before)],
                [Op.GET_REGISTER, [vp, 1, "rax"], rax],
                [Op.GET_REGISTER, [vp, 1, "rcx"], rcx],
                [Op.WRITE_GPA, [1, gpa, encode(bytes(after))], None],
            ]
        dumps = self.dumps
        return {
            "entry": Entry.VTL_ENTRY, "emu_order": order, "emu_args": dumps([vp, 1, self.entry_reason, 0]),
            "emu_io": dumps(io), "emu_result": dumps(None),
        }  # fmt: skip
