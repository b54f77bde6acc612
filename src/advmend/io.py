"""Files written whole or not at all, file hashes and the versions recorded with every output.

The ground floor's I/O: checkpoints, reports, plots and study records all write through here, so a crash
or a full disk never leaves a half-written file under its final name.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
from pathlib import Path

import torch

from advmend._version import __version__


def versions() -> dict[str, str]:
    """Library and platform versions, recorded with every checkpoint and report."""
    out = {
        "advmend": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def write_temp(path: Path, write) -> Path:
    """Write through `write(tmp_path)` to a fsynced temporary file beside `path`; removed on any failure."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give them the usual permissions
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def commit_renames(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each fully written temporary file onto its final name (renames need no free space)."""
    try:
        for tmp, path in pairs:
            os.replace(tmp, path)
    finally:
        for tmp, _ in pairs:
            tmp.unlink(missing_ok=True)
    _fsync_dir(pairs[0][1].parent)  # make the renames durable (a power cut keeps old or new, never none)


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(tmp_path)` to a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    commit_renames([(write_temp(path, write), path)])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files a killed `atomic_write_bytes` left in `folder` (never loaded: their names differ)."""
    folder = Path(folder)
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, for reports (which checkpoint was evaluated)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
