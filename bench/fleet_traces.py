"""The synthetic traces behind bench/fleet: several builds and configurations, cached.

Base trace ``i`` (of ``n``) is ``analysis.synthetic.write_realistic`` with seed ``i``, on 2
or 4 VPs, of one of ten nightly "builds" (a guest image name and hash); builds 7-9 carry
a planted regression (secure-call service 0x22 spends 3x longer in VTL1). Base traces
are written once into ``<cache>/fleet/traces`` (a temporary name renamed when complete,
so an interrupted generation resumes where it stopped) and reused by every later run.
bench/fleet derives its fleet from them (see ``variant``): writing 100 M events through
the generator takes hours of CPU on this 2-core host, rescaling a clock does not.

Usage: python bench/fleet_traces.py [BASE_TRACES] [EVENTS_PER_TRACE] [PROCESSES]
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

BUILDS = 10
REGRESSED_BUILDS = (7, 8, 9)
SLOW_SERVICE = 0x22


def trace_dir() -> Path:
    from vsmtrace.vmm.native import cache_dir

    path = cache_dir() / "fleet" / "traces"
    path.mkdir(parents=True, exist_ok=True)
    return path


def trace_path(i: int, events: int) -> Path:
    return trace_dir() / f"synthetic-{events}-{i:05d}.vsmt"


def config_of(i: int, traces: int) -> dict:
    """Build, VP count and memory of trace ``i``: builds in order of index, like nightly runs."""
    build = i * BUILDS // traces
    vps = 2 if i % 3 else 4
    image = f"guest-build-{build:02d}.elf"
    return {
        "build": build,
        "vps": vps,
        "metadata": {
            "guest_image": {"name": image, "path": f"/builds/{image}", "size": 1 << 20,
                            "sha256": hashlib.sha256(image.encode()).hexdigest()},
            "vm_config": {"smp": vps, "memory_mib": 256 if vps == 2 else 512, "vtls": 2, "synthetic": True},
            "command_line": ["vsmtrace", "run", "--smp", str(vps), "--record", f"nightly-{i}.vsmt", f"/builds/{image}"],
        },
        "slow_services": {SLOW_SERVICE: 3.0} if build in REGRESSED_BUILDS else None,
    }


def make_one(args: tuple[int, int, int]) -> int:
    from vsmtrace.analysis.synthetic import write_realistic

    i, traces, events = args
    path = trace_path(i, events)
    if path.exists():
        return 0
    c = config_of(i, traces)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = write_realistic(tmp, events, vps=c["vps"], seed=i, metadata=c["metadata"], slow_services=c["slow_services"])
    os.replace(tmp, path)
    return n


def ensure_traces(traces: int, events: int, processes: int = 2) -> list[Path]:
    """Every trace of the fleet, generating the missing ones with ``processes`` processes."""
    todo = [(i, traces, events) for i in range(traces) if not trace_path(i, events).exists()]
    if todo:
        print(f"generating {len(todo)} of {traces} synthetic traces of {events} events into {trace_dir()} "
              f"({processes} processes; cached for next time)...", flush=True)  # fmt: skip
        t0 = time.perf_counter()
        done = 0
        with Pool(processes) as pool:
            for _ in pool.imap_unordered(make_one, todo):
                done += 1
                if done % 50 == 0 or done == len(todo):
                    print(f"  {done}/{len(todo)} traces, {time.perf_counter() - t0:.0f} s", flush=True)
    return [trace_path(i, events) for i in range(traces)]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    per = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    procs = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    ensure_traces(n, per, procs)
