"""What QEMU's Hyper-V test device (``-device hyperv-testdev``) does to the SynIC.

The guest writes one 32-bit word ``conn_id << 24 | cmd << 16 | vp << 8 | sint`` to the
device (``vmm/devices/hyperv_testdev.py``); :func:`apply` carries it out on the
emulation, inside a recorded emulation entry, so replay repeats it:

* 1 / 2: create / destroy a SINT route to (vp, sint);
* 3: assert the SINT of a route: its vector is raised at the VP unless the SINT is masked
  (or polling); auto-EOI SINTs are honoured as for any SynIC interrupt; no message;
* 4 / 5: create / destroy message connection ``conn_id`` to (vp, sint): HvPostMessage
  to it delivers the message there. As in QEMU one message may wait for a busy slot
  (the call succeeds and the message stays pending until the guest empties the slot and
  writes EOM); a second one while it waits gets HV_STATUS_INSUFFICIENT_BUFFERS;
* 6 / 7: create / destroy event connection ``conn_id`` to (vp, sint): HvSignalEvent to
  it sets event flag ``conn_id`` of the SINT and interrupts only if the flag was clear.

Everything targets VTL0 (QEMU has no VTLs). Where QEMU aborts (a route to a VP that does
not exist, asserting a route that was never created, an unknown command) nothing happens.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vsmtrace.vmm.hyperv.connections import EventPort, MessagePort

if TYPE_CHECKING:
    from vsmtrace.vmm.hyperv.facade import HyperV

TEST_DEVICE_VTL = 0
TEST_MESSAGE_BUFFERS = 1  # QEMU stages one message per connection
TEST_MESSAGE_ORIGINATION_ID = 0  # QEMU leaves the header's sender field zero
SINT_COUNT = 16


class HypervTestdevCommand(enum.IntEnum):
    SINT_ROUTE_CREATE = 1
    SINT_ROUTE_DESTROY = 2
    SINT_ROUTE_SET_SINT = 3
    MSG_CONN_CREATE = 4
    MSG_CONN_DESTROY = 5
    EVT_CONN_CREATE = 6
    EVT_CONN_DESTROY = 7


@dataclass(frozen=True)
class HypervTestdevRequest:
    conn_id: int
    cmd: int
    vp: int
    sint: int

    @classmethod
    def decode(cls, value: int) -> HypervTestdevRequest:
        return cls((value >> 24) & 0xFF, (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)


@dataclass
class HypervTestdevState:
    """Routes the guest created (QEMU keeps a list, so a route may exist more than once)."""

    routes: Counter[tuple[int, int]] = field(default_factory=Counter)


def apply(hv: HyperV, state: HypervTestdevState, value: int) -> bool:
    """Carry out one command word; False if it was ignored (see the module docstring)."""
    req = HypervTestdevRequest.decode(value)
    if req.vp >= hv.vp_count or req.sint >= SINT_COUNT:
        return False
    key = (req.vp, req.sint)
    match req.cmd:
        case HypervTestdevCommand.SINT_ROUTE_CREATE:
            state.routes[key] += 1
        case HypervTestdevCommand.SINT_ROUTE_DESTROY:
            if not state.routes[key]:
                return False
            state.routes[key] -= 1
            if not state.routes[key]:
                del state.routes[key]
        case HypervTestdevCommand.SINT_ROUTE_SET_SINT:
            if not state.routes[key]:
                state.routes.pop(key, None)
                return False
            hv.synic(req.vp, TEST_DEVICE_VTL).assert_sint(req.sint)
        case HypervTestdevCommand.MSG_CONN_CREATE:
            port = MessagePort(req.sint, req.vp, TEST_DEVICE_VTL, TEST_MESSAGE_BUFFERS, TEST_MESSAGE_ORIGINATION_ID)
            hv.connections.add(req.conn_id, port)
        case HypervTestdevCommand.EVT_CONN_CREATE:
            hv.connections.add(req.conn_id, EventPort(req.sint, req.vp, TEST_DEVICE_VTL, base_flag=req.conn_id))
        case HypervTestdevCommand.MSG_CONN_DESTROY | HypervTestdevCommand.EVT_CONN_DESTROY:
            kind = MessagePort if req.cmd == HypervTestdevCommand.MSG_CONN_DESTROY else EventPort
            if not isinstance(hv.connections.lookup(req.conn_id), kind):
                return False
            hv.connections.remove(req.conn_id)
        case _:
            return False
    return True
