"""Synthetic recorder benchmark: hot-path events/s, bytes/event on disk, flush lag.

Emits a realistic mix (serial port I/O, MSR, hypercalls with small inputs, VTL
switches, interrupts, timers, a few intercepts and SynIC messages) from one or more
threads through TraceWriter, then seals the trace. Port I/O and MMIO go through
``record_io`` (the positional C fast path the VMM uses), everything else through ``emit``.

    python bench/record_synthetic.py --events 2000000 --compression zstd
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vsmtrace.recorder.reader import open_trace  # noqa: E402
from vsmtrace.recorder.writer import TraceWriter  # noqa: E402
from vsmtrace.vmm.events import EventKind as K  # noqa: E402

Emit = Callable[..., None]


def make_events(rng: random.Random, n: int, vp: int) -> list[tuple[Any, int, int, int, dict[str, Any]]]:
    """Pre-build a list of (kind, vp, vtl, rip, fields) so the bench measures the recorder, not the generator."""
    rips = [0xFFFF_F800_0010_0000 + rng.randrange(0, 1 << 20) for _ in range(300)]
    calls = [(0x11, "HvCallVtlCall"), (0x12, "HvCallVtlReturn"), (0x0C, "HvCallEnablePartitionVtl"),
             (0x50, "HvCallGetVpRegisters"), (0x51, "HvCallSetVpRegisters"), (0x02, "HvCallFlushVirtualAddressSpace"),
             (0x4A, "HvCallModifyVtlProtectionMask"), (0x5C, "HvCallPostMessage")]
    msrs = [0x40000070, 0x40000071, 0x40000072, 0x40000073, 0x400000B0, 0x40000084, 0x6E0, 0x1B]
    out: list[tuple[Any, int, int, int, dict[str, Any]]] = []
    vtl = 0
    for _ in range(n):
        r = rng.random()
        rip = rng.choice(rips)
        if r < 0.22:
            out.append((K.PIO, vp, vtl, rip, {"address": 0x3F8, "size": 1, "is_write": True, "data": rng.randrange(32, 127)}))
        elif r < 0.25:
            out.append((K.SERIAL, vp, vtl, rip, {"data": bytes(rng.randrange(32, 127) for _ in range(rng.randrange(1, 40)))}))
        elif r < 0.40:
            msr = rng.choice(msrs)
            out.append((K.MSR, vp, vtl, rip, {"msr": msr, "value": rng.randrange(0, 1 << 20) << 12, "is_write": rng.random() < 0.6, "fault": False}))
        elif r < 0.55:
            code, name = rng.choice(calls)
            fast = code in (0x11, 0x12) or rng.random() < 0.3
            fields: dict[str, Any] = {"code": code, "name": name, "control": code | (1 << 16 if fast else 0), "fast": fast,
                                      "rep_count": 0, "rep_start": 0, "reps_done": 0, "status": 0, "status_name": "HV_STATUS_SUCCESS"}
            if fast:
                fields["regs_in"] = rng.randbytes(16) if code not in (0x11, 0x12) else bytes(16)
            else:
                fields["input_gpa"] = 0x5000
                fields["output_gpa"] = 0x6000
                fields["input"] = bytes(8) + rng.randbytes(8) + bytes(8)
                fields["output"] = bytes(16)
            out.append((K.HYPERCALL, vp, vtl, rip, fields))
        elif r < 0.70:
            to = 1 - vtl
            out.append((K.VTL_SWITCH, vp, vtl, rip, {"from_vtl": vtl, "to_vtl": to, "reason": "call" if to else "return"}))
            vtl = to
        elif r < 0.80:
            out.append((K.INTERRUPT, vp, vtl, rip, {"vector": rng.choice((0x20, 0x30, 0xEF, 0xFD)), "source": rng.choice(("apic-timer", "ipi", "synic", "stimer"))}))
        elif r < 0.86:
            out.append((K.TIMER, vp, vtl, rip, {"timer": rng.choice(("apic-timer", "stimer0")), "deadline_ns": rng.randrange(1 << 40)}))
        elif r < 0.92:
            out.append((K.EXIT, vp, vtl, rip, {"exit_reason": rng.choice(("HLT", "IRQ_WINDOW_OPEN", "INTR")), "exit_code": 5}))
        elif r < 0.96:
            out.append((K.CPUID, vp, vtl, rip, {"leaf": 0x40000000 + rng.randrange(6), "subleaf": 0, "eax": 0x40000006, "ebx": 0x7263694D, "ecx": 0x666F736F, "edx": 0x76482074}))
        elif r < 0.98:
            out.append((K.MMIO, vp, vtl, rip, {"address": 0xFEE000B0, "size": 4, "is_write": True, "data": 0}))
        elif r < 0.99:
            out.append((K.INTERCEPT, vp, vtl, rip, {"access": "write", "gpa": 0x10_0000 + rng.randrange(256) * 4096, "gva": None,
                                                    "insn_bytes": bytes.fromhex("48c70001000000"), "message": bytes(256)}))
        elif r < 0.995:
            out.append((K.SYNIC_MESSAGE, vp, 1, rip, {"sint": 0, "message_type": 0x80000001, "message": bytes(24) + rng.randbytes(8) + bytes(224)}))
        else:
            out.append((K.PROTECTION, vp, 1, rip, {"target_vtl": 0, "gpa_start": rng.randrange(1 << 16) << 12, "pages": 1, "old_mask": 0xF, "new_mask": 0x5}))
    return out


def run(n_events: int, threads: int, compression: str | None, level: int | None, path: Path, batch_rows: int) -> dict[str, float]:
    rng = random.Random(1234)
    per_thread = n_events // threads
    chunk = min(per_thread, 200_000)
    templates = [make_events(random.Random(rng.random()), chunk, vp) for vp in range(threads)]
    io_kinds = (K.PIO, K.MMIO)
    # (args, fields): fields None = a record_io call with positional args, as the VMM makes it.
    calls = [
        [((k, vp, vtl, rip, f["address"], f["size"], f["is_write"], f["data"]), None) if k in io_kinds else ((k, vp, vtl, rip), f)
         for k, vp, vtl, rip, f in events]
        for events in templates
    ]  # fmt: skip
    gc.collect()
    gc.freeze()  # the pre-built templates are bench scaffolding: keep them out of the GC's way
    w = TraceWriter(path, {"vm_config": {"bench": "synthetic"}}, compression=compression, compression_level=level,
                    batch_rows=batch_rows, fsync_on_close=False)
    emit, record_io, flush_due = w.emit, w.record_io, w.flush_due

    def worker(events: list[tuple[tuple[Any, ...], dict[str, Any] | None]]) -> None:
        left = per_thread
        while left > 0:
            for args, fields in events[: min(left, len(events))]:
                if fields is None:
                    status = record_io(*args)
                    if status > 0:
                        flush_due(status)
                else:
                    emit(*args, **fields)
            left -= len(events)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker, args=(calls[i],)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    t_emit = time.perf_counter() - t0
    w.flush()
    t_flushed = time.perf_counter() - t0
    stream_size = path.stat().st_size
    w.close()
    t_total = time.perf_counter() - t0
    sealed_size = path.stat().st_size
    trace = open_trace(path)
    assert trace.sealed, w.seal_error
    total = per_thread * threads
    return {
        "events": total,
        "emit_s": t_emit,
        "events_per_s_emit": total / t_emit,
        "events_per_s_end_to_end": total / t_flushed,
        "stream_bytes_per_event": stream_size / total,
        "sealed_bytes_per_event": sealed_size / total,
        "max_flush_lag_s": w.stats.max_flush_lag_s,
        "seal_s": w.stats.seal_seconds,
        "total_s": t_total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compression", default="zstd", help="zstd, lz4 or none; 'all' compares them")
    ap.add_argument("--level", type=int, default=None, help="codec level (zstd 1-22)")
    ap.add_argument("--batch-rows", type=int, default=16384)
    ap.add_argument("--keep", type=Path, help="write the trace here instead of a temp file")
    args = ap.parse_args()
    codecs = ["zstd", "lz4", "none"] if args.compression == "all" else [args.compression]
    for codec in codecs:
        with tempfile.TemporaryDirectory() as d:
            path = args.keep or Path(d) / "bench.vsmt"
            res = run(args.events, args.threads, None if codec == "none" else codec, args.level, path, args.batch_rows)
            print(f"compression={codec} level={args.level} threads={args.threads} events={res['events']}")
            print(f"  hot path          {res['events_per_s_emit']:>12,.0f} events/s  ({1e6 / res['events_per_s_emit']:.2f} us/event, emit only)")
            print(f"  end to end        {res['events_per_s_end_to_end']:>12,.0f} events/s  (until everything is on disk)")
            print(f"  stream on disk    {res['stream_bytes_per_event']:>12.1f} B/event")
            print(f"  sealed on disk    {res['sealed_bytes_per_event']:>12.1f} B/event  (seal took {res['seal_s']:.2f} s)")
            print(f"  max flush lag     {res['max_flush_lag_s'] * 1e3:>12.1f} ms")
            if args.keep:
                print(f"  kept {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
