"""The guest SDK bound to the repository's guest programs (``guests/programs/``, see its README.md).

The C sources live in ``guests/programs/``, shared with the benchmarks (bench/common.py);
this module only binds the SDK's build functions to that folder, so the suite keeps
writing ``build_guest("hello")``.
"""

from functools import partial
from pathlib import Path

from vsmtrace.guests import build as _sdk
from vsmtrace.guests.build import GuestBuildError

# The checkout's folder, not the installed package's: the programs are not in the wheel.
PROGRAMS_DIR = Path(__file__).resolve().parents[2] / "guests" / "programs"

# Names resolve to guests/programs/<name>.c.
build_guest = partial(_sdk.build_guest, source_dir=PROGRAMS_DIR)
build_raw64 = partial(_sdk.build_raw64, source_dir=PROGRAMS_DIR)

__all__ = ["GuestBuildError", "PROGRAMS_DIR", "build_guest", "build_raw64"]
