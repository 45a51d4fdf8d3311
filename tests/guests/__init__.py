"""The test guests' C sources, built with the guest SDK (see README.md)."""

from functools import partial
from pathlib import Path

from vsmtrace.guests import build as _sdk
from vsmtrace.guests.build import GuestBuildError

TEST_GUESTS_DIR = Path(__file__).resolve().parent

# Names resolve to tests/guests/<name>.c, as the suite has always written them.
build_guest = partial(_sdk.build_guest, source_dir=TEST_GUESTS_DIR)
build_raw64 = partial(_sdk.build_raw64, source_dir=TEST_GUESTS_DIR)

__all__ = ["GuestBuildError", "TEST_GUESTS_DIR", "build_guest", "build_raw64"]
