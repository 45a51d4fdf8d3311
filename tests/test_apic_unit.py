"""Unit tests for the userspace local APIC and the timer services (no KVM needed)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from vsmtrace.vmm.devices.apic import (
    APIC_BASE_BSP,
    APIC_BASE_EN,
    APIC_BASE_EXTD,
    APIC_DEFAULT_BASE,
    ApicGpFault,
    ApicMode,
    ApicRouter,
    DeliveryMode,
    DestShorthand,
    Esr,
    Icr,
    LocalApic,
    Lvt,
    Reg,
    TimerMode,
    divisor_of,
    x2apic_msr,
)
from vsmtrace.vmm.timers import ManualClock, ManualTimerService, TimerService

TSC_HZ = 2_000_000_000  # 2 GHz guest TSC: 2 ticks per ns
TIMER_HZ = 1_000_000_000  # 1 GHz APIC timer clock: with divide-by-1, one count per ns
XAPIC = APIC_DEFAULT_BASE | APIC_BASE_EN
X2APIC = XAPIC | APIC_BASE_EXTD
DIV_BY_1 = 0xB
DIV_BY_2 = 0x0
DIV_BY_16 = 0x3
DIV_BY_128 = 0xA
MASKED = 1 << 16
PERIODIC = int(TimerMode.PERIODIC) << 17
TSC_DEADLINE = int(TimerMode.TSC_DEADLINE) << 17
SW_ENABLE = 0x100


@dataclass
class Rig:
    """Several APICs on one router with manual time, recording every callback."""

    clock: ManualClock
    timers: ManualTimerService
    router: ApicRouter
    apics: list[LocalApic]
    pending: list[int] = field(default_factory=list)
    eois: list[tuple[int, int]] = field(default_factory=list)
    inits: list[int] = field(default_factory=list)
    sipis: list[tuple[int, int]] = field(default_factory=list)
    nmis: list[int] = field(default_factory=list)

    @property
    def apic(self) -> LocalApic:
        return self.apics[0]

    def advance(self, delta_ns: int) -> int:
        return self.timers.advance_to(self.clock.now_ns() + delta_ns)


def make_rig(count: int = 1, *, ids: list[int] | None = None, enable: bool = True, **kwargs: object) -> Rig:
    clock = ManualClock(TSC_HZ)
    timers = ManualTimerService(clock)
    rig = Rig(clock, timers, None, [])  # type: ignore[arg-type]
    rig.router = ApicRouter(
        on_init=rig.inits.append,
        on_sipi=lambda apic_id, vector: rig.sipis.append((apic_id, vector)),
        on_nmi=rig.nmis.append,
    )
    kwargs.setdefault("min_periodic_ns", 0)
    kwargs.setdefault("timer_hz", TIMER_HZ)
    for apic_id in ids if ids is not None else range(count):

        def pending(apic_id: int = apic_id) -> None:
            rig.pending.append(apic_id)

        def eoi(vector: int, apic_id: int = apic_id) -> None:
            rig.eois.append((apic_id, vector))

        apic = LocalApic(
            apic_id,
            bsp=apic_id == 0,
            clock=clock,
            timers=timers,
            bus=rig.router,
            on_pending=pending,
            on_eoi=eoi,
            tsc_hz=TSC_HZ,
            **kwargs,  # type: ignore[arg-type]
        )
        if enable:
            apic.mmio_write(Reg.SVR, 4, SW_ENABLE | 0xFF)
        rig.router.add(apic)
        rig.apics.append(apic)
    return rig


def to_x2apic(apic: LocalApic) -> None:
    apic.set_base_msr(X2APIC | (apic.base_msr & APIC_BASE_BSP))


def icr_low(
    vector: int,
    mode: DeliveryMode = DeliveryMode.FIXED,
    *,
    logical: bool = False,
    shorthand: DestShorthand = DestShorthand.NONE,
    level: bool = False,
    assert_: bool = True,
) -> int:
    return vector | (mode << 8) | (logical << 11) | (assert_ << 14) | (level << 15) | (shorthand << 18)


def send_xapic(apic: LocalApic, dest: int, low: int) -> None:
    apic.mmio_write(Reg.ICR_HIGH, 4, dest << 24)
    apic.mmio_write(Reg.ICR_LOW, 4, low)


def send_x2apic(apic: LocalApic, dest: int, low: int) -> None:
    apic.msr_write(x2apic_msr(Reg.ICR_LOW), (dest << 32) | low)


def irr_vectors(apic: LocalApic) -> list[int]:
    irr = apic.snapshot().irr
    return [v for v in range(256) if irr >> v & 1]


# --------------------------------------------------------------------------- reset values


def test_power_on_register_values() -> None:
    rig = make_rig(2, ids=[0, 3], enable=False)
    bsp, ap = rig.apics
    assert bsp.base_msr == 0xFEE00900
    assert ap.base_msr == 0xFEE00800
    assert bsp.mode is ApicMode.XAPIC
    expected = {
        Reg.ID: 3 << 24,
        Reg.VERSION: 0x00050014,
        Reg.TPR: 0,
        Reg.APR: 0,
        Reg.PPR: 0,
        Reg.LDR: 0,
        Reg.DFR: 0xFFFFFFFF,
        Reg.SVR: 0xFF,
        Reg.ESR: 0,
        Reg.ICR_LOW: 0,
        Reg.ICR_HIGH: 0,
        Reg.LVT_TIMER: MASKED,
        Reg.LVT_THERMAL: MASKED,
        Reg.LVT_PERF: MASKED,
        Reg.LVT_LINT0: MASKED,
        Reg.LVT_LINT1: MASKED,
        Reg.LVT_ERROR: MASKED,
        Reg.TIMER_INITIAL: 0,
        Reg.TIMER_CURRENT: 0,
        Reg.TIMER_DIVIDE: 0,
    }
    for reg, value in expected.items():
        assert ap.mmio_read(reg, 4) == value, reg.name
    for base in (Reg.ISR0, Reg.TMR0, Reg.IRR0):
        assert all(ap.mmio_read(base + 16 * i, 4) == 0 for i in range(8))
    assert not ap.sw_enabled
    assert ap.pending_vector() is None
    # No CMCI by default: offset 0x2F0 is reserved.
    assert ap.mmio_read(Reg.LVT_CMCI, 4) == 0


def test_cmci_option_changes_version_and_adds_lvt() -> None:
    apic = make_rig(cmci=True).apic
    assert apic.mmio_read(Reg.VERSION, 4) == 0x00060014
    apic.mmio_write(Reg.LVT_CMCI, 4, 0x4F2)
    assert apic.mmio_read(Reg.LVT_CMCI, 4) == 0x4F2
    assert apic.mmio_read(Reg.ESR, 4) == 0


def test_init_reset_keeps_id_and_base() -> None:
    rig = make_rig(ids=[5])
    apic = rig.apic
    apic.set_base_msr(0xFED00000 | APIC_BASE_EN)
    apic.mmio_write(Reg.TPR, 4, 0x20)
    apic.mmio_write(Reg.LDR, 4, 0x01000000)
    apic.accept_interrupt(0x40)
    apic.reset()
    assert apic.base_msr == 0xFED00000 | APIC_BASE_EN
    assert apic.mmio_read(Reg.ID, 4) == 5 << 24
    assert apic.mmio_read(Reg.TPR, 4) == 0
    assert apic.mmio_read(Reg.LDR, 4) == 0
    assert apic.mmio_read(Reg.SVR, 4) == 0xFF
    assert irr_vectors(apic) == []
    apic.hard_reset()
    assert apic.base_msr == 0xFEE00800


# --------------------------------------------------------------------------- priorities


def test_tpr_masks_by_priority_class() -> None:
    apic = make_rig().apic
    apic.accept_interrupt(0x31)
    apic.accept_interrupt(0x52)
    apic.mmio_write(Reg.TPR, 4, 0x40)
    assert apic.mmio_read(Reg.PPR, 4) == 0x40
    assert apic.pending_vector() == 0x52
    apic.mmio_write(Reg.TPR, 4, 0x5F)
    assert apic.pending_vector() is None  # class 5 does not beat PPR class 5
    apic.mmio_write(Reg.TPR, 4, 0x2F)
    assert apic.pending_vector() == 0x52
    assert apic.mmio_read(Reg.TPR, 4) == 0x2F
    # APR: TPR class 2 < IRRV class 5, so APR = max of the classes.
    assert apic.mmio_read(Reg.APR, 4) == 0x50


def test_cr8_is_tpr_high_nibble() -> None:
    apic = make_rig().apic
    apic.mmio_write(Reg.TPR, 4, 0x7A)
    assert apic.cr8 == 7
    apic.set_tpr_from_cr8(0x3)
    assert apic.tpr == 0x30
    apic.accept_interrupt(0x3F)
    assert apic.pending_vector() is None
    apic.set_tpr_from_cr8(0x2)
    assert apic.pending_vector() == 0x3F


def test_nested_irr_isr_eoi_ordering() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.accept_interrupt(0x40)
    assert apic.acknowledge() == 0x40
    assert apic.mmio_read(Reg.ISR0 + 0x20, 4) == 1  # vector 0x40 is ISR register 2, bit 0
    assert apic.mmio_read(Reg.PPR, 4) == 0x40
    apic.accept_interrupt(0x45)  # same class as the one in service: held
    apic.accept_interrupt(0x35)  # lower class: held
    assert apic.pending_vector() is None
    apic.accept_interrupt(0x61)  # higher class: nests
    assert apic.acknowledge() == 0x61
    assert apic.mmio_read(Reg.PPR, 4) == 0x60
    assert apic.pending_vector() is None
    apic.mmio_write(Reg.EOI, 4, 0)
    assert rig.eois == [(0, 0x61)]
    assert apic.mmio_read(Reg.PPR, 4) == 0x40
    assert apic.pending_vector() is None
    apic.eoi()
    assert rig.eois[-1] == (0, 0x40)
    assert apic.pending_vector() == 0x45
    assert apic.acknowledge() == 0x45
    apic.eoi()
    assert apic.acknowledge() == 0x35
    apic.eoi()
    assert apic.snapshot().isr == 0
    # Nothing deliverable: INTA returns the spurious vector and ISR is untouched.
    assert apic.acknowledge() == 0xFF
    assert apic.snapshot().isr == 0
    apic.eoi()  # EOI with empty ISR is harmless
    assert [vector for _, vector in rig.eois] == [0x61, 0x40, 0x45, 0x35]


def test_level_triggered_sets_tmr_and_edge_clears_it() -> None:
    apic = make_rig().apic
    apic.accept_interrupt(0x81, level_triggered=True)
    assert apic.mmio_read(Reg.TMR0 + 0x40, 4) == 1 << 1
    apic.accept_interrupt(0x81)
    assert apic.mmio_read(Reg.TMR0 + 0x40, 4) == 0
    assert apic.mmio_read(Reg.IRR0 + 0x40, 4) == 1 << 1


def test_on_pending_called_from_acceptance() -> None:
    rig = make_rig()
    rig.apic.accept_interrupt(0x30)
    assert rig.pending == [0]


def test_software_disabled_holds_irr_and_drops_new_fixed() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.accept_interrupt(0x50)
    apic.mmio_write(Reg.LVT_TIMER, 4, 0x20)
    apic.mmio_write(Reg.SVR, 4, 0xFF)  # software disable
    assert apic.mmio_read(Reg.LVT_TIMER, 4) == 0x20 | MASKED
    apic.mmio_write(Reg.LVT_ERROR, 4, 0x33)
    assert apic.mmio_read(Reg.LVT_ERROR, 4) == 0x33 | MASKED  # cannot unmask while disabled
    assert apic.pending_vector() is None
    assert apic.accept_interrupt(0x60) is False
    assert apic.stats.dropped_disabled == 1
    apic.mmio_write(Reg.SVR, 4, SW_ENABLE | 0xFF)
    assert apic.pending_vector() == 0x50  # held, not lost
    assert irr_vectors(apic) == [0x50]


# --------------------------------------------------------------------------- ESR


def test_esr_illegal_vector_write_then_read() -> None:
    rig = make_rig()
    apic = rig.apic
    assert apic.accept_interrupt(5) is False
    assert irr_vectors(apic) == []
    assert apic.mmio_read(Reg.ESR, 4) == 0  # not visible until ESR is written
    apic.mmio_write(Reg.ESR, 4, 0)
    assert apic.mmio_read(Reg.ESR, 4) == Esr.RECEIVE_ILLEGAL_VECTOR
    apic.mmio_write(Reg.ESR, 4, 0)
    assert apic.mmio_read(Reg.ESR, 4) == 0


def test_error_lvt_raises_interrupt() -> None:
    apic = make_rig().apic
    apic.mmio_write(Reg.LVT_ERROR, 4, 0xFE)
    apic.accept_interrupt(0x0F)
    assert apic.pending_vector() == 0xFE
    # An illegal vector in the error LVT itself does not recurse.
    apic.mmio_write(Reg.LVT_ERROR, 4, 0x02)
    apic.accept_interrupt(0x01)
    apic.mmio_write(Reg.ESR, 4, 0)
    assert apic.mmio_read(Reg.ESR, 4) == Esr.RECEIVE_ILLEGAL_VECTOR


def test_send_illegal_vector_is_not_sent() -> None:
    rig = make_rig(2)
    send_xapic(rig.apic, 1, icr_low(3))
    assert irr_vectors(rig.apics[1]) == []
    rig.apic.mmio_write(Reg.ESR, 4, 0)
    assert rig.apic.mmio_read(Reg.ESR, 4) == Esr.SEND_ILLEGAL_VECTOR
    assert rig.apics[1].mmio_read(Reg.ESR, 4) == 0


def test_reserved_mmio_offset_sets_illegal_register() -> None:
    apic = make_rig().apic
    assert apic.mmio_read(0x3F0, 4) == 0  # SELF IPI does not exist in xAPIC
    apic.mmio_write(0x290, 4, 0x1234)
    apic.mmio_write(Reg.ESR, 4, 0)
    assert apic.mmio_read(Reg.ESR, 4) == Esr.ILLEGAL_REGISTER


# --------------------------------------------------------------------------- MMIO / MSR paths


def test_mmio_sub_dword_and_unaligned_accesses() -> None:
    apic = make_rig().apic
    apic.mmio_write(Reg.TPR, 4, 0x000000A5)
    assert apic.mmio_read(Reg.TPR, 1) == 0xA5
    assert apic.mmio_read(Reg.VERSION + 2, 1) == 0x05
    assert apic.mmio_read(Reg.VERSION + 4, 4) == 0  # bytes 4-15 of a slot read as zero
    assert apic.mmio_read(Reg.TPR, 8) == 0xA5
    apic.mmio_write(Reg.TPR, 2, 0x11)  # not a 32-bit write: ignored
    apic.mmio_write(Reg.TPR + 4, 4, 0x11)  # not at a slot start: ignored
    assert apic.mmio_read(Reg.TPR, 4) == 0xA5
    assert apic.stats.ignored_mmio_writes == 2


def test_read_only_mmio_writes_ignored() -> None:
    apic = make_rig().apic
    for reg in (Reg.VERSION, Reg.PPR, Reg.APR, Reg.ISR0, Reg.IRR0, Reg.TIMER_CURRENT):
        apic.mmio_write(reg, 4, 0xFFFFFFFF)
    assert apic.mmio_read(Reg.VERSION, 4) == 0x50014
    assert irr_vectors(apic) == []
    assert apic.mmio_read(Reg.PPR, 4) == 0


def test_xapic_and_x2apic_paths_give_same_state() -> None:
    rig = make_rig(2)
    a, b = rig.apics
    to_x2apic(b)
    writes = {
        Reg.TPR: 0x21,
        Reg.SVR: 0x1F0,
        Reg.LVT_TIMER: 0x20040,
        Reg.LVT_THERMAL: 0x10441,
        Reg.LVT_PERF: 0x442,
        Reg.LVT_LINT0: 0xA743,
        Reg.LVT_LINT1: 0x10444,
        Reg.LVT_ERROR: 0x45,
        Reg.TIMER_DIVIDE: 0xA,
        Reg.TIMER_INITIAL: 0x1000,
    }
    for reg, value in writes.items():
        a.mmio_write(reg, 4, value)
        b.msr_write(x2apic_msr(reg), value)
    sa, sb = a.snapshot(), b.snapshot()
    assert sa.lvt == sb.lvt
    assert (sa.tpr, sa.svr, sa.timer_divide, sa.timer_initial) == (sb.tpr, sb.svr, sb.timer_divide, sb.timer_initial)
    for reg in writes:
        assert a.mmio_read(reg, 4) == b.msr_read(x2apic_msr(reg)), reg.name
    rig.advance(0x100 * 128)
    assert a.mmio_read(Reg.TIMER_CURRENT, 4) == b.msr_read(x2apic_msr(Reg.TIMER_CURRENT)) == 0x1000 - 0x100


def test_state_survives_switch_to_x2apic() -> None:
    apic = make_rig(ids=[0x13]).apic
    apic.mmio_write(Reg.TPR, 4, 0x30)
    apic.mmio_write(Reg.LVT_LINT0, 4, 0x700)
    apic.accept_interrupt(0x77)
    to_x2apic(apic)
    assert apic.msr_read(0x808) == 0x30
    assert apic.msr_read(0x835) == 0x700
    assert apic.msr_read(0x820 + 3) == 1 << (0x77 - 96)
    assert apic.msr_read(0x802) == 0x13  # 32-bit x2APIC ID
    assert apic.msr_read(0x80D) == (1 << 16) | (1 << 3)  # cluster 1, member bit 3
    # The MMIO page is no longer decoded.
    assert apic.mmio_read(Reg.TPR, 4) == 0xFFFFFFFF
    apic.mmio_write(Reg.TPR, 4, 0)
    assert apic.tpr == 0x30


def test_mmio_not_decoded_when_globally_disabled() -> None:
    apic = make_rig().apic
    apic.set_base_msr(APIC_DEFAULT_BASE | APIC_BASE_BSP)
    assert apic.mode is ApicMode.DISABLED
    assert apic.mmio_read(Reg.VERSION, 4) == 0xFFFFFFFF
    assert apic.accept_interrupt(0x40) is False


@pytest.mark.parametrize(
    ("msr", "why"),
    [
        (0x800, "reserved"),
        (0x801, "reserved"),
        (0x809, "APR does not exist in x2APIC"),
        (0x80C, "RRD does not exist in x2APIC"),
        (0x80E, "DFR does not exist in x2APIC"),
        (0x82F, "no CMCI"),
        (0x831, "ICR high does not exist in x2APIC"),
        (0x83A, "reserved"),
        (0x840, "reserved"),
        (0x80B, "EOI is write-only"),
        (0x83F, "SELF IPI is write-only"),
        (0x1000, "not an x2APIC MSR"),
    ],
)
def test_x2apic_rdmsr_gp(msr: int, why: str) -> None:
    apic = make_rig().apic
    to_x2apic(apic)
    with pytest.raises(ApicGpFault):
        apic.msr_read(msr)


@pytest.mark.parametrize(
    ("msr", "value"),
    [
        (0x802, 0),  # ID read-only
        (0x803, 0),  # version
        (0x80A, 0),  # PPR
        (0x80D, 0),  # LDR read-only in x2APIC
        (0x810, 0),  # ISR
        (0x818, 0),  # TMR
        (0x820, 0),  # IRR
        (0x839, 0),  # current count
        (0x80B, 1),  # non-zero EOI
        (0x828, 1),  # non-zero ESR
        (0x830, 1 << 13),  # ICR reserved bit
        (0x830, 1 << 20),
        (0x83F, 0x100),  # SELF IPI reserved bits
        (0x808, 1 << 32),  # high half of a 32-bit register
        (0x80E, 0),  # DFR
    ],
)
def test_x2apic_wrmsr_gp(msr: int, value: int) -> None:
    apic = make_rig().apic
    to_x2apic(apic)
    with pytest.raises(ApicGpFault):
        apic.msr_write(msr, value)


def test_x2apic_msrs_gp_in_xapic_mode() -> None:
    apic = make_rig().apic
    with pytest.raises(ApicGpFault):
        apic.msr_read(0x808)
    with pytest.raises(ApicGpFault):
        apic.msr_write(0x808, 0)


def test_x2apic_eoi_and_esr_zero_writes() -> None:
    apic = make_rig().apic
    to_x2apic(apic)
    apic.accept_interrupt(0x40)
    assert apic.acknowledge() == 0x40
    apic.msr_write(0x80B, 0)
    assert apic.snapshot().isr == 0
    apic.accept_interrupt(2)
    apic.msr_write(0x828, 0)
    assert apic.msr_read(0x828) == Esr.RECEIVE_ILLEGAL_VECTOR


# --------------------------------------------------------------------------- IA32_APIC_BASE


def test_base_msr_transitions() -> None:
    apic = make_rig().apic
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(APIC_DEFAULT_BASE | APIC_BASE_EXTD)  # EXTD without EN
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(XAPIC | 1)  # reserved bit 0
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(XAPIC | 1 << 9)  # reserved bit 9
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(XAPIC | 1 << 50)  # above MAXPHYADDR
    apic.set_base_msr(X2APIC)
    assert apic.mode is ApicMode.X2APIC
    assert apic.base_msr == X2APIC | APIC_BASE_BSP  # BSP bit is read-only
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(XAPIC)  # x2APIC -> xAPIC
    apic.msr_write(0x808, 0x40)
    apic.set_base_msr(APIC_DEFAULT_BASE)  # -> disabled resets the registers
    assert apic.mode is ApicMode.DISABLED
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(X2APIC)  # disabled -> x2APIC
    apic.base_msr = XAPIC
    assert apic.mode is ApicMode.XAPIC
    assert apic.tpr == 0
    assert not apic.sw_enabled


def test_base_relocation_and_no_x2apic_support() -> None:
    apic = make_rig(x2apic_supported=False).apic
    apic.set_base_msr(0xFEC00000 | APIC_BASE_EN)
    assert apic.mmio_base == 0xFEC00000
    assert apic.mmio_decoded
    with pytest.raises(ApicGpFault):
        apic.set_base_msr(X2APIC)


# --------------------------------------------------------------------------- ICR and routing


def test_icr_decode_encode_roundtrip() -> None:
    value = (0x07 << 56) | icr_low(0x42, DeliveryMode.LOWEST_PRIORITY, logical=True, level=True)
    icr = Icr.decode(value, x2apic=False)
    assert icr == Icr(0x42, DeliveryMode.LOWEST_PRIORITY, True, True, True, DestShorthand.NONE, 7, False)
    assert icr.encode() == value
    x2 = Icr.decode(
        (0x12345 << 32) | icr_low(0x99, DeliveryMode.NMI, shorthand=DestShorthand.ALL_EXCLUDING_SELF), x2apic=True
    )
    assert (x2.destination, x2.delivery_mode, x2.shorthand) == (
        0x12345,
        DeliveryMode.NMI,
        DestShorthand.ALL_EXCLUDING_SELF,
    )
    assert Icr.decode(0xFF << 56, x2apic=False).broadcast


def test_lvt_decode_and_divisors() -> None:
    lvt = Lvt.decode(MASKED | (1 << 15) | (1 << 13) | 0x7FF | PERIODIC)
    assert (lvt.vector, lvt.delivery_mode, lvt.masked, lvt.timer_mode) == (
        0xFF,
        DeliveryMode.EXTINT,
        True,
        TimerMode.PERIODIC,
    )
    assert lvt.level_triggered and lvt.polarity_low
    assert [divisor_of(v) for v in (0, 1, 2, 3, 8, 9, 0xA, 0xB)] == [2, 4, 8, 16, 32, 64, 128, 1]


def test_icr_register_readback() -> None:
    apic = make_rig(2).apic
    send_xapic(apic, 1, icr_low(0x40) | (1 << 12))
    assert apic.mmio_read(Reg.ICR_LOW, 4) == 0x4040  # delivery status always idle
    assert apic.mmio_read(Reg.ICR_HIGH, 4) == 1 << 24


def test_physical_xapic_routing() -> None:
    rig = make_rig(4)
    send_xapic(rig.apics[0], 2, icr_low(0x40))
    assert [irr_vectors(a) for a in rig.apics] == [[], [], [0x40], []]
    send_xapic(rig.apics[0], 0xFF, icr_low(0x41))
    assert [0x41 in irr_vectors(a) for a in rig.apics] == [True] * 4
    send_xapic(rig.apics[0], 9, icr_low(0x42))  # nobody
    assert all(0x42 not in irr_vectors(a) for a in rig.apics)


def test_xapic_id_write_changes_physical_match() -> None:
    rig = make_rig(2)
    rig.apics[1].mmio_write(Reg.ID, 4, 7 << 24)
    assert rig.apics[1].mmio_read(Reg.ID, 4) == 7 << 24
    send_xapic(rig.apic, 7, icr_low(0x50))
    assert irr_vectors(rig.apics[1]) == [0x50]


def test_logical_flat_routing() -> None:
    rig = make_rig(4)
    for i, apic in enumerate(rig.apics):
        apic.mmio_write(Reg.LDR, 4, (1 << i) << 24)
    send_xapic(rig.apic, 0b0101, icr_low(0x40, logical=True))
    assert [irr_vectors(a) for a in rig.apics] == [[0x40], [], [0x40], []]
    send_xapic(rig.apic, 0xFF, icr_low(0x41, logical=True))
    assert all(0x41 in irr_vectors(a) for a in rig.apics)


def test_logical_cluster_routing() -> None:
    rig = make_rig(4)
    ldrs = [(1 << 4) | 1, (1 << 4) | 2, (2 << 4) | 1, (2 << 4) | 2]
    for apic, ldr in zip(rig.apics, ldrs, strict=True):
        apic.mmio_write(Reg.DFR, 4, 0x0FFFFFFF)
        apic.mmio_write(Reg.LDR, 4, ldr << 24)
    assert rig.apic.mmio_read(Reg.DFR, 4) == 0x0FFFFFFF
    send_xapic(rig.apic, (2 << 4) | 0b11, icr_low(0x40, logical=True))
    assert [irr_vectors(a) for a in rig.apics] == [[], [], [0x40], [0x40]]
    send_xapic(rig.apic, (1 << 4) | 0b10, icr_low(0x41, logical=True))
    assert [0x41 in irr_vectors(a) for a in rig.apics] == [False, True, False, False]


def test_x2apic_physical_and_cluster_routing() -> None:
    rig = make_rig(ids=[0, 1, 2, 0x11])
    for apic in rig.apics:
        to_x2apic(apic)
    send_x2apic(rig.apic, 0x11, icr_low(0x40))
    assert [irr_vectors(a) for a in rig.apics] == [[], [], [], [0x40]]
    send_x2apic(rig.apic, 0b110, icr_low(0x41, logical=True))  # cluster 0, members 1 and 2
    assert [0x41 in irr_vectors(a) for a in rig.apics] == [False, True, True, False]
    send_x2apic(rig.apic, (1 << 16) | 0b10, icr_low(0x42, logical=True))  # cluster 1, member 1
    assert [0x42 in irr_vectors(a) for a in rig.apics] == [False, False, False, True]
    send_x2apic(rig.apic, 0xFFFFFFFF, icr_low(0x43))
    assert all(0x43 in irr_vectors(a) for a in rig.apics)


def test_shorthands() -> None:
    rig = make_rig(3)
    src = rig.apics[1]
    send_xapic(src, 0, icr_low(0x40, shorthand=DestShorthand.SELF))
    assert [0x40 in irr_vectors(a) for a in rig.apics] == [False, True, False]
    send_xapic(src, 0, icr_low(0x41, shorthand=DestShorthand.ALL_INCLUDING_SELF))
    assert [0x41 in irr_vectors(a) for a in rig.apics] == [True, True, True]
    send_xapic(src, 0, icr_low(0x42, shorthand=DestShorthand.ALL_EXCLUDING_SELF))
    assert [0x42 in irr_vectors(a) for a in rig.apics] == [True, False, True]
    send_xapic(src, 0, icr_low(0, DeliveryMode.NMI, shorthand=DestShorthand.SELF))
    assert rig.nmis == [] and rig.router.ignored == 1


def test_x2apic_self_ipi_msr() -> None:
    rig = make_rig(2)
    to_x2apic(rig.apic)
    rig.apic.msr_write(0x83F, 0x99)
    assert irr_vectors(rig.apic) == [0x99]
    assert irr_vectors(rig.apics[1]) == []
    assert rig.pending == [0]


def test_lowest_priority_arbitration() -> None:
    rig = make_rig(3)
    for i, apic in enumerate(rig.apics):
        apic.mmio_write(Reg.LDR, 4, (1 << i) << 24)
    rig.apics[0].mmio_write(Reg.TPR, 4, 0x30)
    rig.apics[1].mmio_write(Reg.TPR, 4, 0x10)
    rig.apics[2].mmio_write(Reg.TPR, 4, 0x20)
    send_xapic(rig.apic, 0b111, icr_low(0x50, DeliveryMode.LOWEST_PRIORITY, logical=True))
    assert [irr_vectors(a) for a in rig.apics] == [[], [0x50], []]
    # Focus: APIC 1 already has 0x50 pending, so it gets it again even if no longer lowest.
    rig.apics[1].mmio_write(Reg.TPR, 4, 0x40)
    send_xapic(rig.apic, 0b111, icr_low(0x50, DeliveryMode.LOWEST_PRIORITY, logical=True))
    assert rig.pending.count(1) == 2
    # Without focus, lowest APR wins; ties go to the lowest APIC ID.
    rig.apics[1].mmio_write(Reg.SVR, 4, 0x3FF)  # focus checking disabled
    rig.apics[0].mmio_write(Reg.TPR, 4, 0x20)
    send_xapic(rig.apic, 0b111, icr_low(0x51, DeliveryMode.LOWEST_PRIORITY, logical=True))
    assert [0x51 in irr_vectors(a) for a in rig.apics] == [True, False, False]
    # Software-disabled APICs are not candidates.
    rig.apics[0].mmio_write(Reg.SVR, 4, 0xFF)
    send_xapic(rig.apics[1], 0b101, icr_low(0x52, DeliveryMode.LOWEST_PRIORITY, logical=True))
    assert [0x52 in irr_vectors(a) for a in rig.apics] == [False, False, True]


def test_init_sipi_nmi_smi() -> None:
    rig = make_rig(3)
    target = rig.apics[2]
    target.mmio_write(Reg.TPR, 4, 0x50)
    send_xapic(rig.apic, 2, icr_low(0, DeliveryMode.INIT, level=True))
    assert rig.inits == [2]
    assert target.tpr == 0  # INIT reset the target's registers
    send_xapic(rig.apic, 2, icr_low(0, DeliveryMode.INIT, level=True, assert_=False))  # de-assert
    assert rig.inits == [2] and rig.router.ignored == 1
    send_xapic(rig.apic, 0, icr_low(0x9A, DeliveryMode.STARTUP, shorthand=DestShorthand.ALL_EXCLUDING_SELF))
    assert rig.sipis == [(1, 0x9A), (2, 0x9A)]
    send_xapic(rig.apic, 1, icr_low(0, DeliveryMode.NMI))
    assert rig.nmis == [1]
    # NMI and INIT reach a software-disabled APIC too.
    target.mmio_write(Reg.SVR, 4, 0xFF)
    send_xapic(rig.apic, 2, icr_low(0, DeliveryMode.NMI))
    assert rig.nmis == [1, 2]
    send_xapic(rig.apic, 1, icr_low(0, DeliveryMode.SMI))
    assert rig.router.smi_ignored == 1
    assert rig.nmis == [1, 2] and rig.inits == [2]


def test_hv_icr_and_pv_ipi_helpers() -> None:
    rig = make_rig(3)
    rig.apic.write_icr((2 << 56) | icr_low(0x60))
    assert irr_vectors(rig.apics[2]) == [0x60]
    assert rig.apic.read_icr() == (2 << 56) | icr_low(0x60)
    rig.router.send_fixed([0, 1], 0x61)
    assert [0x61 in irr_vectors(a) for a in rig.apics] == [True, True, False]


def test_concurrent_ipis_do_not_deadlock() -> None:
    rig = make_rig(2)
    a, b = rig.apics

    def hammer(src: LocalApic, dest: int) -> None:
        for i in range(300):
            send_xapic(src, dest, icr_low(0x40 + (i % 0x80)))

    threads = [threading.Thread(target=hammer, args=(a, 1)), threading.Thread(target=hammer, args=(b, 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)
    assert len(irr_vectors(a)) == len(irr_vectors(b)) == 0x80


# --------------------------------------------------------------------------- timer


def test_one_shot_expiry_and_current_count() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_16)
    apic.mmio_write(Reg.LVT_TIMER, 4, 0xEC)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)  # 1000 counts x 16 ns
    assert apic.timer_deadline_ns() == 16_000
    rig.advance(160)
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 990
    rig.advance(15_839)
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 1
    assert apic.pending_vector() is None
    rig.advance(1)
    assert rig.clock.now_ns() == 16_000
    assert apic.pending_vector() == 0xEC
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 0
    assert apic.timer_deadline_ns() is None
    assert apic.mmio_read(Reg.TIMER_INITIAL, 4) == 1000  # initial count is not consumed


def test_periodic_exact_deadlines_without_drift() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    rig.advance(7)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1_000_000)  # 1 ms period starting at t=7
    deadlines = []
    for k in range(1, 6):
        deadlines.append(apic.timer_deadline_ns())
        rig.timers.advance_to(7 + k * 1_000_000 + 123)  # each expiry handled 123 ns late
        assert apic.acknowledge() == 0x30
        apic.eoi()
    assert deadlines == [7 + k * 1_000_000 for k in range(1, 6)]
    assert apic.timer_deadline_ns() == 7 + 6 * 1_000_000
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 1_000_000 - 123
    assert apic.stats.timer_expiries == 5


def test_periodic_late_expiry_coalesces_and_stays_on_grid() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)
    assert rig.timers.advance_to(10_500) == 1  # ten periods missed: one expiry, IRR coalesces
    assert irr_vectors(apic) == [0x30]
    assert apic.timer_deadline_ns() == 11_000
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 500


def test_periodic_non_integral_period_has_no_drift() -> None:
    rig = make_rig(timer_hz=3_000_000)  # one count = 333.33 ns
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1)
    seen = []
    for _ in range(300):
        deadline = apic.timer_deadline_ns()
        seen.append(deadline)
        rig.timers.advance_to(deadline)
    assert seen == [-(-k * 1000 // 3) for k in range(1, 301)]
    assert seen[-1] == 100_000  # 300 periods of 1/3 us, exactly


def test_periodic_min_period_clamp() -> None:
    rig = make_rig(min_periodic_ns=200_000)
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 10)  # 10 ns period: far too fast
    assert apic.timer_deadline_ns() == 200_000
    rig.timers.advance_to(200_000)
    assert apic.timer_deadline_ns() == 400_000


def test_masked_timer_counts_without_interrupt() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, MASKED | PERIODIC | 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)
    rig.timers.advance_to(2500)
    assert irr_vectors(apic) == []
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 500
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)  # unmask: the count carries on
    rig.timers.advance_to(3000)
    assert irr_vectors(apic) == [0x30]
    assert rig.pending == [0]


def test_divide_configuration_and_change_while_running() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.LVT_TIMER, 4, 0x31)
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_128)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 100)
    assert apic.timer_deadline_ns() == 12_800
    rig.timers.advance_to(128 * 40)
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 60
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_2)  # the remaining 60 counts now take 2 ns each
    assert apic.mmio_read(Reg.TIMER_DIVIDE, 4) == DIV_BY_2
    assert apic.timer_deadline_ns() == 128 * 40 + 120
    rig.timers.advance_to(128 * 40 + 120)
    assert irr_vectors(apic) == [0x31]


def test_initial_count_zero_stops_and_rewrite_restarts() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)
    rig.timers.advance_to(400)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)  # restart from now
    assert apic.timer_deadline_ns() == 1400
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 0)
    assert apic.timer_deadline_ns() is None
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 0
    assert rig.timers.pending_deadlines() == []
    rig.timers.advance_to(10_000)
    assert irr_vectors(apic) == []


def test_one_shot_to_periodic_switch_keeps_count() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.TIMER_DIVIDE, 4, DIV_BY_1)
    apic.mmio_write(Reg.LVT_TIMER, 4, 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)
    rig.timers.advance_to(300)
    apic.mmio_write(Reg.LVT_TIMER, 4, PERIODIC | 0x30)
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 700
    rig.timers.advance_to(1000)
    assert apic.timer_deadline_ns() == 2000  # reloaded with the initial count
    apic.mmio_write(Reg.LVT_TIMER, 4, 0x30)  # back to one-shot: runs down and stops
    rig.timers.advance_to(2000)
    assert apic.timer_deadline_ns() is None


def test_tsc_deadline_mode() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.tsc_deadline = 5000  # ignored outside TSC-deadline mode
    assert apic.tsc_deadline == 0
    apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1234)  # ignored in TSC-deadline mode
    assert apic.mmio_read(Reg.TIMER_INITIAL, 4) == 0
    rig.clock.advance(1000)  # TSC = 2000
    apic.tsc_deadline = 2000 + 2 * 750  # 750 ns from now
    assert apic.tsc_deadline == 3500
    assert apic.timer_deadline_ns() == 1750
    rig.timers.advance_to(1749)
    assert apic.pending_vector() is None
    rig.timers.advance_to(1750)
    assert apic.pending_vector() == 0xEF
    assert apic.tsc_deadline == 0  # cleared when it fires
    # A deadline in the past fires at once; 0 disarms.
    apic.acknowledge()
    apic.eoi()
    apic.tsc_deadline = 1
    assert apic.pending_vector() == 0xEF
    apic.acknowledge()
    apic.eoi()
    apic.tsc_deadline = 10**9
    apic.tsc_deadline = 0
    assert apic.timer_deadline_ns() is None
    # Odd TSC deltas round the deadline up, never early.
    apic.tsc_deadline = rig.clock.tsc() + 3
    assert apic.timer_deadline_ns() == rig.clock.now_ns() + 2


def test_written_tsc_moves_the_deadline_base() -> None:
    """--deterministic serves WRMSR IA32_TSC with ManualClock.set_tsc: deadlines follow the new TSC."""
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)
    rig.clock.advance(1000)
    rig.clock.set_tsc(10**6)
    assert rig.clock.tsc() == 10**6 and rig.clock.now_ns() == 1000  # time itself did not move
    rig.clock.advance(500)
    assert rig.clock.tsc() == 10**6 + 2 * 500
    apic.tsc_deadline = rig.clock.tsc() + 2 * 750
    assert apic.timer_deadline_ns() == 1500 + 750
    rig.clock.set_tsc(-1)  # wraps like the 64-bit counter
    assert rig.clock.tsc() == (1 << 64) - 1


def test_tsc_deadline_mode_switch_disarms() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)
    apic.tsc_deadline = 10_000
    apic.mmio_write(Reg.LVT_TIMER, 4, 0xEF)  # to one-shot
    assert apic.timer_deadline_ns() is None
    apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)
    assert apic.tsc_deadline == 0
    apic.mmio_write(Reg.LVT_TIMER, 4, 0xEF)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 100)
    apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)  # from one-shot: stops the count
    assert apic.timer_deadline_ns() is None
    assert apic.mmio_read(Reg.TIMER_INITIAL, 4) == 0
    rig.timers.advance_to(100_000)
    assert irr_vectors(apic) == []


def test_tsc_deadline_masked_and_unsupported() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.LVT_TIMER, 4, MASKED | TSC_DEADLINE | 0xEF)
    apic.tsc_deadline = 100
    rig.timers.advance_to(1000)
    assert irr_vectors(apic) == [] and apic.tsc_deadline == 0
    plain = make_rig(tsc_deadline_supported=False).apic
    plain.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xEF)
    assert plain.mmio_read(Reg.LVT_TIMER, 4) == 0xEF  # bit 18 is reserved without support


def test_init_reset_stops_timer() -> None:
    rig = make_rig()
    apic = rig.apic
    apic.mmio_write(Reg.LVT_TIMER, 4, 0x30)
    apic.mmio_write(Reg.TIMER_INITIAL, 4, 1000)
    apic.reset()
    assert rig.timers.pending_deadlines() == []
    assert apic.mmio_read(Reg.TIMER_CURRENT, 4) == 0


# --------------------------------------------------------------------------- timer services


def test_manual_timer_service_order_cancel_and_rearm() -> None:
    clock = ManualClock(TSC_HZ)
    timers = ManualTimerService(clock)
    fired: list[tuple[str, int]] = []
    timers.arm(300, lambda: fired.append(("c", clock.now_ns())))
    b = timers.arm(200, lambda: fired.append(("b", clock.now_ns())))
    timers.arm(100, lambda: (fired.append(("a", clock.now_ns())), timers.arm(250, lambda: fired.append(("a2", 0)))))
    timers.cancel(b)
    timers.cancel(b)  # idempotent
    assert timers.next_deadline() == 100
    assert timers.advance_to(99) == 0
    assert timers.advance_to(260) == 2
    assert [name for name, _ in fired] == ["a", "a2"]
    assert fired[0][1] == 260  # callbacks see the advanced clock
    assert timers.pending_deadlines() == [300]
    with pytest.raises(ValueError):
        timers.advance_to(10)
    timers.stop()
    assert timers.advance_to(1000) == 0


def test_manual_timer_service_compacts_cancelled_entries() -> None:
    timers = ManualTimerService()
    handles = [timers.arm(10**12 + i, lambda: None) for i in range(200)]
    for handle in handles[:150]:
        timers.cancel(handle)
    assert len(timers._heap._heap) < 200
    assert timers.pending_deadlines() == [10**12 + i for i in range(150, 200)]


def test_threaded_timer_service_fires_and_cancels() -> None:
    service = TimerService()
    try:
        import time

        done = threading.Event()
        cancelled = threading.Event()
        order: list[int] = []
        now = time.monotonic_ns()
        handle = service.arm(now + 2_000_000, cancelled.set)
        service.arm(now + 3_000_000, lambda: (order.append(threading.get_ident()), done.set()))
        service.arm(now + 1_000_000, lambda: order.append(0))
        service.cancel(handle)
        assert done.wait(2)
        assert not cancelled.is_set()
        assert order[0] == 0 and order[1] != threading.get_ident()  # ran on the timer thread
    finally:
        service.stop()
    with pytest.raises(RuntimeError):
        service.arm(0, lambda: None)


def test_threaded_timer_drives_apic() -> None:
    from vsmtrace.vmm.timers import HostClock

    clock = HostClock(TSC_HZ)
    service = TimerService(clock)
    kicked = threading.Event()
    router = ApicRouter(on_init=lambda i: None, on_sipi=lambda i, v: None, on_nmi=lambda i: None)
    apic = LocalApic(
        0, bsp=True, clock=clock, timers=service, bus=router, on_pending=kicked.set, tsc_hz=TSC_HZ, timer_hz=TIMER_HZ
    )
    router.add(apic)
    try:
        apic.mmio_write(Reg.SVR, 4, SW_ENABLE | 0xFF)
        apic.mmio_write(Reg.LVT_TIMER, 4, TSC_DEADLINE | 0xE0)
        apic.tsc_deadline = clock.tsc() + TSC_HZ // 1000  # 1 ms
        assert kicked.wait(2)
        assert apic.pending_vector() == 0xE0
    finally:
        service.stop()
