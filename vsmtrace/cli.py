"""The ``vsmtrace`` command line: the only module that wires vmm, recorder, replayer and analysis."""

from __future__ import annotations

import click

from vsmtrace import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vsmtrace")
def main() -> None:
    """Record, replay and analyse Hyper-V VSM behaviour of a guest under KVM."""


if __name__ == "__main__":
    main()
