"""The recorder's C event store: sequence numbers, clock, and columns for PIO/MMIO events.

``EventStore.io`` is what a VP thread calls per port-I/O or MMIO event: one C call
(``vsmt_io``) with the raw values, no Python object built. ``stamp_call`` gives a
Python-built row its ``seq`` and ``time_ns`` from the same counter and clock.
``take`` detaches the filled chunks; ``chunk_arrays`` wraps a chunk's columns as
Arrow arrays without copying (the chunk is freed when the last array using it is).

A C fast path that performs an operation the emulation would otherwise have recorded
(a VTL call answered in C) appends a *native record* instead: its raw values, stamped
with as many seqs and emulation entry orders as the events and entries it stands for.
``take`` hands those over with the chunks; the writer expands them (docs/architecture.md,
"Exit paths in C"). Entry orders come from the same store (``order``), so C records and
Python entries keep one numbering.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from vsmtrace.recorder import _store_build
from vsmtrace.vmm.native import extension_loader

#: Arrow type of each chunk column (``kind`` holds dictionary indices: EventKind value - 1).
CHUNK_TYPES: dict[str, pa.DataType] = {
    "seq": pa.uint64(),
    "time_ns": pa.int64(),
    "vp": pa.uint16(),
    "vtl": pa.uint8(),
    "rip": pa.uint64(),
    "kind": pa.int8(),
    "address": pa.uint64(),
    "size": pa.uint8(),
    "is_write": pa.bool_(),
    "data": pa.uint64(),
}
assert tuple(CHUNK_TYPES) == _store_build.CHUNK_COLUMNS


#: The compiled store module (built into the vsmtrace cache on first use).
load = extension_loader("_vsmtrace_store", _store_build, "the recorder's event store")

#: One native record as Python reads it: (seq, time_ns, order, word 0, ..., word 15).
NativeRecord = tuple[int, ...]
_NATIVE = struct.Struct("<QqQ16Q")


class EventStore:
    """One trace's C store. Thread-safe: every C entry point takes the store's mutex."""

    def __init__(self, t0_ns: int, chunk_rows: int, due_rows: int, late_rows: int, due_age_ns: int) -> None:
        mod = load()
        self.ffi: Any = mod.ffi
        self.lib: Any = mod.lib
        ptr = self.lib.vsmt_open(t0_ns, chunk_rows, due_rows, late_rows, due_age_ns)
        if ptr == self.ffi.NULL:
            raise MemoryError("cannot allocate the trace event store")
        self._ptr = self.ffi.gc(ptr, self.lib.vsmt_free)
        #: Statuses of ``io`` and stamps: > 0 asks for a flush (LATE: and wait for it); < 0: stopped.
        self.LATE: int = self.lib.VSMT_LATE
        #: ``io(kind, vp, vtl, rip, address, size, is_write, data) -> status``: one C call, no Python frame.
        self.io: Callable[..., int] = functools.partial(self.lib.vsmt_io, self._ptr)
        self._cutoff = self.ffi.new("uint64_t *")
        self._natives = self.ffi.new("vsmt_native **")
        self._native_count = self.ffi.new("uint32_t *")
        assert self.ffi.sizeof("vsmt_native") == _NATIVE.size and self.lib.VSMT_NATIVE_WORDS == 16
        #: ``order() -> int``: the next emulation entry order, shared with native records.
        self.order: Callable[[], int] = functools.partial(self.lib.vsmt_order, self._ptr)

    def stamp_call(self) -> tuple[Callable[[Any], int], Any]:
        """How to stamp a Python-built event: (``fn(out) -> status``, ``out``), out[0] = seq, out[1] = time_ns.

        One C call and two cdata reads, no Python frame; the caller serialises uses of ``out``.
        """
        return functools.partial(self.lib.vsmt_stamp, self._ptr), self.ffi.new("int64_t[2]")

    def due(self) -> int:
        return int(self.lib.vsmt_due(self._ptr))

    def oldest(self) -> int | None:
        """time_ns of the oldest event not yet taken, or None."""
        t = int(self.lib.vsmt_oldest(self._ptr))
        return None if t < 0 else t

    def native_count(self) -> int:
        """Native records not yet taken."""
        return int(self.lib.vsmt_native_count(self._ptr))

    def dropped(self) -> int:
        return int(self.lib.vsmt_dropped(self._ptr))

    def set_manual_time(self, time_ns: int) -> None:
        """Stamp every later event ``time_ns`` (ns since start) instead of reading the clock."""
        self.lib.vsmt_set_manual_time(self._ptr, time_ns)

    def native_io(self) -> tuple[int, int]:
        """(address of ``vsmt_io``, address of this store): for C callers in other extensions.

        The KVM run loop records port-I/O exits through it without returning to Python
        (``vmm.kvm`` ``vsm_kvm_run_recorded``); the store must outlive those callers.
        """
        fn = self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, "vsmt_io"))
        return int(fn), int(self.ffi.cast("uintptr_t", self._ptr))

    def native_record(self) -> tuple[int, int]:
        """(address of ``vsmt_native_record``, address of this store): how a C fast path records
        an operation it performed (see the module docstring); the store must outlive its callers."""
        fn = self.ffi.cast("uintptr_t", self.ffi.addressof(self.lib, "vsmt_native_record"))
        return int(fn), int(self.ffi.cast("uintptr_t", self._ptr))

    def stop(self) -> None:
        """Record nothing more: later ``io`` and stamp calls return a negative status."""
        self.lib.vsmt_stop(self._ptr)

    def take(self) -> tuple[list[Any], int, list[NativeRecord]]:
        """Detach the pending chunks (oldest first, each owned by the returned object), the cutoff
        seq and the pending native records (in seq order).

        Not reentrant: callers serialise takes (the writer's write lock).
        """
        lib, ffi = self.lib, self.ffi
        c = lib.vsmt_take(self._ptr, self._cutoff, self._natives, self._native_count)
        chunks = []
        while c != ffi.NULL:
            nxt = c.next
            chunks.append(ffi.gc(c, lib.vsmt_chunk_free))
            c = nxt
        natives: list[NativeRecord] = []
        array, count = self._natives[0], int(self._native_count[0])
        if array != ffi.NULL:
            natives = list(_NATIVE.iter_unpack(ffi.buffer(array, count * _NATIVE.size)))
            lib.vsmt_natives_free(array)
        return chunks, int(self._cutoff[0]), natives

    def chunk_arrays(self, chunk: Any) -> dict[str, pa.Array]:
        """The chunk's filled rows as Arrow arrays over the C buffers (zero-copy; they keep ``chunk`` alive)."""
        n = int(chunk.n)
        out: dict[str, pa.Array] = {}
        for i, (name, typ) in enumerate(CHUNK_TYPES.items()):
            ptr = getattr(chunk, name)
            address = int(self.ffi.cast("uintptr_t", ptr))
            buf = pa.foreign_buffer(address, int(chunk.bytes[i]), base=chunk)
            out[name] = pa.Array.from_buffers(typ, n, [None, buf])
        return out
