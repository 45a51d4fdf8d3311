"""Synthetic MSRs of one (VP, VTL).

Which state is where:

* per (VP, VTL) here: VP_ASSIST_PAGE, plus the SynIC and timer MSRs delegated to
  :class:`~vmm.hyperv.synic.Synic` and :class:`~vmm.hyperv.stimer.SyntheticTimers`;
  EOI/ICR/TPR go to the machine's APIC for that VP and VTL (:class:`ApicAccess`).
* per VTL, shared by all VPs (:class:`VtlPartitionMsrs`): GUEST_OS_ID, HYPERCALL and
  REFERENCE_TSC. The TLFS makes them partition-wide, VSM makes them private per VTL, so
  they are partition-wide *within* a VTL.
* partition-wide (:class:`CrashMsrs`): CRASH_P0-P4 / CRASH_CTL.
* derived: VP_INDEX, TIME_REF_COUNT (``PartitionAccess.reference_time``), TSC/APIC frequency.

An MSR whose feature the policy does not advertise, a write to a read-only MSR, and
reserved-bit violations raise :class:`~vmm.hyperv.errors.GpFault`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from vsmtrace.vmm.hyperv.cpuid import HypervPolicy
from vsmtrace.vmm.hyperv.errors import GpFault, GuestCrash, GuestCrashReport, GuestResetRequest
from vsmtrace.vmm.hyperv.hvdef import (
    HV_CRASH_MESSAGE_GPA_PARAM,
    HV_CRASH_MESSAGE_LENGTH_PARAM,
    HV_CRASH_MESSAGE_MAX,
    HV_CRASH_PARAM_COUNT,
    HV_PAGE_MASK,
    HV_PAGE_SIZE,
    HV_STIMER_MSR_STRIDE,
    HvApicMsr,
    HvCrashCtl,
    HvHypercallMsr,
    HvMsr,
    HvOverlayMsr,
    HvResetMsr,
)
from vsmtrace.vmm.hyperv.hypercall_page import HypercallPage
from vsmtrace.vmm.hyperv.reference_time import TscPageParams, invalid_tsc_page
from vsmtrace.vmm.hyperv.stimer import SyntheticTimers
from vsmtrace.vmm.hyperv.synic import Synic
from vsmtrace.vmm.vp import GuestMemoryError, PartitionAccess, VtlAccessDenied

_U32 = 0xFFFF_FFFF


class ApicAccess(Protocol):
    """The machine's local APIC of (``vp``, ``vtl``), as the Hyper-V APIC MSRs reach it."""

    def eoi(self, vp: int, vtl: int) -> None: ...

    def read_icr(self, vp: int, vtl: int) -> int: ...

    def write_icr(self, vp: int, vtl: int, value: int) -> None: ...

    def read_tpr(self, vp: int, vtl: int) -> int: ...

    def write_tpr(self, vp: int, vtl: int, value: int) -> None: ...


@dataclass
class VtlPartitionMsrs:
    """Partition-wide MSRs of one VTL."""

    guest_os_id: int = 0
    hypercall: int = 0
    reference_tsc: int = 0
    tsc_sequence: int = 0

    @property
    def hypercall_enabled(self) -> bool:
        return bool(self.hypercall & HvHypercallMsr.ENABLE)

    @property
    def hypercall_gpa(self) -> int:
        return self.hypercall & HV_PAGE_MASK


@dataclass
class CrashMsrs:
    parameters: list[int] = field(default_factory=lambda: [0] * HV_CRASH_PARAM_COUNT)
    control: int = 0


CRASH_CTL_CAPABILITIES = HvCrashCtl.CRASH_NOTIFY | HvCrashCtl.CRASH_MESSAGE
CRASH_CTL_WRITABLE = HvCrashCtl.CRASH_NOTIFY | HvCrashCtl.CRASH_MESSAGE | HvCrashCtl.NO_CRASH_DUMP | HvCrashCtl.PRE_OS_ID_MASK


@dataclass
class MsrEnvironment:
    """What every (VP, VTL)'s MSRs share: the partition, policy, APIC, clocks, per-VTL state."""

    partition: PartitionAccess
    policy: HypervPolicy
    apic: ApicAccess
    vtl_msrs: list[VtlPartitionMsrs]
    crash: CrashMsrs
    tsc_page: Callable[[], TscPageParams | None]
    tsc_frequency_hz: int | None
    apic_frequency_hz: int | None


