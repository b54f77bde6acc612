"""advmend: adversarial robustness by repair (FSR, PSSR), adversarial training and honest evaluation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("advmend")  # recorded in every checkpoint, report and study record (advmend.io.versions)
except PackageNotFoundError:  # imported from a source tree that was never pip-installed
    __version__ = "unknown"
