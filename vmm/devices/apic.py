"""Userspace local APIC (xAPIC and x2APIC), after Intel SDM vol. 3 chapter 11.

The VMM runs without an in-kernel irqchip, so every interrupt a VP (at a VTL) sees
is decided here: the run loop asks :meth:`LocalApic.pending_vector`, calls
:meth:`LocalApic.acknowledge` and injects the result with ``KVM_INTERRUPT``. This
module makes no KVM calls; it is a pure device model testable on its own.

Pieces:

* :class:`LocalApic` -- one per VP per VTL: registers, xAPIC MMIO and x2APIC MSR
  access paths, IA32_APIC_BASE, priority logic (TPR/PPR/APR), IRR/ISR/TMR, ESR, LVT,
  and the timer (one-shot, periodic, TSC-deadline) driven by a
  :class:`~vmm.timers.TimerScheduler`.
* :class:`ApicRouter` -- the "system bus" of one VTL: resolves ICR destinations
  (physical, logical flat/cluster, x2APIC cluster, shorthands, lowest priority) and
  delivers fixed interrupts, INIT, SIPI and NMI. The machine creates one per VTL.

Threading: every public :class:`LocalApic` method is thread-safe (one re-entrant
lock per APIC). Timer expiries arrive on the timer thread; IPIs arrive on the
sender's VP thread. Callbacks (``on_pending``, ``on_eoi``, ``bus.deliver_ipi``) are
always invoked *without* the APIC lock held, so two VPs sending each other IPIs
cannot deadlock.

Documented choices where hardware leaves room:

* Version 0x00050014 (max LVT entry 5: timer, thermal, perf, LINT0, LINT1, error;
  no CMCI). With ``cmci=True`` the version is 0x00060014 and LVT CMCI exists.
  Directed-EOI (version bit 24) is not offered, so SVR bit 12 is reserved.
* xAPIC MMIO: a 32-bit access at a 16-byte aligned offset is the architectural
  access. Reads of any other size/offset return the bytes of the register's
  16-byte slot (register in bytes 0-3, zeros after). Writes that are not 32-bit at
  a slot start are ignored. Reserved offsets read 0, ignore writes and set ESR
  "illegal register address". While the APIC is globally disabled or in x2APIC
  mode the MMIO page is not decoded: reads return all ones (an unclaimed bus),
  writes are ignored.
* x2APIC MSRs #GP (:class:`ApicGpFault`) when x2APIC is off, for unimplemented
  MSRs, RDMSR of write-only (EOI, SELF IPI), WRMSR of read-only, a non-zero write
  to EOI or ESR, bits 63:32 set in a 32-bit register, reserved ICR bits (13, 16,
  17, 20-31) and SELF IPI bits 31:8. Other reserved bits are silently dropped.
* A software-disabled APIC (SVR bit 8 clear) keeps IRR/ISR intact (interrupts
  accepted before the disable are delivered after re-enable, nothing is lost), but
  :meth:`LocalApic.pending_vector` reports nothing and new fixed interrupts are
  dropped (SDM 11.4.7.2; KVM does the same); INIT, SIPI and NMI still work (the
  router handles them). Drops are counted in ``stats``.
* Lowest-priority delivery picks, among software-enabled targets, the focus
  processor (vector already in its IRR/ISR, focus checking on) or else the lowest
  APR, ties to the lowest APIC ID (deterministic). No send/receive accept errors
  are reported (as on P4 and later).
* Periodic timer deadlines are computed from the start of the count with exact
  integer arithmetic (``start + ceil(ticks * divide * 1e9 / timer_hz)``), so there
  is no drift even when a period is not a whole number of nanoseconds; a late
  expiry coalesces the missed periods (the IRR bit is already set) and the next
  deadline stays on the grid. Periods shorter than ``min_periodic_ns`` are armed no
  sooner than that after the last expiry (KVM caps at 200 us likewise) so a guest
  cannot spin the timer thread.
* LVT timer mode 3 (reserved) and mode 2 without TSC-deadline support: the timer
  does not run.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from vsmtrace.vmm.timers import NS_PER_SEC, Clock, HostClock, ManualClock, TimerHandle, TimerScheduler

__all__ = [
    "ApicBus",
    "ApicGpFault",
    "ApicMode",
    "ApicRegisters",
    "ApicRouter",
    "ApicStats",
    "Clock",
    "DeliveryMode",
    "DestShorthand",
    "Esr",
    "HostClock",
    "Icr",
    "LocalApic",
    "Lvt",
    "LvtIndex",
    "ManualClock",
    "Reg",
    "TimerMode",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------
# Constants: every number the logic uses is named here.
# ---------------------------------------------------------------------------------

MSR_IA32_APIC_BASE = 0x1B
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF

APIC_DEFAULT_BASE = 0xFEE00000
APIC_MMIO_SIZE = 0x1000
APIC_REG_STRIDE = 0x10  # xAPIC registers sit on 16-byte boundaries
APIC_REG_SHIFT = 4  # x2APIC MSR = 0x800 + (xAPIC offset >> 4)
APIC_REG_BYTES = 4

APIC_BASE_BSP = 1 << 8
APIC_BASE_EXTD = 1 << 10  # x2APIC enable
APIC_BASE_EN = 1 << 11  # global enable
APIC_BASE_ADDR_SHIFT = 12
APIC_BASE_FLAGS_MASK = APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_EN
DEFAULT_PHYS_ADDR_BITS = 46

APIC_VERSION = 0x14  # integrated APIC
APIC_VERSION_MAX_LVT_SHIFT = 16
MAX_LVT_WITHOUT_CMCI = 5
MAX_LVT_WITH_CMCI = 6

XAPIC_ID_SHIFT = 24
XAPIC_ID_MASK = 0xFF
XAPIC_LDR_SHIFT = 24
XAPIC_LDR_MASK = 0xFF << XAPIC_LDR_SHIFT
DFR_MODEL_SHIFT = 28
DFR_MODEL_MASK = 0xF << DFR_MODEL_SHIFT
DFR_RESET = 0xFFFFFFFF
DFR_MODEL_FLAT = 0xF
DFR_MODEL_CLUSTER = 0x0
XAPIC_BROADCAST = 0xFF
XAPIC_CLUSTER_SHIFT = 4
XAPIC_CLUSTER_MEMBER_MASK = 0xF
X2APIC_BROADCAST = 0xFFFFFFFF
X2APIC_CLUSTER_SHIFT = 16
X2APIC_CLUSTER_MEMBER_MASK = 0xFFFF
X2APIC_ID_CLUSTER_SHIFT = 4  # x2APIC LDR: cluster = id >> 4, member bit = id & 0xF
X2APIC_ID_MEMBER_MASK = 0xF

REG32_MASK = 0xFFFFFFFF
VECTOR_MASK = 0xFF
PRIORITY_CLASS_SHIFT = 4
PRIORITY_CLASS_MASK = 0xF0
FIRST_LEGAL_VECTOR = 16
NUM_VECTORS = 256
VECTORS_PER_REG = 32
TPR_MASK = 0xFF
CR8_MASK = 0xF

SVR_VECTOR_MASK = 0xFF
SVR_APIC_ENABLE = 1 << 8
SVR_FOCUS_DISABLE = 1 << 9
SVR_WRITABLE = SVR_VECTOR_MASK | SVR_APIC_ENABLE | SVR_FOCUS_DISABLE
SVR_RESET = 0xFF

ICR_VECTOR_MASK = 0xFF
ICR_DELIVERY_MODE_SHIFT = 8
ICR_DELIVERY_MODE_MASK = 0x7
ICR_DEST_LOGICAL = 1 << 11
ICR_DELIVERY_STATUS = 1 << 12
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
ICR_SHORTHAND_MASK = 0x3
ICR_LOW_WRITABLE = 0x000CCFFF  # vector, mode, dest mode, level, trigger, shorthand
ICR_HIGH_SHIFT = 32
XAPIC_ICR_DEST_SHIFT = 56  # destination in ICR[63:56]
X2APIC_ICR_RESERVED = (0xFFF << 20) | (0x3 << 16) | (1 << 13)  # bits 31:20, 17:16, 13
SELF_IPI_VECTOR_MASK = 0xFF

LVT_VECTOR_MASK = 0xFF
LVT_DELIVERY_MODE_SHIFT = 8
LVT_DELIVERY_MODE_MASK = 0x7
LVT_DELIVERY_STATUS = 1 << 12
LVT_POLARITY_LOW = 1 << 13
LVT_REMOTE_IRR = 1 << 14
LVT_TRIGGER_LEVEL = 1 << 15
LVT_MASKED = 1 << 16
LVT_TIMER_MODE_SHIFT = 17
LVT_TIMER_MODE_MASK = 0x3
LVT_RESET = LVT_MASKED
LVT_WRITABLE_TIMER_NO_DEADLINE = LVT_VECTOR_MASK | LVT_MASKED | (1 << LVT_TIMER_MODE_SHIFT)
LVT_WRITABLE_TIMER = LVT_VECTOR_MASK | LVT_MASKED | (LVT_TIMER_MODE_MASK << LVT_TIMER_MODE_SHIFT)
LVT_WRITABLE_DM = LVT_VECTOR_MASK | (LVT_DELIVERY_MODE_MASK << LVT_DELIVERY_MODE_SHIFT) | LVT_MASKED
LVT_WRITABLE_LINT = LVT_WRITABLE_DM | LVT_POLARITY_LOW | LVT_TRIGGER_LEVEL
LVT_WRITABLE_ERROR = LVT_VECTOR_MASK | LVT_MASKED

DIVIDE_CONFIG_WRITABLE = 0b1011  # bits 0, 1 and 3
DIVIDE_CONFIG_HIGH_BIT = 1 << 3
DIVIDE_CONFIG_LOW_BITS = 0b11
DIVIDE_ENCODING_MOD = 8  # divisor = 1 << ((encoding + 1) % 8)

DEFAULT_MIN_PERIODIC_NS = 200_000


class Reg(enum.IntEnum):
    """xAPIC MMIO offsets; the x2APIC MSR is ``0x800 + (offset >> 4)``."""

    ID = 0x020
    VERSION = 0x030
    TPR = 0x080
    APR = 0x090
    PPR = 0x0A0
    EOI = 0x0B0
    RRD = 0x0C0
    LDR = 0x0D0
    DFR = 0x0E0
    SVR = 0x0F0
    ISR0 = 0x100  # ISR0..ISR7 at 0x100-0x170
    TMR0 = 0x180  # TMR0..TMR7 at 0x180-0x1F0
    IRR0 = 0x200  # IRR0..IRR7 at 0x200-0x270
    ESR = 0x280
    LVT_CMCI = 0x2F0
    ICR_LOW = 0x300
    ICR_HIGH = 0x310
    LVT_TIMER = 0x320
    LVT_THERMAL = 0x330
    LVT_PERF = 0x340
    LVT_LINT0 = 0x350
    LVT_LINT1 = 0x360
    LVT_ERROR = 0x370
    TIMER_INITIAL = 0x380
    TIMER_CURRENT = 0x390
    TIMER_DIVIDE = 0x3E0
    SELF_IPI = 0x3F0  # x2APIC only (MSR 0x83F)


BITMAP_REGS = 8  # ISR/TMR/IRR are 8 consecutive 32-bit registers each
BITMAP_SPAN = BITMAP_REGS * APIC_REG_STRIDE


def x2apic_msr(reg: Reg) -> int:
    """The x2APIC MSR number of an xAPIC register offset."""
    return MSR_X2APIC_FIRST + (reg >> APIC_REG_SHIFT)


class LvtIndex(enum.IntEnum):
    """Local vector table entries, in storage order."""

    CMCI = 0
    TIMER = 1
    THERMAL = 2
    PERF = 3
    LINT0 = 4
    LINT1 = 5
    ERROR = 6


LVT_REGS: dict[Reg, LvtIndex] = {
    Reg.LVT_CMCI: LvtIndex.CMCI,
    Reg.LVT_TIMER: LvtIndex.TIMER,
    Reg.LVT_THERMAL: LvtIndex.THERMAL,
    Reg.LVT_PERF: LvtIndex.PERF,
    Reg.LVT_LINT0: LvtIndex.LINT0,
    Reg.LVT_LINT1: LvtIndex.LINT1,
    Reg.LVT_ERROR: LvtIndex.ERROR,
}
LVT_WRITABLE: dict[LvtIndex, int] = {
    LvtIndex.CMCI: LVT_WRITABLE_DM,
    LvtIndex.TIMER: LVT_WRITABLE_TIMER,
    LvtIndex.THERMAL: LVT_WRITABLE_DM,
    LvtIndex.PERF: LVT_WRITABLE_DM,
    LvtIndex.LINT0: LVT_WRITABLE_LINT,
    LvtIndex.LINT1: LVT_WRITABLE_LINT,
    LvtIndex.ERROR: LVT_WRITABLE_ERROR,
}


class DeliveryMode(enum.IntEnum):
    """ICR / LVT delivery mode field (bits 10:8)."""

    FIXED = 0
    LOWEST_PRIORITY = 1
    SMI = 2
    RESERVED3 = 3
    NMI = 4
    INIT = 5
    STARTUP = 6
    EXTINT = 7


class DestShorthand(enum.IntEnum):
    """ICR destination shorthand (bits 19:18)."""

    NONE = 0
    SELF = 1
    ALL_INCLUDING_SELF = 2
    ALL_EXCLUDING_SELF = 3


class TimerMode(enum.IntEnum):
    """LVT timer mode (bits 18:17)."""

    ONE_SHOT = 0
    PERIODIC = 1
    TSC_DEADLINE = 2
    RESERVED = 3


class Esr(enum.IntFlag):
    """Error status register bits."""

    SEND_CHECKSUM = 1 << 0
    RECEIVE_CHECKSUM = 1 << 1
    SEND_ACCEPT = 1 << 2
    RECEIVE_ACCEPT = 1 << 3
    REDIRECTABLE_IPI = 1 << 4
    SEND_ILLEGAL_VECTOR = 1 << 5
    RECEIVE_ILLEGAL_VECTOR = 1 << 6
    ILLEGAL_REGISTER = 1 << 7


class ApicMode(enum.Enum):
    """IA32_APIC_BASE (EN, EXTD) states; INVALID never becomes current."""

    DISABLED = "disabled"
    XAPIC = "xapic"
    X2APIC = "x2apic"
    INVALID = "invalid"


def _mode_of_base(value: int) -> ApicMode:
    enabled = bool(value & APIC_BASE_EN)
    extd = bool(value & APIC_BASE_EXTD)
    if enabled:
        return ApicMode.X2APIC if extd else ApicMode.XAPIC
    return ApicMode.INVALID if extd else ApicMode.DISABLED


class ApicGpFault(Exception):
    """The guest's access must raise #GP(0); the machine injects it."""


