"""advmend's version, recorded in every checkpoint, report and study record (`advmend.io.versions`)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("advmend")
except PackageNotFoundError:  # imported from a source tree that was never pip-installed
    __version__ = "unknown"
