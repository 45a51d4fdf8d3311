"""Which allocator Arrow uses in a ``vsmtrace`` command (docs/architecture.md, "Arrow's allocator").

Arrow's default (mimalloc) made sealing a 200,000-event trace cost 0.08-0.28 s instead of
0.05-0.07 s on the development hosts, almost all of it in the kernel; the C library's allocator
shows no such cost, and replay runs faster on it too. Imports nothing, so the command can call it
before anything imports pyarrow; benchmarks that run the command's code in-process call it too.
"""

import os

#: Arrow's name of the C library's allocator.
COMMAND_POOL = "system"


def use_command_pool() -> None:
    """Choose the command's allocator for the pyarrow this process will import; a user's own choice
    of ARROW_DEFAULT_MEMORY_POOL is kept. No effect once pyarrow is imported."""
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", COMMAND_POOL)