# ---------------------------------------------------------------------------------
# Decoded register values
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Icr:
    """A decoded interrupt command; ``destination`` is 8-bit (xAPIC) or 32-bit (x2APIC)."""

    vector: int
    delivery_mode: DeliveryMode
    logical: bool
    level_assert: bool
    level_triggered: bool
    shorthand: DestShorthand
    destination: int
    x2apic: bool

    @classmethod
    def decode(cls, value: int, *, x2apic: bool) -> Icr:
        """Decode the 64-bit ICR (xAPIC: ICR_HIGH << 32 | ICR_LOW)."""
        if x2apic:
            destination = (value >> ICR_HIGH_SHIFT) & REG32_MASK
        else:
            destination = (value >> XAPIC_ICR_DEST_SHIFT) & XAPIC_ID_MASK
        return cls(
            vector=value & ICR_VECTOR_MASK,
            delivery_mode=DeliveryMode((value >> ICR_DELIVERY_MODE_SHIFT) & ICR_DELIVERY_MODE_MASK),
            logical=bool(value & ICR_DEST_LOGICAL),
            level_assert=bool(value & ICR_LEVEL_ASSERT),
            level_triggered=bool(value & ICR_TRIGGER_LEVEL),
            shorthand=DestShorthand((value >> ICR_SHORTHAND_SHIFT) & ICR_SHORTHAND_MASK),
            destination=destination,
            x2apic=x2apic,
        )

    def encode(self) -> int:
        low = (
            self.vector
            | (self.delivery_mode << ICR_DELIVERY_MODE_SHIFT)
            | (ICR_DEST_LOGICAL if self.logical else 0)
            | (ICR_LEVEL_ASSERT if self.level_assert else 0)
            | (ICR_TRIGGER_LEVEL if self.level_triggered else 0)
            | (self.shorthand << ICR_SHORTHAND_SHIFT)
        )
        if self.x2apic:
            return low | (self.destination << ICR_HIGH_SHIFT)
        return low | (self.destination << XAPIC_ICR_DEST_SHIFT)

    @property
    def broadcast(self) -> bool:
        return self.destination == (X2APIC_BROADCAST if self.x2apic else XAPIC_BROADCAST)


