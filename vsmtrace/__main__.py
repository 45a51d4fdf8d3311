"""``python -m vsmtrace`` and the ``vsmtrace`` script: Ctrl-C handling first, then the command line."""

import os

from vsmtrace import interrupts

# Arrow's default allocator (mimalloc) made sealing a 200,000-event trace cost 0.08-0.28 s instead of
# 0.05-0.07 s on the development hosts, almost all of it in the kernel (docs/architecture.md, "Arrow's
# allocator"); the C library's allocator shows no such cost. Set before anything imports pyarrow;
# a user's own choice of ARROW_DEFAULT_MEMORY_POOL is kept.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

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
