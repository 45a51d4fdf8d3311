"""vsmtrace: record, replay and analyse Hyper-V VSM behaviour under KVM.

The package is ``vsmtrace.vmm`` (the VMM), ``vsmtrace.recorder`` and
``vsmtrace.replayer`` (the trace and its replay), ``vsmtrace.analysis`` (tables
and figures), ``vsmtrace.guests`` (the guest SDK) and the CLI
(``vsmtrace.cli``). This module stays import-free so that importing any of them
never loads the CLI, and ``__version__`` is looked up on first use: the command
line installs its Ctrl-C handling right after this module loads, so it must load fast.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name != "__version__":
        raise AttributeError(f"module 'vsmtrace' has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("vsmtrace")
    except metadata.PackageNotFoundError:  # a checkout put on sys.path by hand, never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version
