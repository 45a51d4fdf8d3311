"""Hypercall ABI decoding and dispatch (the part OpenVMM calls ``hv1_hypercall``).

Only the calling convention lives here; what a call *does* is a handler registered in one
table keyed by :class:`~vmm.hyperv.hvdef.HypercallCode`. For every call the dispatcher:

1. checks the caller's mode: real mode or CPL > 0 → #UD (``VpAccess.inject_exception``);
   a VTL whose hypercall page is not enabled → #UD.
2. decodes the input value (x64: RCX; x86: EDX:EAX): unknown or unadvertised code →
   INVALID_HYPERCALL_CODE; missing privilege → ACCESS_DENIED; reserved/nested bits, a rep
   count on a simple call, a zero rep count or rep start >= rep count on a rep call, or a
   variable header on a call without one → INVALID_HYPERCALL_INPUT.
3. gathers input. Memory calls: input GPA (RDX / EBX:ECX) and output GPA (R8 / EDI:ESI)
   must be 8-byte aligned, must not cross a page and must not overlap →
   INVALID_ALIGNMENT. Input is read through ``PartitionAccess.read_gpa(caller_vtl, ...)`` and
   the output range is probed with ``Access.WRITE`` *before* the handler runs; a
   ``VtlAccessDenied`` becomes ACCESS_DENIED (so a lower VTL cannot use a hypercall as a
   confused deputy), a GPA outside RAM INVALID_ALIGNMENT. Fast calls: the same byte layout
   is taken from register pairs (RDX:R8, then XMM0..XMM5, low qword first); more than 16
   bytes needs XMM fast input (#UD if not advertised), more than 112 →
   INVALID_HYPERCALL_INPUT. Output of a fast call goes to the pairs after the input
   (``ceil(in/16)``), which needs XMM fast output (#UD if not advertised). 32-bit callers
   have a single pair (EBX:ECX, EDI:ESI) and no XMM.
4. calls the handler with a :class:`HypercallInput` (fixed header, variable header, the rep
   elements from rep start on) and writes its :class:`HypercallResult`: simple output, or rep
   output elements at their absolute positions; result value = status | reps completed << 32
   in RAX (EDX:EAX). A rep handler that stops early with SUCCESS is continued the TLFS way:
   RCX gets the new rep start, RAX is untouched and ``HypercallOutcome.retry`` tells the
   machine not to advance RIP (re-execute the trapping ``out``).
5. emits one HYPERCALL event (fields: code, name, control, fast, rep_count, rep_start,
   reps_done, status, status_name, input, output, regs_in, regs_out). ``regs_in``/``regs_out``
   are the little-endian concatenation of every register read/written, in order (8 bytes per
   GPR, 16 per XMM). ``status`` is -1 when no result was written (#UD, VTL call/return).

VTL call and VTL return (0x11/0x12) do not return a result (RAX is shared state): they go
to the hook installed with :meth:`HypercallDispatcher.set_vtl_hook` (the VSM stage). Without
a hook they are unknown codes.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vsmtrace.vmm.events import EventKind, EventSink
from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.hyperv.hvdef import (
    HV_HYPERCALL_ALIGNMENT,
    HV_PAGE_SIZE,
    HV_X64_FAST_INPUT_MAX,
    HV_X64_REGISTER_PAIR_SIZE,
    HV_X86_FAST_INPUT_MAX,
    HvPartitionPrivilege,
    HvStatus,
    HypercallCode,
    HypercallControl,
    X86Exception,
    hypercall_result,
)
from vsmtrace.vmm.vp import Access, CpuMode, GuestMemoryError, PartitionAccess, VpAccess, VtlAccessDenied

_U32 = 0xFFFF_FFFF
_U64 = (1 << 64) - 1
#: Decoded hypercall input values kept (vsmtrace's choice): a guest uses few distinct control
#: values, and decoding is immutable, so each is decoded once.
HYPERCALL_CONTROL_CACHE = 4096
_decode_control = functools.lru_cache(maxsize=HYPERCALL_CONTROL_CACHE)(HypercallControl.decode)


_QWORD = 8
_PAIR = struct.Struct("<QQ")
#: Code and status values to their members and names: a dict lookup per call instead of an Enum constructor.
_CODES: dict[int, HypercallCode] = {int(c): c for c in HypercallCode}
_CODE_NAMES: dict[int, str] = {int(c): c.name for c in HypercallCode}
_STATUSES: dict[int, HvStatus] = {int(s): s for s in HvStatus}
_STATUS_NAMES: dict[int, str] = {int(s): s.name for s in HvStatus}
_VTL_CALL_CODES = frozenset({HypercallCode.HvCallVtlCall, HypercallCode.HvCallVtlReturn})


@dataclass(slots=True)
class HypercallInput:
    """A decoded hypercall as a handler sees it."""

    vp: int
    vtl: int
    code: HypercallCode
    control: int
    fast: bool
    header: bytes
    var_header: bytes
    rep_start: int
    rep_count: int
    rep_elements: list[bytes]
    is_64bit: bool

    @property
    def is_rep(self) -> bool:
        return self.rep_count > 0


@dataclass
class HypercallResult:
    """A handler's answer.

    ``rep_outputs[j]`` is the output of element ``rep_start + j``. ``reps_done`` is absolute;
    if omitted it is ``rep_count`` on success and ``rep_start + len(rep_outputs)`` on failure.
    ``retry`` means "not now": no result or output is written (RCX keeps its value) and the outcome
    tells the machine to re-execute the trapping instruction later (VSM TLB locks).
    """

    status: HvStatus = HvStatus.HV_STATUS_SUCCESS
    output: bytes = b""
    rep_outputs: list[bytes] = field(default_factory=list)
    reps_done: int | None = None
    retry: bool = False


Handler = Callable[[HypercallInput], HypercallResult]


@dataclass(frozen=True)
class HypercallSpec:
    """How to decode one call: sizes, kind, gating; and the handler that implements it."""

    code: HypercallCode
    handler: Handler
    input_size: int = 0
    output_size: int = 0
    rep: bool = False
    rep_input_size: int = 0
    rep_output_size: int = 0
    variable_header: bool = False
    privilege: HvPartitionPrivilege | None = None
    advertised: Callable[[HypervPolicy], bool] = lambda policy: True
    #: The name of a C implementation of exactly this handler that a machine may answer the call with
    #: while nothing records (vmm/backends/hypercall_fastpath.py); "" when there is none. A spec that
    #: replaces this one drops it, and with it the C answer.
    native: str = ""


@dataclass(slots=True)
class VtlCallRequest:
    """What the VSM hook gets for HvCallVtlCall / HvCallVtlReturn."""

    vp: int
    vtl: int
    code: HypercallCode
    control: int
    vtl_input: int  # RAX (x64) / ECX (x86) at the trap
    is_64bit: bool


@dataclass(slots=True)
class HypercallOutcome:
    """What the machine needs to know after :meth:`HyperV.hypercall`.

    ``status`` is None when no result was written (#UD, VTL call/return). ``retry`` means the
    trapping instruction must execute again (RIP not advanced). ``vtl_action`` is whatever
    the VSM hook returned (e.g. a VTL switch for the run loop to perform).
    """

    code: int
    status: HvStatus | None = None
    reps_done: int = 0
    exception: int | None = None
    retry: bool = False
    vtl_action: Any = None


VtlHook = Callable[[VtlCallRequest], HypercallOutcome]


class HypercallInternalError(Exception):
    """A handler raised: a VMM bug. The machine stops the guest with this message."""


class _Registers:
    """Hypercall register conventions for one call, recording every access for the event."""

    __slots__ = ("vp", "vtl", "is_64bit", "read_log", "write_log")

    def __init__(self, vp: VpAccess, vtl: int, is_64bit: bool) -> None:
        self.vp = vp
        self.vtl = vtl
        self.is_64bit = is_64bit
        self.read_log = bytearray()
        self.write_log = bytearray()

    def _get(self, name: str) -> int:
        value = int(self.vp.get_register(self.vtl, name)) & _U64  # type: ignore[arg-type]
        self.read_log += value.to_bytes(8, "little")
        return value

    def _set(self, name: str, value: int) -> None:
        self.vp.set_register(self.vtl, name, value & _U64)
        self.write_log += (value & _U64).to_bytes(8, "little")

    def _pair(self, high: str, low: str) -> int:
        return ((self._get(high) & _U32) << 32) | (self._get(low) & _U32)

    def _set_pair(self, high: str, low: str, value: int) -> None:
        self._set(high, (value >> 32) & _U32)
        self._set(low, value & _U32)

    def control(self) -> int:
        return self._get("rcx") if self.is_64bit else self._pair("rdx", "rax")

    def set_control(self, value: int) -> None:
        if self.is_64bit:
            self._set("rcx", value)
        else:
            self._set_pair("rdx", "rax", value)

    def input_param(self) -> int:
        return self._get("rdx") if self.is_64bit else self._pair("rbx", "rcx")

    def output_param(self) -> int:
        return self._get("r8") if self.is_64bit else self._pair("rdi", "rsi")

    def set_input_param(self, value: int) -> None:
        if self.is_64bit:
            self._set("rdx", value)
        else:
            self._set_pair("rbx", "rcx", value)

    def set_output_param(self, value: int) -> None:
        if self.is_64bit:
            self._set("r8", value)
        else:
            self._set_pair("rdi", "rsi", value)

    def set_result(self, value: int) -> None:
        if self.is_64bit:
            self._set("rax", value)
        else:
            self._set_pair("rdx", "rax", value)

    def vtl_input(self) -> int:
        return self._get("rax") if self.is_64bit else self._get("rcx") & _U32

    def read_pairs(self, count: int) -> bytes:
        """Fast input: pair 0 = input/output params, pair n = XMM(n-1)."""
        if count == 1:  # the common case (up to 16 bytes of input): no buffer to build
            return _PAIR.pack(self.input_param(), self.output_param())
        out = bytearray()
        for pair in range(count):
            if pair == 0:
                out += struct.pack("<QQ", self.input_param(), self.output_param())
            else:
                value = self.vp.get_xmm(self.vtl, pair - 1)
                self.read_log += value.to_bytes(HV_X64_REGISTER_PAIR_SIZE, "little")
                out += value.to_bytes(HV_X64_REGISTER_PAIR_SIZE, "little")
        return bytes(out)

    def write_pairs(self, first_pair: int, data: bytes) -> None:
        data = data.ljust(-(-len(data) // HV_X64_REGISTER_PAIR_SIZE) * HV_X64_REGISTER_PAIR_SIZE, b"\0")
        for i in range(len(data) // HV_X64_REGISTER_PAIR_SIZE):
            chunk = data[i * HV_X64_REGISTER_PAIR_SIZE : (i + 1) * HV_X64_REGISTER_PAIR_SIZE]
            pair = first_pair + i
            if pair == 0:
                low, high = struct.unpack("<QQ", chunk)
                self.set_input_param(low)
                self.set_output_param(high)
            else:
                self.vp.set_xmm(self.vtl, pair - 1, int.from_bytes(chunk, "little"))
                self.write_log += chunk


class _UnloggedRegisters(_Registers):
    """The same conventions when no event is emitted: register accesses are not logged."""

    __slots__ = ()

    def _get(self, name: str) -> int:
        return int(self.vp.get_register(self.vtl, name)) & _U64  # type: ignore[arg-type]

    def _set(self, name: str, value: int) -> None:
        self.vp.set_register(self.vtl, name, value & _U64)


class _Plan:
    """What one hypercall input value means under the current table, decided once per value.

    Everything the checks of step 2 (code, advertisement, privilege, reserved bits, rep
    and variable-header rules) and the sizes of step 3 depend on is the input value, the
    frozen policy and the table; the plans are dropped whenever the table changes.
    """

    __slots__ = ("decoded", "code", "spec", "fail", "vtl_call", "in_size", "out_size", "var_size", "elements_at",
                 "pairs", "fast_fail")  # fmt: skip

    def __init__(self, decoded: HypercallControl, table: dict[HypercallCode, HypercallSpec], policy: HypervPolicy,
                 privilege_bits: int) -> None:  # fmt: skip
        c = self.decoded = decoded
        self.vtl_call = c.code in _VTL_CALL_CODES
        self.code = code = _CODES.get(c.code)
        self.spec = spec = None if code is None else table.get(code)
        self.in_size = self.out_size = self.var_size = self.elements_at = 0
        self.fail: HvStatus | None = None
        if spec is None or not spec.advertised(policy):
            self.fail = HvStatus.HV_STATUS_INVALID_HYPERCALL_CODE
        elif spec.privilege is not None and not privilege_bits & int(spec.privilege):
            self.fail = HvStatus.HV_STATUS_ACCESS_DENIED
        elif c.reserved or c.nested:
            self.fail = HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT
        elif spec.rep and (c.rep_count == 0 or c.rep_start >= c.rep_count):
            self.fail = HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT
        elif not spec.rep and (c.rep_count or c.rep_start):
            self.fail = HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT
        elif c.var_header_qwords and not spec.variable_header:
            self.fail = HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT
        else:
            self.var_size = c.var_header_qwords * _QWORD
            self.in_size = spec.input_size + self.var_size + c.rep_count * spec.rep_input_size
            self.out_size = spec.output_size + c.rep_count * spec.rep_output_size
            self.elements_at = spec.input_size + self.var_size
        self.pairs = _pairs(self.in_size)
        #: A fast call's register-input checks for (32-bit, 64-bit) callers: None or the _Fail arguments.
        self.fast_fail = (_fast_fail(False, self.in_size, self.out_size, policy),
                          _fast_fail(True, self.in_size, self.out_size, policy))  # fmt: skip


def _fast_fail(is_64bit: bool, in_size: int, out_size: int, policy: HypervPolicy) -> tuple[HvStatus | None, int | None] | None:
    """Why a fast call of these sizes fails before reading its registers (status or exception), or None."""
    limit = HV_X64_FAST_INPUT_MAX if is_64bit else HV_X86_FAST_INPUT_MAX
    if is_64bit and in_size > HV_X64_REGISTER_PAIR_SIZE and not policy.xmm_input:
        return (None, X86Exception.UD)
    if in_size > limit:
        return (HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, None)
    if out_size:
        if is_64bit and not policy.xmm_output:
            return (None, X86Exception.UD)
        if _pairs(in_size) * HV_X64_REGISTER_PAIR_SIZE + out_size > limit:
            return (HvStatus.HV_STATUS_INVALID_HYPERCALL_INPUT, None)
    return None


class _Fail(Exception):
    """Internal: stop processing with a status (or an exception vector)."""

    def __init__(self, status: HvStatus | None = None, exception: int | None = None) -> None:
        super().__init__(status, exception)
        self.status = status
        self.exception = exception


def _pairs(size: int) -> int:
    return -(-size // HV_X64_REGISTER_PAIR_SIZE)


def _check_block(gpa: int, size: int) -> None:
    if size == 0:
        return
    if gpa % HV_HYPERCALL_ALIGNMENT or (gpa % HV_PAGE_SIZE) + size > HV_PAGE_SIZE:
        raise _Fail(HvStatus.HV_STATUS_INVALID_ALIGNMENT)


def _memory_status(exc: Exception) -> HvStatus:
    return HvStatus.HV_STATUS_ACCESS_DENIED if isinstance(exc, VtlAccessDenied) else HvStatus.HV_STATUS_INVALID_ALIGNMENT


class HypercallDispatcher:
    """The hypercall table plus the ABI. One per partition."""

    def __init__(self, partition: PartitionAccess, policy: HypervPolicy, sink: EventSink) -> None:
        self.partition = partition
        self.policy = policy
        self.privileges = policy.privileges()  # the policy is frozen: computed once, not per call
        self._privilege_bits = int(self.privileges)  # as a plain int: an IntFlag "&" is Python code
        self.sink = sink
        self.table: dict[HypercallCode, HypercallSpec] = {}
        self.vtl_hook: VtlHook | None = None
        self._started_ns = 0  # when the call being dispatched started, for the event's duration_ns
        self._plans: dict[int, _Plan] = {}  # input value -> its plan under the current table
        #: Called after the table changed (a C fast path must re-decide what it may answer).
        self.on_table_change: Callable[[], None] | None = None

    def register(self, spec: HypercallSpec, *, replace: bool = False) -> None:
        """Add a handler (the VSM stage adds its calls the same way)."""
        if spec.code in self.table and not replace:
            raise ValueError(f"{spec.code.name} already has a handler")
        self.table[spec.code] = spec
        self._plans.clear()
        if self.on_table_change is not None:
            self.on_table_change()

    def answered_natively(self, control: int, native: str) -> bool:
        """Whether input value ``control`` passes every check of step 2 and reaches a handler whose C
        implementation is ``native``: only then may a fast path answer it instead of :meth:`dispatch`."""
        plan = self._plan(control)
        return plan.fail is None and not plan.vtl_call and plan.spec is not None and plan.spec.native == native

    def _plan(self, control: int) -> _Plan:
        plans = self._plans
        plan = plans.get(control)
        if plan is None:
            if len(plans) >= HYPERCALL_CONTROL_CACHE:
                plans.clear()
            plan = plans[control] = _Plan(_decode_control(control), self.table, self.policy, self._privilege_bits)
        return plan

    def set_vtl_hook(self, hook: VtlHook | None) -> None:
        self.vtl_hook = hook

    # -- dispatch ----------------------------------------------------------------------------

    def dispatch(self, vp_index: int, vtl: int, page_enabled: bool) -> HypercallOutcome:
        emitting = self.sink.enabled
        if emitting:
            self._started_ns = time.perf_counter_ns()  # for the event's duration_ns (not an emulation input)
        vp = self.partition.vp(vp_index)
        mode = vp.mode(vtl)
        rip = int(vp.get_register(vtl, "rip")) if emitting else 0  # type: ignore[arg-type]
        if mode == CpuMode.REAL or vp.cpl(vtl) != 0 or not page_enabled:
            vp.inject_exception(vtl, X86Exception.UD)
            if emitting:
                self._emit(vp_index, vtl, rip, code=0, control=0, status=None, regs=None)
            return HypercallOutcome(code=0, exception=X86Exception.UD)
        regs = (_Registers if emitting else _UnloggedRegisters)(vp, vtl, mode == CpuMode.LONG)
        control = regs.control()
        plan = self._plans.get(control) or self._plan(control)
        decoded = plan.decoded

        if plan.vtl_call and self.vtl_hook is not None:
            code = plan.code if plan.code is not None else HypercallCode(decoded.code)
            request = VtlCallRequest(vp_index, vtl, code, control, regs.vtl_input(), regs.is_64bit)
            outcome = self.vtl_hook(request)
            if emitting:
                self._emit(vp_index, vtl, rip, code=decoded.code, control=control, status=outcome.status, regs=regs,
                           decoded=decoded)  # fmt: skip
            return outcome

        state = _CallState()
        try:
            status = self._run(vp_index, vtl, regs, control, plan, state)
        except _Fail as fail:
            if fail.exception is not None:
                vp.inject_exception(vtl, fail.exception)
                if emitting:
                    self._emit(vp_index, vtl, rip, code=decoded.code, control=control, status=None, regs=regs,
                               decoded=decoded, state=state)  # fmt: skip
                return HypercallOutcome(code=decoded.code, exception=fail.exception)
            assert fail.status is not None
            status = fail.status

        reps_done = state.reps_done
        outcome = HypercallOutcome(decoded.code, status, reps_done)
        if state.retry:
            regs.set_control(HypercallControl.with_rep_start(control, reps_done))
            outcome.retry = True
        else:
            regs.set_result(hypercall_result(status, reps_done))
        if emitting:
            self._emit(vp_index, vtl, rip, code=decoded.code, control=control, status=status, regs=regs,
                       decoded=decoded, state=state)  # fmt: skip
        return outcome

    def _run(self, vp_index: int, vtl: int, regs: _Registers, control: int, plan: _Plan, state: _CallState) -> HvStatus:
        if plan.fail is not None:
            raise _Fail(plan.fail)
        c, spec, code = plan.decoded, plan.spec, plan.code
        assert spec is not None and code is not None
        state.reps_done = c.rep_start  # a later failure reports the reps completed before this call
        in_size, out_size = plan.in_size, plan.out_size

        if c.fast:
            fail = plan.fast_fail[regs.is_64bit]
            if fail is not None:
                raise _Fail(*fail)
            data = regs.read_pairs(plan.pairs)[:in_size]
            out_gpa = 0
        else:
            in_gpa = regs.input_param() if in_size else 0
            out_gpa = regs.output_param() if out_size else 0
            _check_block(in_gpa, in_size)
            _check_block(out_gpa, out_size)
            if in_size and out_size and in_gpa < out_gpa + out_size and out_gpa < in_gpa + in_size:
                raise _Fail(HvStatus.HV_STATUS_INVALID_ALIGNMENT)
            try:
                data = self.partition.read_gpa(vtl, in_gpa, in_size) if in_size else b""
                if out_size:
                    self.partition.read_gpa(vtl, out_gpa, out_size, Access.WRITE)
            except (VtlAccessDenied, GuestMemoryError) as exc:
                raise _Fail(_memory_status(exc)) from None
        state.input = data

        elements_at = plan.elements_at
        size = spec.rep_input_size
        hc_input = HypercallInput(
            vp_index,
            vtl,
            code,
            control,
            c.fast,
            data[: spec.input_size],
            data[spec.input_size : elements_at],
            c.rep_start,
            c.rep_count,
            [data[elements_at + i * size : elements_at + (i + 1) * size] for i in range(c.rep_start, c.rep_count)],
            regs.is_64bit,
        )
        try:
            result = spec.handler(hc_input)
        except Exception as exc:  # a VMM bug, not a guest error: report it and stop the guest cleanly
            message = f"{code.name} handler failed: {exc!r}"
            if self.sink.enabled:
                self.sink.emit(EventKind.ERROR, vp_index, vtl, 0, message=message)
            raise HypercallInternalError(message) from exc

        status = _STATUSES.get(result.status)
        if status is None:
            try:
                status = HvStatus(result.status)
            except ValueError:  # a status the TLFS does not define: a VMM bug, never shown to the guest
                message = f"{code.name} handler returned {result.status:#x}, not a TLFS status"
                if self.sink.enabled:
                    self.sink.emit(EventKind.ERROR, vp_index, vtl, 0, message=message)
                raise HypercallInternalError(message) from None
        if result.retry:
            state.retry = True
            state.reps_done = c.rep_start
            return status
        if spec.rep:
            done = result.reps_done
            if done is None:
                done = c.rep_count if status == HvStatus.HV_STATUS_SUCCESS else c.rep_start + len(result.rep_outputs)
            done = max(c.rep_start, min(done, c.rep_count))
            state.reps_done = done
            if status == HvStatus.HV_STATUS_SUCCESS and done < c.rep_count:
                state.retry = True
            outputs = result.rep_outputs[: done - c.rep_start]
            output = b"".join(o.ljust(spec.rep_output_size, b"\0")[: spec.rep_output_size] for o in outputs)
            out_offset = c.rep_start * spec.rep_output_size
        else:
            output = result.output[: spec.output_size] if status == HvStatus.HV_STATUS_SUCCESS else b""
            out_offset = 0
        if output:
            if c.fast:
                # XMM output starts at the first pair after the input; byte offset within it.
                self._write_fast_output(regs, in_size, out_offset, output)
            else:
                try:
                    self.partition.write_gpa(vtl, out_gpa + out_offset, output)
                except (VtlAccessDenied, GuestMemoryError) as exc:
                    raise _Fail(_memory_status(exc)) from None
        state.output = output
        return status

    @staticmethod
    def _write_fast_output(regs: _Registers, in_size: int, out_offset: int, output: bytes) -> None:
        start = _pairs(in_size) * HV_X64_REGISTER_PAIR_SIZE + out_offset
        first_pair = start // HV_X64_REGISTER_PAIR_SIZE
        lead = start % HV_X64_REGISTER_PAIR_SIZE
        if lead:
            # A rep continuation resumes mid-pair: keep the bytes already in that pair.
            existing = regs.read_pairs(first_pair + 1)[first_pair * HV_X64_REGISTER_PAIR_SIZE :]
            output = existing[:lead] + output
        regs.write_pairs(first_pair, output)

    # -- events ------------------------------------------------------------------------------

    def _emit(
        self,
        vp: int,
        vtl: int,
        rip: int,
        *,
        code: int,
        control: int,
        status: HvStatus | None,
        regs: _Registers | None,
        decoded: HypercallControl | None = None,
        state: _CallState | None = None,
    ) -> None:
        if not self.sink.enabled:
            return
        name = _CODE_NAMES.get(code) or f"unknown_{code:#06x}"
        self.sink.emit(
            EventKind.HYPERCALL,
            vp,
            vtl,
            rip,
            code=code,
            name=name,
            duration_ns=time.perf_counter_ns() - self._started_ns,
            control=control,
            fast=bool(decoded.fast) if decoded else False,
            rep_count=decoded.rep_count if decoded else 0,
            rep_start=decoded.rep_start if decoded else 0,
            reps_done=state.reps_done if state else 0,
            status=None if status is None else int(status),  # null: no result value was written
            status_name="NONE" if status is None else _STATUS_NAMES.get(status) or HvStatus(status).name,
            input=state.input if state else b"",
            output=state.output if state else b"",
            regs_in=bytes(regs.read_log) if regs else b"",
            regs_out=bytes(regs.write_log) if regs else b"",
        )


class _CallState:
    """Bookkeeping of one dispatch, for the result and the event."""

    __slots__ = ("reps_done", "retry", "input", "output")

    def __init__(self) -> None:
        self.reps_done = 0
        self.retry = False
        self.input = b""
        self.output = b""