def _advertised(policy: HypervPolicy, env: MsrEnvironment, msr: int) -> bool:
    """Is ``msr`` one the guest was told exists?"""
    m = HvMsr
    if msr in (m.HV_X64_MSR_GUEST_OS_ID, m.HV_X64_MSR_HYPERCALL):
        return policy.hypercalls
    if msr == m.HV_X64_MSR_VP_INDEX:
        return policy.vp_index
    if msr == m.HV_X64_MSR_RESET:
        return policy.reset_msr
    if msr == m.HV_X64_MSR_TIME_REF_COUNT:
        return policy.time_ref_count
    if msr == m.HV_X64_MSR_REFERENCE_TSC:
        return policy.reference_tsc
    if msr == m.HV_X64_MSR_TSC_FREQUENCY:
        return policy.frequency_msrs and env.tsc_frequency_hz is not None
    if msr == m.HV_X64_MSR_APIC_FREQUENCY:
        return policy.frequency_msrs and env.apic_frequency_hz is not None
    if msr in (m.HV_X64_MSR_EOI, m.HV_X64_MSR_ICR, m.HV_X64_MSR_TPR):
        return policy.apic_msrs
    if msr == m.HV_X64_MSR_VP_ASSIST_PAGE:
        return policy.vp_assist
    if m.HV_X64_MSR_SCONTROL <= msr <= m.HV_X64_MSR_EOM or m.HV_X64_MSR_SINT0 <= msr <= m.HV_X64_MSR_SINT15:
        return policy.synic
    if m.HV_X64_MSR_STIMER0_CONFIG <= msr <= m.HV_X64_MSR_STIMER3_COUNT:
        return policy.stimers
    if m.HV_X64_MSR_CRASH_P0 <= msr <= m.HV_X64_MSR_CRASH_CTL:
        return policy.crash_msrs
    return False


