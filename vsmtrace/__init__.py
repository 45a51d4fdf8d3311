"""vsmtrace: record, replay and analyse Hyper-V VSM behaviour under KVM.

The package is ``vsmtrace.vmm`` (the VMM), ``vsmtrace.recorder`` and
``vsmtrace.replayer`` (the trace and its replay), ``vsmtrace.analysis`` (tables
and figures), ``vsmtrace.guests`` (the guest SDK) and the CLI
(``vsmtrace.cli``). This module stays import-free so that importing any of them
never loads the CLI.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("vsmtrace")
except _metadata.PackageNotFoundError:  # a checkout put on sys.path by hand, never installed
    __version__ = "0+unknown"