@dataclass(frozen=True)
class Lvt:
    """A decoded LVT entry (fields that an entry lacks decode as 0/False)."""

    vector: int
    delivery_mode: DeliveryMode
    delivery_status: bool
    polarity_low: bool
    remote_irr: bool
    level_triggered: bool
    masked: bool
    timer_mode: TimerMode

    @classmethod
    def decode(cls, value: int) -> Lvt:
        return cls(
            vector=value & LVT_VECTOR_MASK,
            delivery_mode=DeliveryMode((value >> LVT_DELIVERY_MODE_SHIFT) & LVT_DELIVERY_MODE_MASK),
            delivery_status=bool(value & LVT_DELIVERY_STATUS),
            polarity_low=bool(value & LVT_POLARITY_LOW),
            remote_irr=bool(value & LVT_REMOTE_IRR),
            level_triggered=bool(value & LVT_TRIGGER_LEVEL),
            masked=bool(value & LVT_MASKED),
            timer_mode=TimerMode((value >> LVT_TIMER_MODE_SHIFT) & LVT_TIMER_MODE_MASK),
        )


def divisor_of(divide_config: int) -> int:
    """Timer divisor from the divide configuration register (bits 3,1:0)."""
    encoding = ((divide_config & DIVIDE_CONFIG_HIGH_BIT) >> 1) | (divide_config & DIVIDE_CONFIG_LOW_BITS)
    return 1 << ((encoding + 1) % DIVIDE_ENCODING_MOD)


def _highest_bit(bitmap: int) -> int | None:
    return bitmap.bit_length() - 1 if bitmap else None


def _priority_class(vector: int) -> int:
    return vector >> PRIORITY_CLASS_SHIFT


# ---------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------


def _lvt_reset() -> list[int]:
    return [LVT_RESET] * len(LvtIndex)


@dataclass
class ApicRegisters:
    """Architectural register contents (power-on values as defaults)."""

    xapic_id: int = 0  # xAPIC ID (bits 31:24 of the ID register); writable in xAPIC mode
    tpr: int = 0
    ldr: int = 0  # xAPIC logical ID register as read; x2APIC LDR is derived from the ID
    dfr: int = DFR_RESET
    svr: int = SVR_RESET
    isr: int = 0  # 256-bit bitmaps
    tmr: int = 0
    irr: int = 0
    esr: int = 0  # value visible to reads (latched at the last ESR write)
    esr_pending: int = 0  # errors detected since the last ESR write
    icr: int = 0  # 64-bit; xAPIC ICR_HIGH is bits 63:32
    lvt: list[int] = field(default_factory=_lvt_reset)
    timer_initial: int = 0
    timer_divide: int = 0
    tsc_deadline: int = 0


@dataclass
class _TimerState:
    """The running count: a segment that started at ``start_ns`` with ``count`` ticks to go."""

    running: bool = False
    start_ns: int = 0
    count: int = 0
    divisor: int = 2
    last_fire_ns: int = 0
    handle: TimerHandle | None = None
    generation: int = 0


@dataclass
class ApicStats:
    """Counters for things a guest did that hardware silently tolerates."""

    dropped_disabled: int = 0  # fixed interrupts dropped because the APIC was disabled
    illegal_vectors: int = 0
    ignored_mmio_writes: int = 0
    timer_expiries: int = 0


class ApicBus(Protocol):
    """What a LocalApic needs from the machine to send an IPI (see :class:`ApicRouter`)."""

    def deliver_ipi(self, source: LocalApic, icr: Icr) -> None: ...


# ---------------------------------------------------------------------------------
# The local APIC
# ---------------------------------------------------------------------------------