class SyntheticMsrs:
    """RDMSR/WRMSR of the Hyper-V synthetic MSRs for one VP at one VTL."""

    def __init__(self, env: MsrEnvironment, vp: int, vtl: int, synic: Synic, stimers: SyntheticTimers) -> None:
        self.env = env
        self.vp = vp
        self.vtl = vtl
        self.synic = synic
        self.stimers = stimers
        self.vp_assist_page = 0
        #: MSR -> advertised? The policy and frequencies never change, and the chain of checks is long.
        self._advertised: dict[int, bool] = {}

    def advertised(self, msr: int) -> bool:
        known = self._advertised.get(msr)
        if known is None:
            known = self._advertised[msr] = _advertised(self.env.policy, self.env, msr)
        return known

    @property
    def shared(self) -> VtlPartitionMsrs:
        return self.env.vtl_msrs[self.vtl]

    @property
    def vp_assist_enabled(self) -> bool:
        return bool(self.vp_assist_page & HvOverlayMsr.ENABLE)

    # -- read --------------------------------------------------------------------------------

    def read(self, msr: int) -> int:
        env, m = self.env, HvMsr
        if not self.advertised(msr):
            raise GpFault(msr, "MSR not advertised")
        if msr == m.HV_X64_MSR_GUEST_OS_ID:
            return self.shared.guest_os_id
        if msr == m.HV_X64_MSR_HYPERCALL:
            return self.shared.hypercall
        if msr == m.HV_X64_MSR_VP_INDEX:
            return self.vp
        if msr == m.HV_X64_MSR_RESET:
            return 0
        if msr == m.HV_X64_MSR_TIME_REF_COUNT:
            return env.partition.reference_time()
        if msr == m.HV_X64_MSR_REFERENCE_TSC:
            return self.shared.reference_tsc
        if msr == m.HV_X64_MSR_TSC_FREQUENCY:
            return env.tsc_frequency_hz or 0
        if msr == m.HV_X64_MSR_APIC_FREQUENCY:
            return env.apic_frequency_hz or 0
        if msr == m.HV_X64_MSR_EOI:
            raise GpFault(msr, "EOI MSR is write-only")
        if msr == m.HV_X64_MSR_ICR:
            return env.apic.read_icr(self.vp, self.vtl)
        if msr == m.HV_X64_MSR_TPR:
            return env.apic.read_tpr(self.vp, self.vtl)
        if msr == m.HV_X64_MSR_VP_ASSIST_PAGE:
            return self.vp_assist_page
        if m.HV_X64_MSR_STIMER0_CONFIG <= msr <= m.HV_X64_MSR_STIMER3_COUNT:
            index, is_count = divmod(msr - m.HV_X64_MSR_STIMER0_CONFIG, HV_STIMER_MSR_STRIDE)
            return self.stimers.read_count(index) if is_count else self.stimers.read_config(index)
        if m.HV_X64_MSR_CRASH_P0 <= msr <= m.HV_X64_MSR_CRASH_P4:
            return env.crash.parameters[msr - m.HV_X64_MSR_CRASH_P0]
        if msr == m.HV_X64_MSR_CRASH_CTL:
            return int(CRASH_CTL_CAPABILITIES)
        return self.synic.read_msr(msr)

    # -- write -------------------------------------------------------------------------------

    def write(self, msr: int, value: int) -> None:
        env, m = self.env, HvMsr
        if not self.advertised(msr):
            raise GpFault(msr, "MSR not advertised")
        if msr == m.HV_X64_MSR_GUEST_OS_ID:
            self.shared.guest_os_id = value
            if value == 0:
                self.shared.hypercall &= ~HvHypercallMsr.ENABLE  # TLFS: zeroing the ID disables the page
        elif msr == m.HV_X64_MSR_HYPERCALL:
            self._write_hypercall(value)
        elif msr in (
            m.HV_X64_MSR_VP_INDEX,
            m.HV_X64_MSR_TIME_REF_COUNT,
            m.HV_X64_MSR_TSC_FREQUENCY,
            m.HV_X64_MSR_APIC_FREQUENCY,
        ):
            raise GpFault(msr, "read-only MSR")
        elif msr == m.HV_X64_MSR_RESET:
            if value & ~HvResetMsr.RESET:
                raise GpFault(msr, "reserved RESET bits set")
            if value & HvResetMsr.RESET:
                raise GuestResetRequest(self.vp, self.vtl)
        elif msr == m.HV_X64_MSR_REFERENCE_TSC:
            self.shared.reference_tsc = value
            if value & HvOverlayMsr.ENABLE:
                self.write_tsc_page()
        elif msr == m.HV_X64_MSR_EOI:
            if value & HvApicMsr.EOI_RSVDZ:
                raise GpFault(msr, "reserved EOI bits set")
            env.apic.eoi(self.vp, self.vtl)
            self.synic.on_eoi()
        elif msr == m.HV_X64_MSR_ICR:
            env.apic.write_icr(self.vp, self.vtl, value)
        elif msr == m.HV_X64_MSR_TPR:
            if value & HvApicMsr.TPR_RSVDZ:
                raise GpFault(msr, "reserved TPR bits set")
            env.apic.write_tpr(self.vp, self.vtl, value)
        elif msr == m.HV_X64_MSR_VP_ASSIST_PAGE:
            self.vp_assist_page = value
        elif m.HV_X64_MSR_STIMER0_CONFIG <= msr <= m.HV_X64_MSR_STIMER3_COUNT:
            index, is_count = divmod(msr - m.HV_X64_MSR_STIMER0_CONFIG, HV_STIMER_MSR_STRIDE)
            if is_count:
                self.stimers.write_count(index, value)
            else:
                self.stimers.write_config(index, value, msr)
        elif m.HV_X64_MSR_CRASH_P0 <= msr <= m.HV_X64_MSR_CRASH_P4:
            env.crash.parameters[msr - m.HV_X64_MSR_CRASH_P0] = value
        elif msr == m.HV_X64_MSR_CRASH_CTL:
            self._write_crash_ctl(value)
        else:
            self.synic.write_msr(msr, value)

    def _write_hypercall(self, value: int) -> None:
        msr = HvMsr.HV_X64_MSR_HYPERCALL
        shared = self.shared
        if shared.hypercall & HvHypercallMsr.LOCKED:
            raise GpFault(msr, "hypercall MSR is locked")
        if value & HvHypercallMsr.LOCKED and not self.env.policy.hypercall_msr_lock:
            raise GpFault(msr, "hypercall MSR lock is not advertised")
        if value & HvHypercallMsr.ENABLE:
            if shared.guest_os_id == 0:
                value &= ~HvHypercallMsr.ENABLE  # TLFS: the enable bit stays zero without an OS ID
            else:
                try:
                    self.env.partition.write_gpa(self.vtl, value & HV_PAGE_MASK, HypercallPage.build())
                except (GuestMemoryError, VtlAccessDenied) as exc:
                    raise GpFault(msr, f"hypercall page GPA unusable: {exc}") from exc
        shared.hypercall = value

    def write_tsc_page(self) -> None:
        """(Re)write the reference TSC page of this VTL with a new sequence number."""
        shared = self.shared
        params = self.env.tsc_page()
        if params is None:
            page = invalid_tsc_page()
        else:
            shared.tsc_sequence = shared.tsc_sequence % _U32 + 1  # never 0 (= invalid)
            page = params.page(shared.tsc_sequence)
        try:
            self.env.partition.write_gpa(self.vtl, shared.reference_tsc & HV_PAGE_MASK, page.pack())
        except (GuestMemoryError, VtlAccessDenied):
            pass  # TLFS: a page beyond the GPA space is simply not accessible

    def _write_crash_ctl(self, value: int) -> None:
        msr = HvMsr.HV_X64_MSR_CRASH_CTL
        if value & ~int(CRASH_CTL_WRITABLE):
            raise GpFault(msr, "reserved CRASH_CTL bits set")
        crash = self.env.crash
        crash.control = value
        if not value & HvCrashCtl.CRASH_NOTIFY:
            return
        message = b""
        if value & HvCrashCtl.CRASH_MESSAGE:
            gpa = crash.parameters[HV_CRASH_MESSAGE_GPA_PARAM]
            length = min(crash.parameters[HV_CRASH_MESSAGE_LENGTH_PARAM], HV_CRASH_MESSAGE_MAX)
            message = self._read_crash_message(gpa, length)
        params = tuple(crash.parameters)
        raise GuestCrash(GuestCrashReport(self.vp, self.vtl, params, value, message))  # type: ignore[arg-type]

    def _read_crash_message(self, gpa: int, length: int) -> bytes:
        """Read the crash message page by page (it may cross pages); unreadable → empty."""
        out = bytearray()
        try:
            while length > 0:
                chunk = min(length, HV_PAGE_SIZE - (gpa % HV_PAGE_SIZE))
                out += self.env.partition.read_gpa(self.vtl, gpa, chunk)
                gpa += chunk
                length -= chunk
        except (GuestMemoryError, VtlAccessDenied):
            return b""
        return bytes(out).rstrip(b"\0")
