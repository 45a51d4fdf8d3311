"""``python -m vsmtrace`` and the ``vsmtrace`` script: Ctrl-C handling first, then the command line."""

from vsmtrace import interrupts
from vsmtrace.arrow_pool import use_command_pool

use_command_pool()  # before anything imports pyarrow (vsmtrace/arrow_pool.py)

interrupts.install()  # before click and the VMM load: a Ctrl-C while they import is status 130 too


def main() -> None:
    import sys

    interrupts.install()
    try:
        from vsmtrace.cli import main as cli
    except BaseException as exc:
        if not interrupts.interrupted(exc):
            raise
        interrupts.quiet()
        sys.stderr.write("vsmtrace: interrupted\n")
        sys.exit(interrupts.EXIT_INTERRUPTED)
    cli()


if __name__ == "__main__":
    main()
