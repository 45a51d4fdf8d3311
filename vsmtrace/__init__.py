"""vsmtrace: record, replay and analyse Hyper-V VSM behaviour under KVM.

The package is ``vsmtrace.vmm`` (the VMM), ``vsmtrace.recorder`` and
``vsmtrace.replayer`` (the trace and its replay), ``vsmtrace.analysis`` (tables
and figures), ``vsmtrace.guests`` (the guest SDK) and the CLI
(``vsmtrace.cli``). This module stays import-free so that importing any of them
never loads the CLI: the command line installs its Ctrl-C handling right after this
module loads, so it must load fast.
"""

#: The one place the version is written: pyproject.toml reads it from here when a wheel is built
#: (asking ``importlib.metadata`` at run time cost 15-20 ms of every command's start-up).
__version__ = "0.1.0"
