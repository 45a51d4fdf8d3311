"""The synthetic interrupt controller of one (VP, VTL): SIM/SIEF pages, SINTs, message queues.

Pages: SIMP and SIEFP name guest-RAM pages (as in KVM and the seed PoC, not hypervisor
overlays); the SynIC reads and writes them only through ``PartitionAccess.read_gpa`` /
``write_gpa`` acting for its own VTL, and clears a page when it is enabled (KVM does the
same, standing in for "the page is cleared on VP creation/reset").

Messages: each SINT has a FIFO. The head is copied into its 256-byte SIM slot when the slot
is empty (MessageType == 0); the payload is written before the type so a guest polling the
type never sees a half-written message. If the slot is busy, the message stays queued and
MessagePending is set in the occupant's header, so the guest writes EOM after emptying
the slot. EOM, an APIC EOI (``on_eoi``), a new post, or re-enabling the page rescans the
queues. MessagePending is also set on a delivered message when more are queued behind it.

Interrupts: delivery and first-set event flags assert the SINT's vector through
``PartitionAccess.assert_interrupt`` unless the SINT is masked (interrupt lost, message
stays) or in polling mode (no interrupt).

Auto-EOI approximation: this SynIC cannot see the APIC accept an interrupt, so it cannot
EOI on delivery itself. Instead the machine's APIC asks :meth:`Synic.is_auto_eoi` when it
accepts a vector; if it is an unmasked auto-EOI SINT vector the APIC does not set the ISR
bit (equivalent to an immediate EOI) and calls the SynIC's ``on_eoi`` rescan.

Event flags: setting a flag is a read-modify-write of one byte of the SIEF page. It is not
atomic against a guest on another VP clearing a neighbouring bit with LOCK AND (gap: the
VP interface has no atomic guest-memory operation).
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from vsmtrace.vmm.events import EventKind, EventSink
from vsmtrace.vmm.hyperv.errors import GpFault
from vsmtrace.vmm.hyperv.hvdef import (
    HV_EVENT_FLAGS_BYTE_COUNT,
    HV_EVENT_FLAGS_COUNT,
    HV_MESSAGE_FLAGS_OFFSET,
    HV_MESSAGE_SIZE,
    HV_MESSAGE_TYPE_SIZE,
    HV_PAGE_MASK,
    HV_PAGE_SIZE,
    HV_SYNIC_SINT_COUNT,
    HV_SYNIC_VERSION,
    HvMessage,
    HvMessageFlags,
    HvMsr,
    HvOverlayMsr,
    HvScontrol,
    HvSint,
    HvStatus,
)
from vsmtrace.vmm.vp import GuestMemoryError, PartitionAccess, VtlAccessDenied


@dataclass
class QueuedMessage:
    """A message waiting for its SIM slot; ``source`` identifies the buffer it occupies."""

    message: bytes
    source: Hashable | None = None
    on_delivered: Callable[[], None] | None = None


@dataclass
class Synic:
    """SynIC state and behaviour for one VP at one VTL."""

    partition: PartitionAccess
    vp: int
    vtl: int
    sink: EventSink
    scontrol: int = 0
    simp: int = 0
    siefp: int = 0
    sints: list[int] = field(default_factory=lambda: [HvSint.RESET_VALUE] * HV_SYNIC_SINT_COUNT)
    queues: list[deque[QueuedMessage]] = field(default_factory=lambda: [deque() for _ in range(HV_SYNIC_SINT_COUNT)])

    # -- state helpers -----------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.scontrol & HvScontrol.ENABLE)

    @property
    def simp_enabled(self) -> bool:
        return bool(self.simp & HvOverlayMsr.ENABLE)

    @property
    def siefp_enabled(self) -> bool:
        return bool(self.siefp & HvOverlayMsr.ENABLE)

    @property
    def simp_gpa(self) -> int:
        return self.simp & HV_PAGE_MASK

    @property
    def siefp_gpa(self) -> int:
        return self.siefp & HV_PAGE_MASK

    def sint_vector(self, sint: int) -> int:
        return self.sints[sint] & HvSint.VECTOR_MASK

    def sint_masked(self, sint: int) -> bool:
        return bool(self.sints[sint] & HvSint.MASKED)

    def is_auto_eoi(self, vector: int) -> bool:
        """True if ``vector`` belongs to an unmasked auto-EOI SINT (the APIC skips the ISR)."""
        return any(
            (s & HvSint.VECTOR_MASK) == vector and s & HvSint.AUTO_EOI and not s & HvSint.MASKED for s in self.sints
        )

    # -- MSR interface -----------------------------------------------------------------------

    def read_msr(self, msr: int) -> int:
        if msr == HvMsr.HV_X64_MSR_SCONTROL:
            return self.scontrol
        if msr == HvMsr.HV_X64_MSR_SVERSION:
            return HV_SYNIC_VERSION
        if msr == HvMsr.HV_X64_MSR_SIEFP:
            return self.siefp
        if msr == HvMsr.HV_X64_MSR_SIMP:
            return self.simp
        if msr == HvMsr.HV_X64_MSR_EOM:
            return 0
        if HvMsr.HV_X64_MSR_SINT0 <= msr <= HvMsr.HV_X64_MSR_SINT15:
            return self.sints[msr - HvMsr.HV_X64_MSR_SINT0]
        raise GpFault(msr, "not a SynIC MSR")

    def write_msr(self, msr: int, value: int) -> None:
        if msr == HvMsr.HV_X64_MSR_SCONTROL:
            self.scontrol = value
            self.scan()
        elif msr == HvMsr.HV_X64_MSR_SVERSION:
            raise GpFault(msr, "SVERSION is read-only")
        elif msr == HvMsr.HV_X64_MSR_SIEFP:
            old, self.siefp = self.siefp, value
            if self.siefp_enabled and (not old & HvOverlayMsr.ENABLE or (old & HV_PAGE_MASK) != self.siefp_gpa):
                self._clear_page(self.siefp_gpa)
        elif msr == HvMsr.HV_X64_MSR_SIMP:
            old, self.simp = self.simp, value
            if self.simp_enabled and (not old & HvOverlayMsr.ENABLE or (old & HV_PAGE_MASK) != self.simp_gpa):
                self._clear_page(self.simp_gpa)
            self.scan()
        elif msr == HvMsr.HV_X64_MSR_EOM:
            self.scan()
        elif HvMsr.HV_X64_MSR_SINT0 <= msr <= HvMsr.HV_X64_MSR_SINT15:
            vector = value & HvSint.VECTOR_MASK
            if vector < HvSint.FIRST_VALID_VECTOR and not value & HvSint.MASKED:
                raise GpFault(msr, f"SINT vector {vector} < {HvSint.FIRST_VALID_VECTOR}")
            self.sints[msr - HvMsr.HV_X64_MSR_SINT0] = value
            self.scan()
        else:
            raise GpFault(msr, "not a SynIC MSR")

    def _clear_page(self, gpa: int) -> None:
        try:
            self.partition.write_gpa(self.vtl, gpa, bytes(HV_PAGE_SIZE))
        except (GuestMemoryError, VtlAccessDenied):
            pass  # TLFS: a page outside the GPA space is simply not accessible

    # -- messages ----------------------------------------------------------------------------

    def post(
        self,
        sint: int,
        message: HvMessage,
        *,
        guest: bool = False,
        source: Hashable | None = None,
        limit: int | None = None,
        on_delivered: Callable[[], None] | None = None,
    ) -> HvStatus:
        """Queue ``message`` for ``sint`` and try to deliver it.

        ``guest`` messages (HvCallPostMessage) need an enabled SynIC and SIM page
        (INVALID_SYNIC_STATE otherwise) and are limited to ``limit`` queued buffers per
        ``source`` (INSUFFICIENT_BUFFERS). Hypervisor messages (timers, intercepts) always
        queue and wait for the page.
        """
        if guest and not (self.enabled and self.simp_enabled):
            return HvStatus.HV_STATUS_INVALID_SYNIC_STATE
        queue = self.queues[sint]
        if limit is not None and sum(1 for q in queue if q.source == source) >= limit:
            return HvStatus.HV_STATUS_INSUFFICIENT_BUFFERS
        queue.append(QueuedMessage(message.pack(), source, on_delivered))
        self._deliver(sint)
        return HvStatus.HV_STATUS_SUCCESS

    def has_queued(self, source: Hashable) -> bool:
        return any(q.source == source for queue in self.queues for q in queue)

    def scan(self) -> None:
        """Try to move queued messages into empty slots (EOM, EOI, page/SINT changes)."""
        for sint in range(HV_SYNIC_SINT_COUNT):
            if self.queues[sint]:
                self._deliver(sint)

    def on_eoi(self) -> None:
        """The guest EOIed an interrupt at this VTL's APIC: the TLFS rescans queues."""
        self.scan()

    def _deliver(self, sint: int) -> None:
        queue = self.queues[sint]
        if not queue or not (self.enabled and self.simp_enabled):
            return
        slot = self.simp_gpa + sint * HV_MESSAGE_SIZE
        try:
            (slot_type,) = struct.unpack("<I", self.partition.read_gpa(self.vtl, slot, HV_MESSAGE_TYPE_SIZE))
            if slot_type != 0:
                flags = self.partition.read_gpa(self.vtl, slot + HV_MESSAGE_FLAGS_OFFSET, 1)[0]
                if not flags & HvMessageFlags.MESSAGE_PENDING:
                    self.partition.write_gpa(
                        self.vtl, slot + HV_MESSAGE_FLAGS_OFFSET, bytes((flags | HvMessageFlags.MESSAGE_PENDING,))
                    )
                return
            item = queue[0]
            data = bytearray(item.message)
            if len(queue) > 1:
                data[HV_MESSAGE_FLAGS_OFFSET] |= HvMessageFlags.MESSAGE_PENDING
            # Payload and header tail first, message type last: the type marks the slot full.
            self.partition.write_gpa(self.vtl, slot + HV_MESSAGE_TYPE_SIZE, bytes(data[HV_MESSAGE_TYPE_SIZE:]))
            self.partition.write_gpa(self.vtl, slot, bytes(data[:HV_MESSAGE_TYPE_SIZE]))
        except (GuestMemoryError, VtlAccessDenied):
            return  # page unreachable: keep the message queued
        queue.popleft()
        if item.on_delivered is not None:
            item.on_delivered()
        if self.sink.enabled:
            (message_type,) = struct.unpack_from("<I", data)
            self.sink.emit(
                EventKind.SYNIC_MESSAGE, self.vp, self.vtl, 0, sint=sint, message_type=message_type, message=bytes(data)
            )
        self._assert(sint)

    def assert_sint(self, sint: int) -> bool:
        """Raise the SINT's interrupt without a message (a SINT route, e.g. the test device)."""
        return self._assert(sint)

    def _assert(self, sint: int) -> bool:
        """Raise the SINT's interrupt; False if masked or polling (no interrupt generated)."""
        value = self.sints[sint]
        if value & (HvSint.MASKED | HvSint.POLLING):
            return False
        self.partition.assert_interrupt(self.vp, self.vtl, value & HvSint.VECTOR_MASK)
        return True

    # -- event flags -------------------------------------------------------------------------

    def signal_event(self, sint: int, flag: int) -> HvStatus:
        """Set event flag ``flag`` of ``sint``; interrupt only if it was clear."""
        if flag >= HV_EVENT_FLAGS_COUNT:
            return HvStatus.HV_STATUS_INVALID_PARAMETER
        if not (self.enabled and self.siefp_enabled) or self.sint_masked(sint):
            return HvStatus.HV_STATUS_INVALID_SYNIC_STATE
        gpa = self.siefp_gpa + sint * HV_EVENT_FLAGS_BYTE_COUNT + flag // 8
        bit = 1 << (flag % 8)
        try:
            byte = self.partition.read_gpa(self.vtl, gpa, 1)[0]
            if byte & bit:
                return HvStatus.HV_STATUS_SUCCESS
            self.partition.write_gpa(self.vtl, gpa, bytes((byte | bit,)))
        except (GuestMemoryError, VtlAccessDenied):
            return HvStatus.HV_STATUS_INVALID_SYNIC_STATE
        self._assert(sint)
        return HvStatus.HV_STATUS_SUCCESS

