"""Hyper-V feature policy and the CPUID leaves 0x40000000-0x4000000A that advertise it.

``HypervPolicy`` is the single switchboard of what the guest is told it may use; the CLI
adjusts it (``--no-hyperv``, ``--hv-disable NAME``) through :meth:`HypervPolicy.from_switches`.
The MSR and hypercall code consult the same policy, so an unadvertised MSR #GPs and an
unadvertised hypercall fails, exactly as the guest was told.

Setting the hypervisor-present bit (CPUID.01H:ECX[31],
:data:`~vmm.hyperv.hvdef.CPUID_1_ECX_HYPERVISOR_PRESENT`) is the machine's CPUID policy's
job: it owns leaf 1. It must set it iff ``policy.enabled``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vsmtrace.vmm.hyperv.hvdef import (
    HV_CPUID_INTERFACE_SIGNATURE,
    HV_CPUID_MAX_LEAF,
    HV_CPUID_VENDOR,
    HV_DEFAULT_SPIN_RETRIES,
    HV_SPIN_RETRY_NEVER,
    HV_VERSION_BUILD,
    HV_VERSION_MAJOR,
    HV_VERSION_MAJOR_SHIFT,
    HV_VERSION_MINOR,
    HvCpuidLeaf,
    HvEnlightenmentInfo,
    HvFeatures,
    HvPartitionPrivilege,
)

CpuidLeaf = tuple[int, int, int, int, int, int]  # (leaf, subleaf, eax, ebx, ecx, edx)

_U32 = 0xFFFF_FFFF

#: VTLs of a partition without and with VSM (vsmtrace implements VTL0 and VTL1 only).
HV_VTL_COUNT_WITHOUT_VSM = 1
HV_VTL_COUNT_WITH_VSM = 2


@dataclass(frozen=True)
class HypervPolicy:
    """Which Hyper-V features the partition advertises. Defaults: everything but VSM."""

    enabled: bool = True
    hypercalls: bool = True  # GUEST_OS_ID + HYPERCALL MSRs, hypercall page
    vp_index: bool = True
    time_ref_count: bool = True
    reference_tsc: bool = True
    synic: bool = True
    stimers: bool = True
    stimer_direct: bool = True
    apic_msrs: bool = True  # EOI / ICR / TPR MSRs
    vp_assist: bool = True
    xmm_input: bool = True
    xmm_output: bool = True
    crash_msrs: bool = True
    frequency_msrs: bool = True
    reset_msr: bool = True
    pv_ipi: bool = True  # HvCallSendSyntheticClusterIpi
    pv_ipi_ex: bool = True
    pv_tlb_flush: bool = True  # HvCallFlushVirtualAddress{Space,List}
    pv_tlb_flush_ex: bool = True
    partition_id: bool = True
    post_messages: bool = True
    signal_events: bool = True
    spin_wait: bool = True  # HvCallNotifyLongSpinWait (and a finite spin-retry hint)
    sint_polling: bool = True
    hypercall_msr_lock: bool = True
    relaxed_timing: bool = True  # this VMM is slow; tell the guest not to run watchdogs
    deprecate_auto_eoi: bool = False
    vsm: bool = False  # AccessVsm; the VSM stage turns this on
    vp_registers: bool = False  # AccessVpRegisters (Get/SetVpRegisters, VSM stage)
    start_vp: bool = False  # StartVirtualProcessor privilege (VSM stage)
    create_partitions: bool = False  # never granted by this VMM; here so the bit has a name
    spin_retries: int = HV_DEFAULT_SPIN_RETRIES
    max_vps: int = 0  # 0: report the machine's VP count

    #: Switch name (CLI) -> field name. ``hyperv`` turns the whole interface off.
    SWITCHES = {
        "hyperv": "enabled",
        "hypercalls": "hypercalls",
        "vp-index": "vp_index",
        "time-ref-count": "time_ref_count",
        "reference-tsc": "reference_tsc",
        "synic": "synic",
        "stimers": "stimers",
        "stimer-direct": "stimer_direct",
        "apic-msrs": "apic_msrs",
        "vp-assist": "vp_assist",
        "xmm-input": "xmm_input",
        "xmm-output": "xmm_output",
        "crash-msrs": "crash_msrs",
        "frequency-msrs": "frequency_msrs",
        "reset-msr": "reset_msr",
        "pv-ipi": "pv_ipi",
        "pv-ipi-ex": "pv_ipi_ex",
        "pv-tlb-flush": "pv_tlb_flush",
        "pv-tlb-flush-ex": "pv_tlb_flush_ex",
        "partition-id": "partition_id",
        "post-messages": "post_messages",
        "signal-events": "signal_events",
        "spin-wait": "spin_wait",
        "sint-polling": "sint_polling",
        "hypercall-msr-lock": "hypercall_msr_lock",
        "relaxed-timing": "relaxed_timing",
        "vsm": "vsm",
        "vp-registers": "vp_registers",
        "start-vp": "start_vp",
    }

    @classmethod
    def from_switches(cls, disable: list[str], *, enable: list[str] | None = None, base: HypervPolicy | None = None) -> HypervPolicy:
        """Start from ``base`` (defaults), turn named switches off then on; unknown names raise ValueError."""
        policy = base or cls()
        changes: dict[str, bool] = {}
        for names, value in ((disable, False), (enable or [], True)):
            for name in names:
                key = name.strip().lower().replace("_", "-")
                if key not in cls.SWITCHES:
                    raise ValueError(f"unknown Hyper-V switch {name!r}; known: {', '.join(sorted(cls.SWITCHES))}")
                changes[cls.SWITCHES[key]] = value
        return dataclasses.replace(policy, **changes).normalized()

    @classmethod
    def disabled(cls) -> HypervPolicy:
        """``--no-hyperv``: no leaves, no synthetic MSRs, no hypercall trap."""
        return cls(enabled=False).normalized()

    def with_vsm(self) -> HypervPolicy:
        """The policy with VSM and the privileges VSM needs (AccessVsm, AccessVpRegisters, SynIC)."""
        return dataclasses.replace(self, vsm=True, vp_registers=True, start_vp=True).normalized()

    def normalized(self) -> HypervPolicy:
        """Drop features whose prerequisites are off (so CPUID never promises the impossible)."""
        p = self
        if not p.enabled:
            return dataclasses.replace(
                p, **{f.name: False for f in dataclasses.fields(p) if isinstance(getattr(p, f.name), bool)}
            )
        if not p.hypercalls:
            p = dataclasses.replace(
                p, xmm_input=False, xmm_output=False, pv_ipi=False, pv_ipi_ex=False, pv_tlb_flush=False,
                pv_tlb_flush_ex=False, partition_id=False, post_messages=False, signal_events=False,
                spin_wait=False, vsm=False, vp_registers=False, start_vp=False, hypercall_msr_lock=False,
            )  # fmt: skip
        if not p.synic:
            p = dataclasses.replace(p, stimers=False, post_messages=False, signal_events=False, sint_polling=False, vsm=False)
        if not p.stimers:
            p = dataclasses.replace(p, stimer_direct=False)
        if not p.time_ref_count:
            p = dataclasses.replace(p, stimers=False, stimer_direct=False)
        if p.vsm and not (p.vp_registers and p.vp_assist):
            p = dataclasses.replace(p, vsm=False)
        return p

    @property
    def vtl_count(self) -> int:
        """Number of VTLs the partition is built with (per-VTL arrays have this length)."""
        return HV_VTL_COUNT_WITH_VSM if self.vsm else HV_VTL_COUNT_WITHOUT_VSM

    # -- the bit masks the guest sees ---------------------------------------------------------

    def privileges(self) -> HvPartitionPrivilege:
        p = HvPartitionPrivilege(0)
        bits = (
            (self.time_ref_count, HvPartitionPrivilege.ACCESS_PARTITION_REFERENCE_COUNTER),
            (self.synic, HvPartitionPrivilege.ACCESS_SYNIC_REGS),
            (self.stimers, HvPartitionPrivilege.ACCESS_SYNTHETIC_TIMER_REGS),
            (self.apic_msrs, HvPartitionPrivilege.ACCESS_INTR_CTRL_REGS),
            (self.hypercalls, HvPartitionPrivilege.ACCESS_HYPERCALL_MSRS),
            (self.vp_index, HvPartitionPrivilege.ACCESS_VP_INDEX),
            (self.reset_msr, HvPartitionPrivilege.ACCESS_RESET_REG),
            (self.reference_tsc, HvPartitionPrivilege.ACCESS_PARTITION_REFERENCE_TSC),
            (self.frequency_msrs, HvPartitionPrivilege.ACCESS_FREQUENCY_REGS),
            (self.create_partitions, HvPartitionPrivilege.CREATE_PARTITIONS),
            (self.partition_id, HvPartitionPrivilege.ACCESS_PARTITION_ID),
            (self.post_messages, HvPartitionPrivilege.POST_MESSAGES),
            (self.signal_events, HvPartitionPrivilege.SIGNAL_EVENTS),
            (self.vsm, HvPartitionPrivilege.ACCESS_VSM),
            (self.vp_registers, HvPartitionPrivilege.ACCESS_VP_REGISTERS),
            (self.xmm_output, HvPartitionPrivilege.FAST_HYPERCALL_OUTPUT),
            (self.start_vp, HvPartitionPrivilege.START_VIRTUAL_PROCESSOR),
        )
        for on, bit in bits:
            if on:
                p |= bit
        return p

    def features(self) -> HvFeatures:
        f = HvFeatures(0)
        bits = (
            (self.xmm_input, HvFeatures.XMM_HYPERCALL_INPUT),
            (self.frequency_msrs, HvFeatures.TIMER_FREQUENCIES),
            (self.crash_msrs, HvFeatures.GUEST_CRASH_MSRS),
            (self.xmm_output, HvFeatures.XMM_HYPERCALL_OUTPUT),
            (self.sint_polling, HvFeatures.SINT_POLLING_MODE),
            (self.hypercall_msr_lock, HvFeatures.HYPERCALL_MSR_LOCK),
            (self.stimer_direct, HvFeatures.DIRECT_SYNTHETIC_TIMERS),
        )
        for on, bit in bits:
            if on:
                f |= bit
        return f

    def recommendations(self) -> HvEnlightenmentInfo:
        r = HvEnlightenmentInfo(0)
        bits = (
            (self.pv_tlb_flush, HvEnlightenmentInfo.USE_HYPERCALL_FOR_REMOTE_FLUSH),
            (self.apic_msrs, HvEnlightenmentInfo.USE_APIC_MSRS),
            (self.reset_msr, HvEnlightenmentInfo.USE_HV_RESET_MSR),
            (self.relaxed_timing, HvEnlightenmentInfo.USE_RELAXED_TIMING),
            (self.deprecate_auto_eoi, HvEnlightenmentInfo.DEPRECATE_AUTO_EOI),
            (self.pv_ipi, HvEnlightenmentInfo.USE_SYNTHETIC_CLUSTER_IPI),
            (self.pv_ipi_ex or self.pv_tlb_flush_ex, HvEnlightenmentInfo.USE_EX_PROCESSOR_MASKS),
        )
        for on, bit in bits:
            if on:
                r |= bit
        return r


def _vendor_regs(text: bytes) -> tuple[int, int, int]:
    padded = text.ljust(len(HV_CPUID_VENDOR), b"\0")
    return (
        int.from_bytes(padded[0:4], "little"),
        int.from_bytes(padded[4:8], "little"),
        int.from_bytes(padded[8:12], "little"),
    )


def hyperv_cpuid_leaves(policy: HypervPolicy, vp_count: int) -> list[CpuidLeaf]:
    """The Hyper-V CPUID leaves for ``policy`` ([] when Hyper-V is off).

    Leaves 0x40000006-0x4000000A are present but zero: no hardware features, CPU
    management, SVM or nested virtualization are offered.
    """
    if not policy.enabled:
        return []
    privileges = int(policy.privileges())
    ebx, ecx, edx = _vendor_regs(HV_CPUID_VENDOR)
    max_vps = policy.max_vps or vp_count
    leaves: list[CpuidLeaf] = [
        (HvCpuidLeaf.VENDOR_AND_MAX, 0, int(HV_CPUID_MAX_LEAF), ebx, ecx, edx),
        (HvCpuidLeaf.INTERFACE, 0, HV_CPUID_INTERFACE_SIGNATURE, 0, 0, 0),
        (HvCpuidLeaf.VERSION, 0, HV_VERSION_BUILD, (HV_VERSION_MAJOR << HV_VERSION_MAJOR_SHIFT) | HV_VERSION_MINOR, 0, 0),
        (HvCpuidLeaf.FEATURES, 0, privileges & _U32, (privileges >> 32) & _U32, 0, int(policy.features())),
        (
            HvCpuidLeaf.ENLIGHTENMENT_INFO,
            0,
            int(policy.recommendations()),
            policy.spin_retries if policy.spin_wait else HV_SPIN_RETRY_NEVER,
            0,
            0,
        ),
        (HvCpuidLeaf.IMPLEMENTATION_LIMITS, 0, max_vps, vp_count, 0, 0),
    ]
    for leaf in range(HvCpuidLeaf.HARDWARE_FEATURES, HV_CPUID_MAX_LEAF + 1):
        leaves.append((leaf, 0, 0, 0, 0, 0))
    return leaves
