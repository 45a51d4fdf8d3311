"""C/assembly test guests and their build harness (see README.md)."""

from .build import GuestBuildError, build_guest, build_raw64

__all__ = ["GuestBuildError", "build_guest", "build_raw64"]
