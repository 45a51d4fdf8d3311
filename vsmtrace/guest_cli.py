"""``vsmtrace guest``: build your own guest against the guest SDK shipped in the package.

A command group of its own (registered in ``vsmtrace.cli``); it imports only the
SDK's build module, never the CLI. Errors raise ``click.UsageError``, which the
top-level group prints as one ``vsmtrace: error:`` line with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.group(invoke_without_command=True, short_help="Build your own guest with the bundled guest SDK.")
@click.pass_context
def guest(ctx: click.Context) -> None:
    """Build guests with the bundled C runtime and two-VTL framework (see `vsmtrace guest sdk`)."""
    if ctx.invoked_subcommand is None:  # a bare `vsmtrace guest` asks what there is: help, status 0
        click.echo(ctx.get_help())


@guest.command(short_help="Build a guest from its C file and print the kernel's path.")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--raw64", is_flag=True, help="No Multiboot header: the VMM enters the guest in 64-bit long mode.")
@click.option("--elf32", is_flag=True, help="An ELF32 copy of the Multiboot kernel (for qemu -kernel).")
@click.option("--cflag", "cflags", multiple=True, metavar="FLAG", help="Extra compiler flag, e.g. --cflag=-DFOO=1 (repeatable).")
def build(source: Path, raw64: bool, elf32: bool, cflags: tuple[str, ...]) -> None:
    """Compile SOURCE (a .c or .S file) with the runtime and print the built kernel's path.

    Headers next to SOURCE are found; builds are cached by content, so a
    repeated build is immediate. Run the result with `vsmtrace run PATH`.
    """
    from vsmtrace.guests.build import GuestBuildError, build_file

    if raw64 and elf32:
        raise click.UsageError("--raw64 and --elf32 do not go together (--elf32 is for Multiboot kernels)")
    if not source.is_file():
        raise click.UsageError(f"guest source {source} does not exist")
    try:
        path = build_file(source, raw64=raw64, cflags=cflags, elf32=elf32)
    except GuestBuildError as exc:
        if exc.output:
            sys.stderr.write(exc.output if exc.output.endswith("\n") else exc.output + "\n")
        raise click.UsageError(exc.summary + (" (see the messages above)" if exc.output else "")) from None
    click.echo(path)


@guest.command(short_help="Say where the SDK's documentation, runtime and demo guest are.")
def sdk() -> None:
    """Print where the SDK is: its documentation, the runtime's headers and the demo guest to start from."""
    from vsmtrace.guests.build import DEMO_SOURCE, RUNTIME_DIR, SDK_DIR

    click.echo(f"documentation  {SDK_DIR / 'README.md'}")
    click.echo(f"runtime        {RUNTIME_DIR}   (#include \"guest.h\", \"vsm.h\", ...)")
    click.echo(f"demo guest     {DEMO_SOURCE}   (a two-VTL guest on 2 VPs)")
