"""The trace schema, defined once: writer, reader, replayer and analysis all import it.

A trace is a single wide Arrow table: one row per event, common columns first, then
typed per-kind columns that are null where a kind does not use them. One schema for
every kind keeps ``polars.scan_ipc`` to a single frame and lets analysis filter on
``kind`` without joins.

``emit(kind, vp, vtl, rip, **fields)`` field names are the column names, with three
exceptions where two kinds need different types under the same name (see
``FIELD_ALIASES``): SERIAL ``data`` (bytes) is stored in ``serial_data``, and
GUEST_EXIT / ERROR ``message`` (text) is stored in ``text``.

Bump ``SCHEMA_VERSION`` whenever a column changes meaning or type; readers refuse
newer versions rather than misinterpreting them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from vsmtrace.recorder.arrays import column
from vsmtrace.vmm.events import EventKind

SCHEMA_VERSION = 1

#: Schema-level metadata key holding the JSON trace metadata.
METADATA_KEY = b"vsmtrace"

#: Index type of the open-vocabulary string dictionaries (exit reasons, hypercall names...).
DICT_INDEX = pa.int32()


def _dict_string(index: pa.DataType = DICT_INDEX) -> pa.DataType:
    return pa.dictionary(index, pa.string())


@dataclass(frozen=True)
class Column:
    """One trace column: Arrow type, unit and the kinds that fill it (for docs and field metadata)."""

    name: str
    type: pa.DataType
    unit: str
    kinds: tuple[str, ...]
    doc: str

    @property
    def is_dictionary(self) -> bool:
        return pa.types.is_dictionary(self.type)


K = EventKind
_ALL = ("all",)

# Common columns: present (non-null) on every row. ``rip`` may be null for events
# not tied to an instruction (e.g. a timer expiry while the VP is outside the guest).
COMMON_COLUMNS: tuple[Column, ...] = (
    Column("seq", pa.uint64(), "count", _ALL, "Global sequence number, 0-based, consecutive across all VPs."),
    Column("time_ns", pa.int64(), "ns", _ALL, "Host CLOCK_MONOTONIC time since the trace started (metadata `start_monotonic_ns`)."),
    Column("vp", pa.uint16(), "index", _ALL, "Virtual processor index."),
    Column("vtl", pa.uint8(), "VTL", _ALL, "VTL that was active on the VP when the event happened (for VTL_SWITCH: the VTL left)."),
    Column("rip", pa.uint64(), "GVA", _ALL, "Guest RIP at the event (instruction that caused it); null if not meaningful."),
    Column("kind", pa.dictionary(pa.int8(), pa.string()), "enum", _ALL, "EventKind name (dictionary-encoded; the dictionary lists every EventKind in value order)."),
)

FIELD_COLUMNS: tuple[Column, ...] = (
    # EXIT
    Column("exit_reason", _dict_string(), "name", ("EXIT",), "KVM exit reason name, e.g. HLT, SHUTDOWN, INTERNAL_ERROR."),
    Column("exit_code", pa.uint32(), "enum", ("EXIT",), "Raw KVM_EXIT_* number."),
    Column("suberror", pa.uint32(), "enum", ("EXIT",), "KVM internal-error suberror (KVM_INTERNAL_ERROR_*)."),
    Column("gprs", pa.binary(), "bytes", ("EXIT",), "--deterministic: RAX..R15, RIP, RFLAGS at the exit as 18 little-endian u64 (vmm.deterministic.GPR_ORDER); what re-execution compares."),
    Column("entry_flags", pa.uint8(), "bits", ("EXIT",), "--deterministic: what the VMM asked of the entry that ended in this exit (bit 0: interrupt window requested)."),
    # PIO / MMIO / MSR
    Column("address", pa.uint64(), "port or GPA", ("PIO", "MMIO"), "I/O port (PIO) or guest-physical address (MMIO)."),
    Column("size", pa.uint8(), "bytes", ("PIO", "MMIO"), "Access width."),
    Column("is_write", pa.bool_(), "flag", ("PIO", "MMIO", "MSR"), "True for OUT / store / WRMSR."),
    Column("data", pa.uint64(), "value", ("PIO", "MMIO"), "Value written, or value returned to the guest for a read (little-endian, `size` bytes)."),
    Column("msr", pa.uint32(), "MSR index", ("MSR",), "MSR number (ECX)."),
    Column("value", pa.uint64(), "value", ("MSR",), "Value written (WRMSR) or returned (RDMSR); null if the access faulted."),
    Column("fault", pa.bool_(), "flag", ("MSR",), "True if the VMM injected #GP instead of completing the access."),
    # CPUID
    Column("leaf", pa.uint32(), "value", ("CPUID",), "EAX input."),
    Column("subleaf", pa.uint32(), "value", ("CPUID",), "ECX input."),
    Column("eax", pa.uint32(), "value", ("CPUID",), "EAX output."),
    Column("ebx", pa.uint32(), "value", ("CPUID",), "EBX output."),
    Column("ecx", pa.uint32(), "value", ("CPUID",), "ECX output."),
    Column("edx", pa.uint32(), "value", ("CPUID",), "EDX output."),
    # INTERRUPT / TIMER
    Column("vector", pa.uint8(), "vector", ("INTERRUPT",), "Interrupt vector injected."),
    Column("source", _dict_string(), "name", ("INTERRUPT",), "Why: apic-timer, ipi, synic, stimer, intercept, ..."),
    Column("timer", _dict_string(), "name", ("TIMER",), "Which timer expired: apic-timer, stimer0..3, ..."),
    Column("deadline_ns", pa.int64(), "ns", ("TIMER",), "Programmed deadline, same clock as `time_ns` (expiry lag = time_ns - deadline_ns)."),
    # HYPERCALL
    Column("code", pa.uint16(), "call code", ("HYPERCALL",), "Hypercall code (control bits 15:0)."),
    Column("name", _dict_string(), "name", ("HYPERCALL",), "Hypercall name, e.g. HvCallVtlCall."),
    Column("control", pa.uint64(), "bits", ("HYPERCALL",), "Full hypercall input value (RCX)."),
    Column("fast", pa.bool_(), "flag", ("HYPERCALL",), "Fast (register) calling convention."),
    Column("rep_count", pa.uint16(), "count", ("HYPERCALL",), "Rep count requested (0 for simple calls)."),
    Column("rep_start", pa.uint16(), "index", ("HYPERCALL",), "Rep start index from the control word."),
    Column("reps_done", pa.uint16(), "count", ("HYPERCALL",), "Reps completed (returned in RAX 43:32)."),
    Column("status", pa.uint16(), "HV_STATUS", ("HYPERCALL",), "Result status (RAX 15:0)."),
    Column("status_name", _dict_string(), "name", ("HYPERCALL",), "Status name, e.g. HV_STATUS_SUCCESS."),
    Column("input_gpa", pa.uint64(), "GPA", ("HYPERCALL",), "Input page GPA (RDX) of a slow call."),
    Column("output_gpa", pa.uint64(), "GPA", ("HYPERCALL",), "Output page GPA (R8) of a slow call."),
    Column("input", pa.binary(), "bytes", ("HYPERCALL",), "Guest memory the VMM read as hypercall input (slow calls)."),
    Column("output", pa.binary(), "bytes", ("HYPERCALL",), "Bytes the VMM wrote to the output page (slow calls)."),
    Column("regs_in", pa.binary(), "bytes", ("HYPERCALL",), "Packed little-endian register values read for fast calls (RDX, R8, XMM0-5 as used)."),
    Column("regs_out", pa.binary(), "bytes", ("HYPERCALL",), "Packed register values written for fast calls with output."),
    Column("duration_ns", pa.int64(), "ns", ("HYPERCALL",), "Time the VMM spent serving the call (trap to result written); null if not measured."),
    # VTL_SWITCH (reason also used by VP_STOP)
    Column("from_vtl", pa.uint8(), "VTL", ("VTL_SWITCH",), "VTL left."),
    Column("to_vtl", pa.uint8(), "VTL", ("VTL_SWITCH",), "VTL entered."),
    Column("reason", _dict_string(), "name", ("VTL_SWITCH", "VP_STOP"), "VTL_SWITCH: call, return, interrupt, intercept. VP_STOP: why the VP stopped."),
    Column("args", pa.list_(pa.uint64()), "values", ("VTL_SWITCH",), "Caller's argument registers at a VTL call: RDX, R8, R9, R10 (RAX/RCX hold the VTL call control and code); a secure call's service code is conventionally args[0]; null for other reasons."),
    # INTERCEPT (message also used by SYNIC_MESSAGE)
    Column("access", _dict_string(), "name", ("INTERCEPT",), "Denied access type: read, write, execute."),
    Column("gpa", pa.uint64(), "GPA", ("INTERCEPT",), "Guest-physical address accessed."),
    Column("gva", pa.uint64(), "GVA", ("INTERCEPT",), "Guest-virtual address, if known."),
    Column("insn_bytes", pa.binary(), "bytes", ("INTERCEPT",), "Instruction bytes fetched at RIP to decode the access."),
    Column("message", pa.binary(), "bytes", ("INTERCEPT", "SYNIC_MESSAGE"), "Raw Hyper-V message (HV_MESSAGE, header + payload) as delivered."),
    # PROTECTION / VTL_ENABLE
    Column("target_vtl", pa.uint8(), "VTL", ("PROTECTION", "VTL_ENABLE"), "VTL whose view is protected / the VTL being enabled."),
    Column("gpa_start", pa.uint64(), "GPA", ("PROTECTION",), "First guest-physical address (page aligned)."),
    Column("pages", pa.uint64(), "4 KiB pages", ("PROTECTION",), "Number of pages changed."),
    Column("old_mask", pa.uint8(), "HV_MAP_GPA_* bits", ("PROTECTION",), "Previous access mask, null if not uniform or unknown."),
    Column("new_mask", pa.uint8(), "HV_MAP_GPA_* bits", ("PROTECTION",), "New access mask (read=1, write=2, kernel exec=4, user exec=8)."),
    Column("target_vp", pa.uint32(), "index", ("VTL_ENABLE",), "VP being enabled; null for partition-wide enablement."),
    # SYNIC_MESSAGE
    Column("sint", pa.uint8(), "SINT", ("SYNIC_MESSAGE",), "Synthetic interrupt source the message was posted to."),
    Column("message_type", pa.uint32(), "HV_MESSAGE_TYPE", ("SYNIC_MESSAGE",), "Message type (e.g. 0x80000001 GPA intercept)."),
    # GUEST_EXIT / ERROR / SERIAL
    Column("exit_status", pa.int32(), "status", ("GUEST_EXIT",), "Guest exit status (isa-debug-exit: the value written; -1 triple fault)."),
    Column("text", pa.string(), "text", ("GUEST_EXIT", "ERROR", "LIMITATION"), "Human-readable message (emit field `message`)."),
    Column("serial_data", pa.binary(), "bytes", ("SERIAL",), "Bytes the guest wrote to the UART (emit field `data`): a line per event, up to and including its newline (vmm.console_output)."),
    # EMULATION (replay inputs and outputs; see vmm/emulation_io.py)
    Column("entry", _dict_string(), "name", ("EMULATION",), "Emulation entry point called by the machine: hypercall, msr_read, msr_write, timer, eoi, auto_eoi, vtl_entry, post_intercept, vina, test_device."),
    Column("emu_order", pa.uint64(), "count", ("EMULATION",), "Order in which entries started (entries nest: an entry's event is written when it ends)."),
    Column("emu_args", pa.binary(), "JSON", ("EMULATION",), "Arguments of the entry (JSON, vmm.emulation_io.encode)."),
    Column("emu_io", pa.binary(), "JSON", ("EMULATION",), "Every call the emulation made out of the entry, in order: [op, args, result]; reads carry their result (inputs), writes their arguments (outputs), `emit` the seq of the event emitted."),
    Column("emu_result", pa.binary(), "JSON", ("EMULATION",), "What the entry returned (or the exception it raised), JSON."),
    Column("detail", pa.string(), "JSON", ("EXIT", "VP_START", "VP_STOP", "VTL_ENABLE", "GUEST_EXIT", "ERROR", "LIMITATION"), "Rare-kind extras as a JSON object (emit a dict or a JSON string)."),
)

COLUMNS: tuple[Column, ...] = COMMON_COLUMNS + FIELD_COLUMNS
COLUMN_BY_NAME: dict[str, Column] = {c.name: c for c in COLUMNS}
COMMON_NAMES: tuple[str, ...] = tuple(c.name for c in COMMON_COLUMNS)

#: Emit field names that differ from their column name, per kind.
FIELD_ALIASES: dict[str, dict[str, str]] = {
    "SERIAL": {"data": "serial_data"},
    "GUEST_EXIT": {"message": "text"},
    "ERROR": {"message": "text"},
    "LIMITATION": {"message": "text"},
}


def _kind_fields() -> dict[EventKind, dict[str, str]]:
    """Per kind: emit field name -> column name, derived from the column table."""
    out: dict[EventKind, dict[str, str]] = {k: {} for k in EventKind}
    for col in FIELD_COLUMNS:
        for kname in col.kinds:
            out[EventKind[kname]][col.name] = col.name
    for kname, aliases in FIELD_ALIASES.items():
        fields = out[EventKind[kname]]
        for emit_name, col_name in aliases.items():
            del fields[col_name]
            fields[emit_name] = col_name
    return out


#: Per kind: the accepted emit field names and the column each one is stored in.
KIND_FIELDS: dict[EventKind, dict[str, str]] = _kind_fields()


def _kind_dictionary() -> list[str]:
    """EventKind names indexed by ``value - 1``; gaps (none today) get placeholder names."""
    top = max(k.value for k in EventKind)
    names = [f"KIND_{i + 1}" for i in range(top)]
    for k in EventKind:
        names[k.value - 1] = k.name
    return names


KIND_NAMES: list[str] = _kind_dictionary()
KIND_DICTIONARY: pa.Array = column(KIND_NAMES, pa.string())


def arrow_schema(metadata: Mapping[str, Any] | None = None) -> pa.Schema:
    """The Arrow schema, optionally carrying trace metadata as JSON under ``METADATA_KEY``."""
    fields = [
        pa.field(
            c.name,
            c.type,
            metadata={"unit": c.unit, "kinds": ",".join(c.kinds), "doc": c.doc},
        )
        for c in COLUMNS
    ]
    md = None if metadata is None else {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
    return pa.schema(fields, metadata=md)


def markdown_table() -> str:
    """The column reference table of docs/trace-format.md (kept generated so docs cannot drift)."""
    lines = ["| column | Arrow type | unit | kinds | meaning |", "|---|---|---|---|---|"]
    for c in COLUMNS:
        lines.append(f"| `{c.name}` | `{c.type}` | {c.unit} | {', '.join(c.kinds)} | {c.doc} |")
    return "\n".join(lines)


def kinds_markdown() -> str:
    """Per-kind emit field list for the docs."""
    lines = ["| kind | value | emit fields (column if different) |", "|---|---|---|"]
    for k in EventKind:
        parts = [f"`{f}`" if f == c else f"`{f}` → `{c}`" for f, c in KIND_FIELDS[k].items()]
        lines.append(f"| {k.name} | {k.value} | {', '.join(parts) or '—'} |")
    return "\n".join(lines)