class LocalApic:
    """One local APIC. See the module docstring for threading and documented choices."""

    def __init__(
        self,
        apic_id: int,
        *,
        bsp: bool,
        clock: Clock,
        timers: TimerScheduler,
        bus: ApicBus,
        on_pending: Callable[[], None],
        tsc_hz: int,
        timer_hz: int,
        on_eoi: Callable[[int], None] | None = None,
        on_eoi_broadcast: Callable[[int], None] | None = None,
        cmci: bool = False,
        x2apic_supported: bool = True,
        tsc_deadline_supported: bool = True,
        phys_addr_bits: int = DEFAULT_PHYS_ADDR_BITS,
        min_periodic_ns: int = DEFAULT_MIN_PERIODIC_NS,
    ) -> None:
        if tsc_hz <= 0 or timer_hz <= 0:
            raise ValueError("tsc_hz and timer_hz must be positive")
        self.apic_id = apic_id
        self.bsp = bsp
        self._clock = clock
        self._timers = timers
        self._bus = bus
        self._on_pending = on_pending
        self._on_eoi = on_eoi
        self.on_eoi_broadcast = on_eoi_broadcast  # level-triggered EOI to the I/O APICs (set after creation)
        self.tsc_hz = tsc_hz
        self.timer_hz = timer_hz
        self.cmci = cmci
        self.x2apic_supported = x2apic_supported
        self.tsc_deadline_supported = tsc_deadline_supported
        self.min_periodic_ns = min_periodic_ns
        self._base_reserved = ~(
            (((1 << phys_addr_bits) - 1) & ~((1 << APIC_BASE_ADDR_SHIFT) - 1)) | APIC_BASE_FLAGS_MASK
        )
        if not x2apic_supported:
            self._base_reserved |= APIC_BASE_EXTD
        self._lock = threading.RLock()
        self._notify = False
        self._eoi_notify: list[int] = []
        self._broadcast_notify: list[int] = []
        self.stats = ApicStats()
        self._timer = _TimerState()
        self._base = APIC_DEFAULT_BASE | APIC_BASE_EN | (APIC_BASE_BSP if bsp else 0)
        self._regs = self._power_on_registers()

    # -- state and mode -----------------------------------------------------------

    def _power_on_registers(self) -> ApicRegisters:
        return ApicRegisters(xapic_id=self.apic_id & XAPIC_ID_MASK)

    @property
    def mode(self) -> ApicMode:
        with self._lock:
            return _mode_of_base(self._base)

    @property
    def x2apic(self) -> bool:
        return self.mode is ApicMode.X2APIC

    @property
    def hw_enabled(self) -> bool:
        with self._lock:
            return bool(self._base & APIC_BASE_EN)

    @property
    def sw_enabled(self) -> bool:
        with self._lock:
            return bool(self._regs.svr & SVR_APIC_ENABLE)

    @property
    def mmio_base(self) -> int:
        """Guest-physical base of the xAPIC page (IA32_APIC_BASE[MAXPHYADDR-1:12])."""
        with self._lock:
            return self._base & ~((1 << APIC_BASE_ADDR_SHIFT) - 1)

    @property
    def mmio_decoded(self) -> bool:
        """True when the xAPIC page answers MMIO (xAPIC mode)."""
        return self.mode is ApicMode.XAPIC

    def snapshot(self) -> ApicRegisters:
        """A copy of the registers (for the recorder/replayer)."""
        with self._lock:
            return replace(self._regs, lvt=list(self._regs.lvt))

    def _accepting(self) -> bool:
        return bool(self._base & APIC_BASE_EN) and bool(self._regs.svr & SVR_APIC_ENABLE)

    def reset(self) -> None:
        """INIT: registers to power-on values; APIC ID and IA32_APIC_BASE are kept."""
        with self._lock:
            self._stop_timer()
            self._regs = self._power_on_registers()

    def software_enable(self) -> None:
        """Set SVR to 0x1FF (enabled, spurious vector 0xFF) as a hypervisor may at VTL enablement."""
        with self._lock:
            self._write_svr(SVR_APIC_ENABLE | SVR_RESET)

    def hard_reset(self) -> None:
        """RESET/power-on: like INIT and also IA32_APIC_BASE back to its default."""
        with self._lock:
            self.reset()
            self._base = APIC_DEFAULT_BASE | APIC_BASE_EN | (APIC_BASE_BSP if self.bsp else 0)

    # -- the deferred-callback pattern ------------------------------------------------

    def _flush(self, ipi: Icr | None = None) -> None:
        """Run callbacks collected under the lock, now that it is released."""
        with self._lock:
            notify, self._notify = self._notify, False
            eois, self._eoi_notify = self._eoi_notify, []
            broadcasts, self._broadcast_notify = self._broadcast_notify, []
        if ipi is not None:
            self._bus.deliver_ipi(self, ipi)
        if self._on_eoi is not None:
            for vector in eois:
                self._on_eoi(vector)
        if self.on_eoi_broadcast is not None:
            for vector in broadcasts:
                self.on_eoi_broadcast(vector)
        if notify:
            self._on_pending()

    # -- interrupt acceptance and delivery ----------------------------------------------

    def accept_interrupt(self, vector: int, level_triggered: bool = False) -> bool:
        """A fixed interrupt arrives: set IRR (and TMR for level). Returns False if dropped.

        Calls ``on_pending()`` (after releasing the lock) when IRR gained the vector.
        """
        with self._lock:
            accepted = self._accept_locked(vector, level_triggered)
        self._flush()
        return accepted

    def _accept_locked(self, vector: int, level_triggered: bool) -> bool:
        if not self._accepting():
            self.stats.dropped_disabled += 1
            return False
        if vector < FIRST_LEGAL_VECTOR:
            self.stats.illegal_vectors += 1
            self._signal_error(Esr.RECEIVE_ILLEGAL_VECTOR)
            return False
        bit = 1 << vector
        self._regs.irr |= bit
        if level_triggered:
            self._regs.tmr |= bit
        else:
            self._regs.tmr &= ~bit
        self._notify = True
        return True

    def _signal_error(self, error: Esr) -> None:
        """Log an error in ESR and raise the LVT error interrupt unless masked."""
        self._regs.esr_pending |= error
        lvt = Lvt.decode(self._regs.lvt[LvtIndex.ERROR])
        if lvt.masked or not self._accepting():
            return
        if lvt.vector < FIRST_LEGAL_VECTOR:
            # The error entry itself is illegal: log it, but do not recurse.
            self._regs.esr_pending |= Esr.RECEIVE_ILLEGAL_VECTOR
            return
        self._accept_locked(lvt.vector, level_triggered=False)

    def _ppr(self) -> int:
        isrv = _highest_bit(self._regs.isr) or 0
        tpr = self._regs.tpr
        if _priority_class(tpr) >= _priority_class(isrv):
            return tpr
        return isrv & PRIORITY_CLASS_MASK

    def _apr(self) -> int:
        tpr = self._regs.tpr
        isrv = _highest_bit(self._regs.isr) or 0
        irrv = _highest_bit(self._regs.irr) or 0
        if _priority_class(tpr) >= _priority_class(irrv) and _priority_class(tpr) > _priority_class(isrv):
            return tpr
        return max(tpr & PRIORITY_CLASS_MASK, isrv & PRIORITY_CLASS_MASK, irrv & PRIORITY_CLASS_MASK)

    def _deliverable(self) -> int | None:
        if not self._accepting():
            return None
        irrv = _highest_bit(self._regs.irr)
        if irrv is None or _priority_class(irrv) <= _priority_class(self._ppr()):
            return None
        return irrv

    def pending_vector(self) -> int | None:
        """Highest IRR vector whose priority class beats PPR; None if none or APIC disabled.

        An empty IRR answers without the lock (the run loop asks after every VTL switch):
        a vector accepted right after this read sets its VP's interrupt hint again, so the
        VP looks once more before it enters the guest.
        """
        if not self._regs.irr:
            return None
        with self._lock:
            return self._deliverable()

    def acknowledge(self) -> int:
        """INTA: move the deliverable vector from IRR to ISR and return it.

        With nothing deliverable (a race the run loop should not create) it returns
        the spurious vector from SVR without touching ISR, as hardware does.
        """
        with self._lock:
            vector = self._deliverable()
            if vector is None:
                return self._regs.svr & SVR_VECTOR_MASK
            bit = 1 << vector
            self._regs.irr &= ~bit
            self._regs.isr |= bit
            return vector

    def eoi(self) -> None:
        """End of interrupt: clear the highest ISR bit; a level-triggered vector (TMR set) is broadcast to the I/O APICs."""
        with self._lock:
            self._eoi_locked()
        self._flush()

    def _eoi_locked(self) -> None:
        vector = _highest_bit(self._regs.isr)
        if vector is None:
            return
        bit = 1 << vector
        self._regs.isr &= ~bit
        self._eoi_notify.append(vector)
        if self._regs.tmr & bit:
            self._broadcast_notify.append(vector)

    def is_focus_for(self, vector: int) -> bool:
        """Lowest-priority focus: the vector is already in IRR/ISR and focus checking is on."""
        with self._lock:
            if self._regs.svr & SVR_FOCUS_DISABLE:
                return False
            return bool((self._regs.irr | self._regs.isr) & (1 << vector))

    @property
    def arbitration_priority(self) -> int:
        with self._lock:
            return self._apr()

    @property
    def tpr(self) -> int:
        with self._lock:
            return self._regs.tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        with self._lock:
            self._regs.tpr = value & TPR_MASK

    @property
    def ppr(self) -> int:
        with self._lock:
            return self._ppr()

    @property
    def cr8(self) -> int:
        """CR8 as the guest sees it: TPR[7:4]."""
        with self._lock:
            return _priority_class(self._regs.tpr)

    def set_tpr_from_cr8(self, value: int) -> None:
        """MOV to CR8 writes TPR[7:4] and clears TPR[3:0]."""
        with self._lock:
            self._regs.tpr = (value & CR8_MASK) << PRIORITY_CLASS_SHIFT

    # -- destination matching (used by ApicRouter) ---------------------------------------

    def matches_physical(self, destination: int, x2apic: bool) -> bool:
        with self._lock:
            if x2apic:
                return destination == X2APIC_BROADCAST or destination == self.apic_id
            return destination == XAPIC_BROADCAST or destination == self._regs.xapic_id

    def matches_logical(self, destination: int, x2apic: bool) -> bool:
        """Logical destination match in this APIC's own addressing model."""
        with self._lock:
            if x2apic:
                if destination == X2APIC_BROADCAST:
                    return True
                ldr = self._x2apic_ldr()
                same_cluster = (destination >> X2APIC_CLUSTER_SHIFT) == (ldr >> X2APIC_CLUSTER_SHIFT)
                return same_cluster and bool(destination & ldr & X2APIC_CLUSTER_MEMBER_MASK)
            if destination == XAPIC_BROADCAST:
                return True
            logical_id = self._regs.ldr >> XAPIC_LDR_SHIFT
            model = self._regs.dfr >> DFR_MODEL_SHIFT
            if model == DFR_MODEL_FLAT:
                return bool(destination & logical_id)
            if model == DFR_MODEL_CLUSTER:
                same_cluster = (destination >> XAPIC_CLUSTER_SHIFT) == (logical_id >> XAPIC_CLUSTER_SHIFT)
                return same_cluster and bool(destination & logical_id & XAPIC_CLUSTER_MEMBER_MASK)
            return False  # undefined model: matches nothing

    def _x2apic_ldr(self) -> int:
        cluster = self.apic_id >> X2APIC_ID_CLUSTER_SHIFT
        return (cluster << X2APIC_CLUSTER_SHIFT) | (1 << (self.apic_id & X2APIC_ID_MEMBER_MASK))

    # -- IA32_APIC_BASE and TSC deadline ---------------------------------------------------

    @property
    def base_msr(self) -> int:
        with self._lock:
            return self._base

    @base_msr.setter
    def base_msr(self, value: int) -> None:
        self.set_base_msr(value)

    def set_base_msr(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE; raises ApicGpFault for reserved bits and illegal transitions.

        Legal: disabled->xAPIC, xAPIC->x2APIC, any->disabled (which resets the
        registers). Illegal: EXTD without EN, x2APIC->xAPIC, disabled->x2APIC. The BSP
        bit is read-only (writes to it are ignored).
        """
        with self._lock:
            if value & self._base_reserved:
                raise ApicGpFault(f"IA32_APIC_BASE reserved bits in {value:#x}")
            old = _mode_of_base(self._base)
            new = _mode_of_base(value)
            if new is ApicMode.INVALID:
                raise ApicGpFault("IA32_APIC_BASE: x2APIC enable without global enable")
            if old is ApicMode.X2APIC and new is ApicMode.XAPIC:
                raise ApicGpFault("IA32_APIC_BASE: x2APIC -> xAPIC is illegal")
            if old is ApicMode.DISABLED and new is ApicMode.X2APIC:
                raise ApicGpFault("IA32_APIC_BASE: disabled -> x2APIC is illegal")
            self._base = (value & ~APIC_BASE_BSP) | (self._base & APIC_BASE_BSP)
            if new is ApicMode.DISABLED and old is not ApicMode.DISABLED:
                self.reset()
            if new is ApicMode.X2APIC and old is ApicMode.XAPIC:
                # x2APIC ignores the writable xAPIC LDR/DFR; the LDR is now derived from the ID.
                self._regs.dfr = DFR_RESET

    @property
    def tsc_deadline(self) -> int:
        """RDMSR IA32_TSC_DEADLINE: the armed deadline, 0 when disarmed or not in deadline mode."""
        with self._lock:
            if self._timer_mode() is not TimerMode.TSC_DEADLINE:
                return 0
            return self._regs.tsc_deadline

    @tsc_deadline.setter
    def tsc_deadline(self, value: int) -> None:
        self.set_tsc_deadline(value)

    def set_tsc_deadline(self, value: int) -> None:
        """WRMSR IA32_TSC_DEADLINE: arm (0 disarms); ignored outside TSC-deadline mode."""
        with self._lock:
            if not (self._base & APIC_BASE_EN) or self._timer_mode() is not TimerMode.TSC_DEADLINE:
                return
            self._cancel_timer_handle()
            self._regs.tsc_deadline = value
            if value:
                self._arm_tsc_deadline()
        self._flush()

    # -- xAPIC MMIO -------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at ``offset`` in the 4 KiB APIC page (little endian)."""
        with self._lock:
            if not self.mmio_decoded:
                return (1 << (size * 8)) - 1
            data = bytearray()
            position = offset
            while len(data) < size:
                slot = position & ~(APIC_REG_STRIDE - 1)
                value = self._mmio_slot_value(slot) if 0 <= slot < APIC_MMIO_SIZE else 0
                slot_bytes = value.to_bytes(APIC_REG_BYTES, "little") + bytes(APIC_REG_STRIDE - APIC_REG_BYTES)
                start = position - slot
                take = min(size - len(data), APIC_REG_STRIDE - start)
                data += slot_bytes[start : start + take]
                position += take
        self._flush()  # a reserved-register read may have raised the error interrupt
        return int.from_bytes(data, "little")

    def _mmio_slot_value(self, slot: int) -> int:
        reg = self._reg_at(slot, x2apic=False)
        if reg is None:
            self._signal_error(Esr.ILLEGAL_REGISTER)
            return 0
        return self._read_reg(reg, slot, x2apic=False)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write at ``offset`` in the APIC page; only aligned 32-bit register writes take effect."""
        ipi: Icr | None = None
        with self._lock:
            if not self.mmio_decoded:
                self.stats.ignored_mmio_writes += 1
                return
            if size != APIC_REG_BYTES or offset % APIC_REG_STRIDE or not 0 <= offset < APIC_MMIO_SIZE:
                self.stats.ignored_mmio_writes += 1
                return
            reg = self._reg_at(offset, x2apic=False)
            if reg is None:
                self._signal_error(Esr.ILLEGAL_REGISTER)
            elif self._writable(reg, x2apic=False):
                ipi = self._write_reg(reg, value & REG32_MASK, x2apic=False)
        self._flush(ipi)

    # -- x2APIC MSRs -------------------------------------------------------------------------

    @staticmethod
    def is_x2apic_msr(msr: int) -> bool:
        return MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST

    def msr_read(self, msr: int) -> int:
        """RDMSR of an x2APIC register (0x800-0x8FF)."""
        with self._lock:
            reg, offset = self._x2apic_reg(msr)
            if reg in (Reg.EOI, Reg.SELF_IPI):
                raise ApicGpFault(f"RDMSR {msr:#x}: write-only x2APIC register")
            return self._read_reg(reg, offset, x2apic=True)

    def msr_write(self, msr: int, value: int) -> None:
        """WRMSR of an x2APIC register (0x800-0x8FF)."""
        with self._lock:
            reg, _ = self._x2apic_reg(msr)
            if not self._writable(reg, x2apic=True):
                raise ApicGpFault(f"WRMSR {msr:#x}: read-only x2APIC register")
            if reg is Reg.ICR_LOW:
                if value & X2APIC_ICR_RESERVED:
                    raise ApicGpFault(f"WRMSR ICR: reserved bits in {value:#x}")
            elif value >> ICR_HIGH_SHIFT:
                raise ApicGpFault(f"WRMSR {msr:#x}: bits 63:32 set in {value:#x}")
            if reg in (Reg.EOI, Reg.ESR) and value:
                raise ApicGpFault(f"WRMSR {msr:#x}: non-zero write")
            if reg is Reg.SELF_IPI and value & ~SELF_IPI_VECTOR_MASK:
                raise ApicGpFault(f"WRMSR SELF_IPI: reserved bits in {value:#x}")
            ipi = self._write_reg(reg, value, x2apic=True)
        self._flush(ipi)

    def _x2apic_reg(self, msr: int) -> tuple[Reg, int]:
        if not self.is_x2apic_msr(msr):
            raise ApicGpFault(f"MSR {msr:#x} is not an x2APIC register")
        if _mode_of_base(self._base) is not ApicMode.X2APIC:
            raise ApicGpFault(f"MSR {msr:#x}: x2APIC mode is not enabled")
        offset = (msr - MSR_X2APIC_FIRST) << APIC_REG_SHIFT
        reg = self._reg_at(offset, x2apic=True)
        if reg is None:
            raise ApicGpFault(f"MSR {msr:#x}: reserved x2APIC register")
        return reg, offset

    # -- Hyper-V style access to ICR (HV_X64_MSR_ICR) ----------------------------------------

    def read_icr(self) -> int:
        """The 64-bit ICR in the current mode's layout (delivery status always idle)."""
        with self._lock:
            return self._regs.icr

    def write_icr(self, value: int) -> None:
        """Write the full 64-bit ICR and send, in the current mode's layout (HV_X64_MSR_ICR)."""
        with self._lock:
            x2apic = _mode_of_base(self._base) is ApicMode.X2APIC
            self._regs.icr = value & ~ICR_DELIVERY_STATUS
            ipi = self._prepare_ipi(Icr.decode(value, x2apic=x2apic))
        self._flush(ipi)

    # -- register decoding -------------------------------------------------------------------

    def _reg_at(self, offset: int, *, x2apic: bool) -> Reg | None:
        """The register at a 16-byte aligned offset (bitmap registers map to their base)."""
        for base in (Reg.ISR0, Reg.TMR0, Reg.IRR0):
            if base <= offset < base + BITMAP_SPAN:
                return base
        try:
            reg = Reg(offset)
        except ValueError:
            return None
        if reg is Reg.LVT_CMCI and not self.cmci:
            return None
        if x2apic and reg in (Reg.APR, Reg.RRD, Reg.DFR, Reg.ICR_HIGH):
            return None
        if not x2apic and reg is Reg.SELF_IPI:
            return None
        return reg

    _READ_ONLY = frozenset({Reg.VERSION, Reg.APR, Reg.PPR, Reg.RRD, Reg.ISR0, Reg.TMR0, Reg.IRR0, Reg.TIMER_CURRENT})

    def _writable(self, reg: Reg, *, x2apic: bool) -> bool:
        if reg in self._READ_ONLY:
            return False
        return not (x2apic and reg in (Reg.ID, Reg.LDR))

    def _read_reg(self, reg: Reg, offset: int, *, x2apic: bool) -> int:
        regs = self._regs
        if reg in (Reg.ISR0, Reg.TMR0, Reg.IRR0):
            bitmap = {Reg.ISR0: regs.isr, Reg.TMR0: regs.tmr, Reg.IRR0: regs.irr}[reg]
            index = (offset - reg) // APIC_REG_STRIDE
            return (bitmap >> (index * VECTORS_PER_REG)) & REG32_MASK
        if reg in LVT_REGS:
            return regs.lvt[LVT_REGS[reg]]
        match reg:
            case Reg.ID:
                return self.apic_id if x2apic else regs.xapic_id << XAPIC_ID_SHIFT
            case Reg.VERSION:
                max_lvt = MAX_LVT_WITH_CMCI if self.cmci else MAX_LVT_WITHOUT_CMCI
                return APIC_VERSION | (max_lvt << APIC_VERSION_MAX_LVT_SHIFT)
            case Reg.TPR:
                return regs.tpr
            case Reg.APR:
                return self._apr()
            case Reg.PPR:
                return self._ppr()
            case Reg.LDR:
                return self._x2apic_ldr() if x2apic else regs.ldr
            case Reg.DFR:
                return regs.dfr
            case Reg.SVR:
                return regs.svr
            case Reg.ESR:
                return regs.esr
            case Reg.ICR_LOW:
                return regs.icr if x2apic else regs.icr & REG32_MASK
            case Reg.ICR_HIGH:
                return regs.icr >> ICR_HIGH_SHIFT
            case Reg.TIMER_INITIAL:
                return regs.timer_initial
            case Reg.TIMER_CURRENT:
                return self._current_count()
            case Reg.TIMER_DIVIDE:
                return regs.timer_divide
        return 0  # RRD (remote read is not supported), EOI/SELF_IPI in xAPIC reads

    def _write_reg(self, reg: Reg, value: int, *, x2apic: bool) -> Icr | None:
        """Apply a write; returns an IPI to send once the lock is released."""
        regs = self._regs
        if reg in LVT_REGS:
            self._write_lvt(LVT_REGS[reg], value)
            return None
        match reg:
            case Reg.ID:
                regs.xapic_id = (value >> XAPIC_ID_SHIFT) & XAPIC_ID_MASK
            case Reg.TPR:
                regs.tpr = value & TPR_MASK
            case Reg.EOI:
                self._eoi_locked()
            case Reg.LDR:
                regs.ldr = value & XAPIC_LDR_MASK
            case Reg.DFR:
                regs.dfr = (value & DFR_MODEL_MASK) | (DFR_RESET & ~DFR_MODEL_MASK)
            case Reg.SVR:
                self._write_svr(value)
            case Reg.ESR:
                regs.esr, regs.esr_pending = regs.esr_pending, 0
            case Reg.ICR_LOW:
                if x2apic:
                    regs.icr = value & ~ICR_DELIVERY_STATUS
                else:
                    regs.icr = (regs.icr & ~REG32_MASK) | (value & ICR_LOW_WRITABLE)
                return self._prepare_ipi(Icr.decode(regs.icr, x2apic=x2apic))
            case Reg.ICR_HIGH:
                regs.icr = (regs.icr & REG32_MASK) | ((value & (XAPIC_ID_MASK << XAPIC_ID_SHIFT)) << ICR_HIGH_SHIFT)
            case Reg.TIMER_INITIAL:
                self._write_initial_count(value)
            case Reg.TIMER_DIVIDE:
                self._write_divide(value)
            case Reg.SELF_IPI:
                return self._prepare_ipi(
                    Icr(
                        vector=value & SELF_IPI_VECTOR_MASK,
                        delivery_mode=DeliveryMode.FIXED,
                        logical=False,
                        level_assert=True,
                        level_triggered=False,
                        shorthand=DestShorthand.SELF,
                        destination=self.apic_id,
                        x2apic=True,
                    )
                )
        return None

    def _write_svr(self, value: int) -> None:
        self._regs.svr = value & SVR_WRITABLE
        if not value & SVR_APIC_ENABLE:
            # Software disable masks every LVT entry (SDM 11.4.7.2).
            self._regs.lvt = [entry | LVT_MASKED for entry in self._regs.lvt]

    def _write_lvt(self, index: LvtIndex, value: int) -> None:
        writable = LVT_WRITABLE[index]
        if index is LvtIndex.TIMER and not self.tsc_deadline_supported:
            writable = LVT_WRITABLE_TIMER_NO_DEADLINE
        value &= writable
        if not self._regs.svr & SVR_APIC_ENABLE:
            value |= LVT_MASKED
        if index is LvtIndex.TIMER:
            old_mode = self._timer_mode()
            remaining = self._current_count()
            self._regs.lvt[index] = value
            new_mode = self._timer_mode()
            if (old_mode is TimerMode.TSC_DEADLINE) != (new_mode is TimerMode.TSC_DEADLINE):
                # Switching to or from TSC-deadline mode disarms the timer (SDM 11.5.4.1).
                self._stop_timer()
                self._regs.timer_initial = 0
                self._regs.tsc_deadline = 0
            elif old_mode is not new_mode and self._timer.running:
                # One-shot <-> periodic does not restart the count: the current count runs
                # down from where it is and the new mode decides what happens at zero.
                self._stop_timer()
                if remaining:
                    self._start_segment(self._clock.now_ns(), remaining)
            return
        self._regs.lvt[index] = value

    # -- IPIs -------------------------------------------------------------------------------

    def _prepare_ipi(self, icr: Icr) -> Icr | None:
        """Sender-side checks; returns the command for the bus or None."""
        if icr.delivery_mode in (DeliveryMode.FIXED, DeliveryMode.LOWEST_PRIORITY) and icr.vector < FIRST_LEGAL_VECTOR:
            self.stats.illegal_vectors += 1
            self._signal_error(Esr.SEND_ILLEGAL_VECTOR)
            return None
        return icr

    # -- timer ------------------------------------------------------------------------------

    def _timer_mode(self) -> TimerMode:
        return Lvt.decode(self._regs.lvt[LvtIndex.TIMER]).timer_mode

    def _cancel_timer_handle(self) -> None:
        self._timer.generation += 1
        if self._timer.handle is not None:
            self._timers.cancel(self._timer.handle)
            self._timer.handle = None

    def _stop_timer(self) -> None:
        self._cancel_timer_handle()
        self._timer.running = False

    def _ticks_to_ns(self, ticks: int, divisor: int) -> int:
        """Nanoseconds for ``ticks`` counts, rounded up so an expiry is never early."""
        return -(-ticks * divisor * NS_PER_SEC // self.timer_hz)

    def _elapsed_ticks(self, now: int) -> int:
        return (now - self._timer.start_ns) * self.timer_hz // (self._timer.divisor * NS_PER_SEC)

    def _current_count(self) -> int:
        timer = self._timer
        mode = self._timer_mode()
        if not timer.running or mode not in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            return 0
        ticks = self._elapsed_ticks(self._clock.now_ns())
        if ticks < timer.count:
            return timer.count - ticks
        if mode is TimerMode.PERIODIC and self._regs.timer_initial:
            return self._regs.timer_initial - (ticks - timer.count) % self._regs.timer_initial
        return 0

    def _write_initial_count(self, value: int) -> None:
        if self._timer_mode() is TimerMode.TSC_DEADLINE:
            return  # ignored in TSC-deadline mode
        self._regs.timer_initial = value
        self._stop_timer()
        if value == 0:
            return  # a zero initial count stops the timer
        self._start_segment(self._clock.now_ns(), value)

    def _write_divide(self, value: int) -> None:
        self._regs.timer_divide = value & DIVIDE_CONFIG_WRITABLE
        if self._timer.running and self._timer_mode() in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            # Keep the count where it is and continue at the new rate.
            now = self._clock.now_ns()
            remaining = self._current_count()
            self._cancel_timer_handle()
            if remaining:
                self._start_segment(now, remaining)
            else:
                self._timer.running = False
        else:
            self._timer.divisor = divisor_of(self._regs.timer_divide)

    def _start_segment(self, now: int, count: int) -> None:
        timer = self._timer
        timer.running = True
        timer.start_ns = now
        timer.count = count
        timer.divisor = divisor_of(self._regs.timer_divide)
        timer.last_fire_ns = now
        self._arm_count_timer()

    def _next_count_deadline(self, now: int) -> int | None:
        """The first expiry strictly after ``now`` on the exact grid of the running count."""
        timer = self._timer
        mode = self._timer_mode()
        ticks = self._elapsed_ticks(now)
        if ticks < timer.count:
            expiry_tick = timer.count
        elif mode is TimerMode.PERIODIC and self._regs.timer_initial:
            initial = self._regs.timer_initial
            expiry_tick = timer.count + ((ticks - timer.count) // initial + 1) * initial
        else:
            return None
        return timer.start_ns + self._ticks_to_ns(expiry_tick, timer.divisor)

    def _arm_count_timer(self) -> None:
        self._cancel_timer_handle()
        mode = self._timer_mode()
        if mode not in (TimerMode.ONE_SHOT, TimerMode.PERIODIC):
            self._timer.running = False
            return
        deadline = self._next_count_deadline(self._clock.now_ns())
        if deadline is None:
            self._timer.running = False
            return
        if mode is TimerMode.PERIODIC:
            deadline = max(deadline, self._timer.last_fire_ns + self.min_periodic_ns)
        self._arm_handle(deadline)

    def _arm_handle(self, deadline_ns: int) -> None:
        generation = self._timer.generation
        self._timer.handle = self._timers.arm(deadline_ns, lambda: self._timer_expired(generation))

    def _arm_tsc_deadline(self) -> None:
        delta_tsc = self._regs.tsc_deadline - self._clock.tsc()
        if delta_tsc <= 0:
            self._tsc_deadline_fire()
            return
        delta_ns = -(-delta_tsc * NS_PER_SEC // self.tsc_hz)
        self._arm_handle(self._clock.now_ns() + delta_ns)

    def _tsc_deadline_fire(self) -> None:
        self._regs.tsc_deadline = 0
        self._deliver_timer_interrupt()

    def _deliver_timer_interrupt(self) -> None:
        self.stats.timer_expiries += 1
        lvt = Lvt.decode(self._regs.lvt[LvtIndex.TIMER])
        if not lvt.masked:
            self._accept_locked(lvt.vector, level_triggered=False)

    def _timer_expired(self, generation: int) -> None:
        """TimerScheduler callback (timer thread, or advance_to's caller)."""
        with self._lock:
            if generation != self._timer.generation:
                return  # cancelled or re-armed after this expiry was dispatched
            self._timer.handle = None
            mode = self._timer_mode()
            if mode is TimerMode.TSC_DEADLINE:
                self._tsc_deadline_fire()
            elif self._timer.running:
                now = self._clock.now_ns()
                self._deliver_timer_interrupt()
                if mode is TimerMode.PERIODIC:
                    self._timer.last_fire_ns = now
                    self._arm_count_timer()
                else:
                    self._timer.running = False
        self._flush()

    def timer_deadline_ns(self) -> int | None:
        """The armed expiry (clock ns), or None: for tests and the deterministic machine."""
        with self._lock:
            return self._timer.handle.deadline_ns if self._timer.handle is not None else None


# ---------------------------------------------------------------------------------
# The bus
# ---------------------------------------------------------------------------------


class ApicRouter:
    """Routes IPIs among the APICs of one VTL; implements :class:`ApicBus`.

    Create it first, pass it as ``bus`` to each LocalApic, then :meth:`add` them.
    Callbacks run in the sending VP's thread, without any APIC lock held:
    ``on_init(apic_id)`` after the target's registers were reset (when
    ``reset_on_init``), ``on_sipi(apic_id, vector)`` (vector = start page number),
    ``on_nmi(apic_id)``.
    """

    def __init__(
        self,
        *,
        on_init: Callable[[int], None],
        on_sipi: Callable[[int, int], None],
        on_nmi: Callable[[int], None],
        apics: list[LocalApic] | None = None,
        reset_on_init: bool = True,
    ) -> None:
        self.apics: list[LocalApic] = list(apics or [])
        self._on_init = on_init
        self._on_sipi = on_sipi
        self._on_nmi = on_nmi
        self.reset_on_init = reset_on_init
        self.smi_ignored = 0  # SMIs are not emulated: counted and logged, never delivered
        self.ignored = 0  # other commands with no effect (reserved modes, INIT de-assert, ...)

    def add(self, apic: LocalApic) -> None:
        self.apics.append(apic)

    def apic_by_id(self, apic_id: int) -> LocalApic | None:
        for apic in self.apics:
            if apic.apic_id == apic_id:
                return apic
        return None

    def destinations(self, source: LocalApic, icr: Icr) -> list[LocalApic]:
        """The APICs an ICR addresses (before lowest-priority arbitration)."""
        match icr.shorthand:
            case DestShorthand.SELF:
                return [source]
            case DestShorthand.ALL_INCLUDING_SELF:
                targets = list(self.apics)
            case DestShorthand.ALL_EXCLUDING_SELF:
                targets = [apic for apic in self.apics if apic is not source]
            case _:
                if icr.logical:
                    targets = [apic for apic in self.apics if apic.matches_logical(icr.destination, icr.x2apic)]
                else:
                    targets = [apic for apic in self.apics if apic.matches_physical(icr.destination, icr.x2apic)]
        return [apic for apic in targets if apic.hw_enabled]

    def deliver_ipi(self, source: LocalApic, icr: Icr) -> None:
        mode = icr.delivery_mode
        if icr.shorthand is DestShorthand.SELF and mode is not DeliveryMode.FIXED:
            self.ignored += 1  # SDM: the self shorthand is only valid with fixed delivery
            return
        targets = self.destinations(source, icr)
        match mode:
            case DeliveryMode.FIXED:
                for apic in targets:
                    apic.accept_interrupt(icr.vector, icr.level_triggered)
            case DeliveryMode.LOWEST_PRIORITY:
                chosen = self.lowest_priority(targets, icr.vector)
                if chosen is not None:
                    chosen.accept_interrupt(icr.vector, icr.level_triggered)
            case DeliveryMode.SMI:
                self.smi_ignored += 1
                log.warning("SMI IPI from APIC %d ignored (SMM is not emulated)", source.apic_id)
            case DeliveryMode.NMI:
                for apic in targets:
                    self._on_nmi(apic.apic_id)
            case DeliveryMode.INIT:
                if icr.level_triggered and not icr.level_assert:
                    self.ignored += 1  # INIT level de-assert: no effect on modern processors
                    return
                for apic in targets:
                    if self.reset_on_init:
                        apic.reset()
                    self._on_init(apic.apic_id)
            case DeliveryMode.STARTUP:
                for apic in targets:
                    self._on_sipi(apic.apic_id, icr.vector)
            case _:
                self.ignored += 1

    def deliver_message(
        self, destination: int, *, logical: bool, mode: DeliveryMode, vector: int, level_triggered: bool
    ) -> None:
        """An interrupt message from an I/O APIC: an 8-bit xAPIC-format destination, no shorthand.

        Physical 0xFF is a broadcast; an APIC in x2APIC mode matches its own ID (the I/O
        APIC reaches x2APIC IDs below 255 only, as without interrupt remapping).
        """
        targets = []
        for apic in self.apics:
            if not apic.hw_enabled:
                continue
            x2 = apic.x2apic
            if logical:
                hit = apic.matches_logical(destination, x2)
            else:
                hit = destination == XAPIC_BROADCAST or (apic.apic_id == destination if x2 else apic.matches_physical(destination, False))
            if hit:
                targets.append(apic)
        match mode:
            case DeliveryMode.FIXED:
                for apic in targets:
                    apic.accept_interrupt(vector, level_triggered)
            case DeliveryMode.LOWEST_PRIORITY:
                chosen = self.lowest_priority(targets, vector)
                if chosen is not None:
                    chosen.accept_interrupt(vector, level_triggered)
            case DeliveryMode.NMI:
                for apic in targets:
                    self._on_nmi(apic.apic_id)
            case DeliveryMode.INIT:
                for apic in targets:
                    if self.reset_on_init:
                        apic.reset()
                    self._on_init(apic.apic_id)
            case _:
                self.ignored += 1  # SMI, ExtINT (no 8259 behind it), reserved modes

    def send_fixed(self, apic_ids: list[int], vector: int) -> None:
        """Fixed edge interrupt to APICs by ID (Hyper-V PV IPI hypercalls)."""
        for apic_id in apic_ids:
            apic = self.apic_by_id(apic_id)
            if apic is not None and apic.hw_enabled:
                apic.accept_interrupt(vector)

    @staticmethod
    def lowest_priority(targets: list[LocalApic], vector: int) -> LocalApic | None:
        """Focus processor if any, else lowest APR; ties to the lowest APIC ID."""
        candidates = [apic for apic in targets if apic.sw_enabled]
        if not candidates:
            return None
        for apic in sorted(candidates, key=lambda a: a.apic_id):
            if apic.is_focus_for(vector):
                return apic
        return min(candidates, key=lambda a: (a.arbitration_priority, a.apic_id))
