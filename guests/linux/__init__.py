"""The vsmtrace Linux guest: a Debian linux-source-6.1 kernel booted by PVH, and its tiny init.

See :mod:`vsmtrace.guests.linux.build` and docs/linux-guest.md.
"""
