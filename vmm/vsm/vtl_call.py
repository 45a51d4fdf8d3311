"""HvCallVtlCall / HvCallVtlReturn: validity checks and the transition they ask the machine for.

The dispatcher hands these to the VTL hook after its CPL0 / protected-mode / hypercall-page
checks (each a #UD). Here (TLFS vsm.md, OpenVMM): the control word must be exactly the call
code; a VTL call input must be 0, a VTL return input 0 or 1 (bit 0 = Fast); a call needs a
higher VTL enabled on this VP (it goes to the *next* higher one, no skipping); a return is
impossible from VTL0. Any violation injects #UD and writes nothing.

A valid call/return writes no result (RAX is shared state) and asks the machine, through
``VsmServices.request_transition``, to switch before the VP's next entry. The machine advances
RIP past the trapping instruction as for any hypercall, so the caller resumes after it when
its VTL next runs.

Return specifics: unless Fast, the lower VTL's RAX/RCX are reloaded from the returning VTL's
HV_VP_VTL_CONTROL.VtlReturnX64Rax/Rcx (32-bit VTLs: EAX/ECX of the x86 view; EDX is not
carried by ``VtlTransition`` — a gap). Without an enabled VP assist page nothing is
reloaded. TLB locks the returning VTL holds on this VP are released, and VINA is reset if
its AutoReset is set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.hvdef import HypercallCode, VtlReturnInput, X86Exception
from vsmtrace.vmm.hyperv.hypercall import HypercallOutcome, VtlCallRequest
from vsmtrace.vmm.vsm import vp_assist
from vsmtrace.vmm.vsm.services import SwitchReason, VtlTransition

if TYPE_CHECKING:
    from vsmtrace.vmm.vsm import Vsm

_U32 = 0xFFFF_FFFF


def _undefined(vsm: Vsm, req: VtlCallRequest) -> HypercallOutcome:
    vsm.partition.vp(req.vp).inject_exception(req.vtl, X86Exception.UD)
    return HypercallOutcome(code=req.code, exception=X86Exception.UD)


def handle(vsm: Vsm, req: VtlCallRequest) -> HypercallOutcome:
    """The VTL hook: validate, then request the switch (or inject #UD)."""
    if not vsm.hv.policy.vsm or req.control != int(req.code):
        return _undefined(vsm, req)
    if req.code == HypercallCode.HvCallVtlCall:
        if req.vtl_input != 0:
            return _undefined(vsm, req)
        target = vsm.next_higher_vtl(req.vp, req.vtl)
        if target is None:
            return _undefined(vsm, req)
        transition = VtlTransition(req.vp, req.vtl, target, SwitchReason.CALL)
    else:
        if req.vtl_input & ~VtlReturnInput.FAST or req.vtl == 0:
            return _undefined(vsm, req)
        lower = vsm.next_lower_vtl(req.vp, req.vtl)
        registers = None
        if not req.vtl_input & VtlReturnInput.FAST:
            control = vp_assist.read_control(vsm.hv, vsm.partition, req.vp, req.vtl)
            if control is not None:
                if req.is_64bit:
                    registers = (control.vtl_return_rax, control.vtl_return_rcx)
                else:
                    registers = (control.vtl_return_rax & _U32, control.vtl_return_rax >> 32)
        transition = VtlTransition(req.vp, req.vtl, lower, SwitchReason.RETURN, registers)
        vsm.on_vtl_return(req.vp, req.vtl)
    vsm.services.request_transition(transition)
    return HypercallOutcome(code=req.code, vtl_action=transition)
