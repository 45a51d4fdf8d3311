"""``python -m vsmtrace``: the same command line as the ``vsmtrace`` script."""

from vsmtrace.cli import main

if __name__ == "__main__":
    main()
