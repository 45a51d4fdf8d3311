"""Connection IDs the guest may post messages / signal events to.

There is no second partition here, so "ports" are endpoints the VMM (or a test) registers:
a connection ID maps to a message target (VP, VTL, SINT) or an event target (VP, VTL, SINT,
flag range). A *loopback* target has no fixed VP/VTL: it delivers to the SynIC of whoever
made the call, so a test guest can exercise HvCallPostMessage / HvCallSignalEvent end to end
on itself. The port ID reported in a message header's OriginationId is the connection ID.
"""

from __future__ import annotations

from dataclasses import dataclass

from vsmtrace.vmm.hyperv.hvdef import HV_EVENT_FLAGS_COUNT

#: Connection IDs the VMM registers by default (vsmtrace's own): post/signal back to the caller's own SynIC.
VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID = 0x00F0_0001
VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID = 0x00F0_0002
VSMTRACE_LOOPBACK_SINT = 2


@dataclass(frozen=True)
class MessagePort:
    """Messages go to ``sint`` of (``vp``, ``vtl``); ``None`` means "the caller's".

    ``buffers``: messages the port may have waiting for the slot (None: the TLFS's 16);
    ``origination_id``: the header's OriginationId (None: the connection ID).
    """

    sint: int
    vp: int | None = None
    vtl: int | None = None
    buffers: int | None = None
    origination_id: int | None = None

    def target(self, caller_vp: int, caller_vtl: int) -> tuple[int, int]:
        return (caller_vp if self.vp is None else self.vp, caller_vtl if self.vtl is None else self.vtl)


@dataclass(frozen=True)
class EventPort:
    """Event flag ``base_flag + n`` (n < ``flag_count``) of ``sint`` at (``vp``, ``vtl``)."""

    sint: int
    vp: int | None = None
    vtl: int | None = None
    base_flag: int = 0
    flag_count: int = 1

    def target(self, caller_vp: int, caller_vtl: int) -> tuple[int, int]:
        return (caller_vp if self.vp is None else self.vp, caller_vtl if self.vtl is None else self.vtl)


Port = MessagePort | EventPort


class Connections:
    """Registry of connection ID -> port."""

    def __init__(self) -> None:
        self._ports: dict[int, Port] = {}

    @classmethod
    def with_loopback(cls) -> Connections:
        """The default registry: one loopback message and one loopback event connection."""
        c = cls()
        c.add(VSMTRACE_LOOPBACK_MESSAGE_CONNECTION_ID, MessagePort(VSMTRACE_LOOPBACK_SINT))
        c.add(VSMTRACE_LOOPBACK_EVENT_CONNECTION_ID, EventPort(VSMTRACE_LOOPBACK_SINT, flag_count=HV_EVENT_FLAGS_COUNT))
        return c

    def add(self, connection_id: int, port: Port) -> None:
        self._ports[connection_id] = port

    def remove(self, connection_id: int) -> None:
        self._ports.pop(connection_id, None)

    def lookup(self, connection_id: int) -> Port | None:
        return self._ports.get(connection_id)

    def __contains__(self, connection_id: int) -> bool:
        return connection_id in self._ports
