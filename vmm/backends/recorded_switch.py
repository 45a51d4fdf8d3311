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
from dataclasses import dataclass
from typing import Any

from vsmtrace.vmm.emulation_io import encode, json_writer
from vsmtrace.vmm.events import EventKind
from vsmtrace.vmm.hyperv.hvdef import HvVpAssistPageLayout, HvVpVtlControl, HypercallCode
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
_RETURN_REGS_AT = HvVpAssistPageLayout.VTL_RETURN_X64_RAX - HvVpAssistPageLayout.VTL_CONTROL  # then VtlReturnX64Rcx
_LONG = int(CpuMode.LONG)
_HYPERCALL = EventKind.HYPERCALL
_NAMES = {CALL: HypercallCode.HvCallVtlCall.name, RETURN: HypercallCode.HvCallVtlReturn.name}
_CALL_REASON = int(EntryReason.VTL_CALL).to_bytes(4, "little")
assert HvVpVtlControl.SIZE == _WORDS.size


@dataclass(frozen=True, slots=True)
class _Shape:
    """What every switch of one kind (call or return) on one VP records alike, encoded once."""

    vtl: int
    switch: dict[str, Any]  # the VTL_SWITCH fields but ``args``
    hypercall: dict[str, Any]  # the HYPERCALL fields but RCX, RAX and the duration
    io_head: list[Any]  # the hypercall's I/O log up to its register reads
    io_tail: Any  # ... its request of the switch
    entry: dict[str, Any]  # the hypercall EMULATION fields but order and I/O log
    vtl_entry: dict[str, Any]  # a call's entry notification EMULATION fields but order and I/O log


Event = tuple[EventKind, int, int, "int | None", dict[str, Any]]


class RecordedSwitches:
    """Expands the VTL switch records of one machine (``TraceWriter.register_native`` decoder).

    Runs on the writer's flushing thread, beside the guest: everything that is the same for
    every switch of a kind on a VP is encoded once (``_Shape``), so a record costs a few dicts.
    """

    def __init__(self) -> None:
        self.dumps = json_writer()
        self.emit_hypercall = encode(_HYPERCALL)
        self.read = encode(Access.READ)
        self.shapes: dict[tuple[int, int], _Shape] = {}

    def shape(self, tag: int, vp: int) -> _Shape:
        if tag not in _NAMES:
            raise ValueError(f"not a VTL switch record (tag {tag})")
        call = tag == CALL
        vtl = 0 if call else 1
        reason = SwitchReason.CALL if call else SwitchReason.RETURN
        transition = VtlTransition(vp, vtl, 1 - vtl, reason)
        code = int(HypercallCode.HvCallVtlCall if call else HypercallCode.HvCallVtlReturn)
        dumps = self.dumps
        shape = self.shapes[tag, vp] = _Shape(
            vtl=vtl,
            switch={"from_vtl": vtl, "to_vtl": 1 - vtl, "reason": reason.value},
            hypercall={
                "code": code, "name": _NAMES[tag], "fast": False, "rep_count": 0, "rep_start": 0, "reps_done": 0,
                "status": None, "status_name": "NONE", "input": b"", "output": b"", "regs_out": b"",
            },
            io_head=[[Op.MODE, [vp, vtl], _LONG]],
            io_tail=[VsmOp.REQUEST_TRANSITION, [encode(transition)], None],
            entry={
                "entry": Entry.HYPERCALL, "emu_args": dumps([vp, vtl]),
                "emu_result": dumps(encode(HypercallOutcome(code=code, vtl_action=transition))),
            },
            vtl_entry={
                "entry": Entry.VTL_ENTRY, "emu_args": dumps([vp, 1, encode(EntryReason.VTL_CALL), 0]),
                "emu_result": dumps(None),
            },
        )  # fmt: skip
        return shape

    def __call__(self, record: tuple[int, ...]) -> list[Event]:
        tag, vp = record[TAG], record[VP]
        shape = self.shapes.get((tag, vp)) or self.shape(tag, vp)
        vtl, rip, rcx, rax = shape.vtl, record[RIP], record[RCX], record[RAX]
        if record[FROM_VTL] != vtl:
            raise ValueError(f"a VTL switch record of VTL{record[FROM_VTL]} with tag {tag}")
        seq, order = record[SEQ], record[ORDER]
        call = tag == CALL
        dumps = self.dumps
        io = [
            *shape.io_head,
            [Op.GET_REGISTER, [vp, vtl, "rip"], rip],
            [Op.CPL, [vp, vtl], 0],
            [Op.GET_REGISTER, [vp, vtl, "rcx"], rcx],
            [Op.GET_REGISTER, [vp, vtl, "rax"], rax],
            shape.io_tail,
            [Op.EMIT, [self.emit_hypercall], seq + (2 if call else 1)],
        ]
        args = (record[RDX], record[R8], record[R9], record[R10]) if call else None
        events: list[Event] = [
            (EventKind.VTL_SWITCH, vp, vtl, record[RESUME_RIP], {**shape.switch, "args": args}),
            (_HYPERCALL, vp, vtl, rip, {
                **shape.hypercall, "duration_ns": record[DURATION_NS], "control": rcx, "regs_in": _REGS_IN.pack(rcx, rax),
            }),
            (EventKind.EMULATION, vp, vtl, None, {**shape.entry, "emu_order": order, "emu_io": dumps(io)}),
        ]  # fmt: skip
        if call:
            events.insert(0, (EventKind.EMULATION, vp, 1, None, {
                **shape.vtl_entry, "emu_order": order + 1, "emu_io": dumps(self._vtl_entry_io(record)),
            }))  # fmt: skip
        return events

    def _vtl_entry_io(self, record: tuple[int, ...]) -> list[Any]:
        """The I/O of a call's entry notification (``Vsm.on_vtl_entry``): VTL1's control area, read and rewritten."""
        vp, rax, rcx, gpa = record[VP], record[RAX], record[RCX], record[CONTROL_GPA]
        if gpa == NO_CONTROL:
            return []
        before = _WORDS.pack(*record[CONTROL_BYTES])
        after = bytearray(before)
        after[:4] = _CALL_REASON  # VINA status (byte 4) kept: VINA is off while C switches
        _RETURN_REGS.pack_into(after, _RETURN_REGS_AT, rax, rcx)  # the shared RAX/RCX, as VTL1 now holds them
        return [
            [Op.READ_GPA, [1, gpa, HvVpVtlControl.SIZE, self.read], encode(before)],
            [Op.GET_REGISTER, [vp, 1, "rax"], rax],
            [Op.GET_REGISTER, [vp, 1, "rcx"], rcx],
            [Op.WRITE_GPA, [1, gpa, encode(bytes(after))], None],
        ]
