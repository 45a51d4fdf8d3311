"""The record/replay protocol: the names both sides of the emulation boundary write and read.

A trace is replayable only if the replayer calls into the emulation exactly as the
machine did and expects exactly the calls the emulation made out. Those calls are
named here, once: the recording side (``vmm/emulation_io.py`` and the KVM backends
in ``vmm/backends/``) writes these names into ``EMULATION`` events, and the
replaying side (``replayer/``) dispatches and checks on them
(docs/architecture.md, "The trace -> replay path").

* :class:`Entry` — a call *into* the emulation (the ``entry`` column),
* :class:`Op` — a call the emulation made *out* through the VP interface (an element
  of the ``emu_io`` log),
* :class:`Service` — a machine service the emulation calls by method name; its ops
  are ``"<service>.<method>"`` (:func:`service_op`), and :data:`SERVICE_INPUTS` names
  the methods whose results the emulation uses (inputs to feed back on replay).

The values are part of the trace format: changing one makes older traces unreplayable.
The classes hold plain ``str`` constants (not Enum members) because replay compares
them once per recorded call.
"""

from __future__ import annotations

from typing import Final


class Entry:
    """Entry names: what the machine called in the emulation (HyperV / Vsm)."""

    HYPERCALL: Final = "hypercall"
    MSR_READ: Final = "msr_read"
    MSR_WRITE: Final = "msr_write"
    EOI: Final = "eoi"  # a local APIC EOI the synthetic interrupt controller must see
    AUTO_EOI: Final = "auto_eoi"  # is this injected vector auto-EOI?
    TIMER: Final = "timer"  # a timer armed by the emulation expired
    VTL_ENTRY: Final = "vtl_entry"  # a VP entered a higher VTL
    VINA: Final = "vina"  # a lower VTL has an interrupt while a higher one runs
    POST_INTERCEPT: Final = "post_intercept"  # a secure memory intercept message to deliver
    TEST_DEVICE: Final = "test_device"  # a command written to QEMU's Hyper-V test device (port 0x3000)

    #: The VP and VTL of an entry that belongs to no VP (a timer expiry).
    NO_VP: Final = -1


class Op:
    """I/O-log op names of the VP and partition interface (``vmm.vp``), the timers and the sink."""

    ACTIVE_VTL: Final = "active_vtl"
    GET_REGISTER: Final = "get_register"
    SET_REGISTER: Final = "set_register"
    GET_XMM: Final = "get_xmm"
    SET_XMM: Final = "set_xmm"
    CPL: Final = "cpl"
    MODE: Final = "mode"
    INJECT_EXCEPTION: Final = "inject_exception"
    READ_GPA: Final = "read_gpa"
    WRITE_GPA: Final = "write_gpa"
    REFERENCE_TIME: Final = "reference_time"
    ASSERT_INTERRUPT: Final = "assert_interrupt"
    TIMER_ARM: Final = "timer.arm"
    TIMER_CANCEL: Final = "timer.cancel"
    EMIT: Final = "emit"  # an event the emulation emitted: [kind] -> its sequence number


class Service:
    """Machine services the emulation calls by method name (ops ``"<service>.<method>"``)."""

    APIC: Final = "apic"  # vmm.hyperv.msrs.ApicAccess
    TLB: Final = "tlb"  # vmm.hyperv.facade.TlbFlusher
    VSM: Final = "vsm"  # vmm.vsm.services.VsmServices
    CLOCK: Final = "clock"  # the reference TSC page parameters


#: Per service, the methods whose return value the emulation uses (recorded as inputs, fed back on replay);
#: every other method is an output (its arguments are recorded and compared).
SERVICE_INPUTS: Final[dict[str, frozenset[str]]] = {
    Service.APIC: frozenset({"read_icr", "read_tpr"}),
    Service.TLB: frozenset(),
    Service.VSM: frozenset({"vp_started"}),
    Service.CLOCK: frozenset({"tsc_page_params"}),
}
#: The clock service's one method: the emulation asks it for the reference TSC page.
TSC_PAGE_PARAMS: Final = "tsc_page_params"


def service_op(service: str, method: str) -> str:
    """The I/O-log op of a service call, e.g. ``vsm.set_protections``."""
    return f"{service}.{method}"


class VsmOp:
    """The VSM service ops replay and re-execution act on (``vsm.<method>`` of ``VsmServices``)."""

    CREATE_VTL: Final = service_op(Service.VSM, "create_vtl")
    LOAD_VP_CONTEXT: Final = service_op(Service.VSM, "load_vp_context")
    START_VP: Final = service_op(Service.VSM, "start_vp")
    VP_STARTED: Final = service_op(Service.VSM, "vp_started")
    REQUEST_TRANSITION: Final = service_op(Service.VSM, "request_transition")
    SET_PROTECTIONS: Final = service_op(Service.VSM, "set_protections")
    FLUSH_VPS: Final = service_op(Service.VSM, "flush_vps")


#: TLB flush ops (the Hyper-V flush hypercalls, and VSM's own after a protection change).
FLUSH_OPS: Final = frozenset({service_op(Service.TLB, "flush_vps"), VsmOp.FLUSH_VPS})


def names(vocabulary: type) -> dict[str, str]:
    """Constant name -> value of one vocabulary class (for listing and checking it)."""
    return {k: v for k, v in vars(vocabulary).items() if k.isupper() and isinstance(v, str)}
