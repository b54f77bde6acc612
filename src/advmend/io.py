"""Files written whole or not at all, file hashes and the versions recorded with every output.

The ground floor's I/O: checkpoints, reports, plots and study records all write through here, so a crash
or a full disk never leaves a half-written file under its final name.
"""

from __future__ import annotations

import errno
import hashlib
import os
import platform
import tempfile
from pathlib import Path

import torch

from advmend._version import __version__
from advmend.errors import PathError


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


# --------------------------------------------------------------------------- paths the file system refuses

# What to do about each refusal, by errno: the one-line errors of every command end with it.
_FIXES = {
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EACCES: "choose a folder you may write to, or change its permissions",
    errno.EPERM: "choose a folder you may write to, or change its permissions",
    errno.EROFS: "choose a folder on a writable file system",
    errno.ENOTDIR: "a file stands where a folder is needed; choose another path",
    errno.EISDIR: "give a file name, not a folder",
    errno.ENOSPC: "free some space or choose another folder",
    errno.ENOENT: "check the path",
}


def shown(path: str | os.PathLike[str]) -> str:
    """A path as an error message names it: whole, or its ends around "..." when longer than a line allows."""
    text = str(path)
    return text if len(text) <= 120 else f"{text[:50]}...{text[-50:]}"


def describe_os_error(err: OSError, what: str = "") -> str:
    """One line for an OSError of the file system: what, the path, why, and what to do."""
    name = shown(err.filename) if err.filename is not None else ""
    why = err.strerror or type(err).__name__
    fix = _FIXES.get(err.errno or 0)
    head = " ".join(part for part in (what, name) if part)
    return (f"{head}: {why}" if head else why) + (f"; {fix}" if fix else "")


def _too_long(path: Path, what: str) -> None:
    """PathError when a component of `path`, or the whole, is longer than the file system allows."""
    anchor = existing_ancestor(path)
    try:
        name_max, path_max = os.pathconf(anchor, "PC_NAME_MAX"), os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such limit: POSIX's usual
        name_max, path_max = 255, 4096
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            raise PathError(f"{what} {shown(path)}: the name {part[:24]}... is {len(os.fsencode(part))} bytes, longer "
                            f"than the file system allows ({name_max}); use a shorter name")  # fmt: skip
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise PathError(f"{what} {shown(path)}: the path is longer than the file system allows ({path_max} bytes); "
                        "use a shorter path")  # fmt: skip


def existing_ancestor(path: Path) -> Path:
    """The nearest part of `path` (itself or a parent) that exists, a file or a folder."""
    path = path.absolute()
    while True:
        try:
            path.lstat()
            return path
        except OSError:
            if path.parent == path:
                return path
            path = path.parent


def check_output_path(path: str | os.PathLike[str], what: str, *, folder: bool) -> Path:
    """Refuse, before any work, an output the file system would refuse when it is written: a name too long,
    a file where a folder must be (the path itself for a folder, a parent for either), no permission, a
    read-only file system. Creates nothing; returns the path. Raises PathError naming `what` (the flag or
    key, e.g. "--out") and the path, with what to do."""
    path = Path(path)
    _too_long(path, what)
    if path.exists() and folder != path.is_dir():
        kind = "a file" if folder else "a folder"
        need = "a folder for its files" if folder else "a file name"
        raise PathError(f"{what} {shown(path)}: exists and is {kind}; give {need}")
    anchor = existing_ancestor(path if folder else path.parent)
    if not anchor.is_dir():
        raise PathError(f"{what} {shown(path)}: {anchor} is a file, not a folder; choose another {what}")
    try:
        read_only = bool(os.statvfs(anchor).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows): the write itself will tell
        read_only = False
    if read_only:
        raise PathError(
            f"{what} {shown(path)}: {anchor} is on a read-only file system; choose a folder on a writable one"
        )
    writable = anchor if not (path.exists() and not folder) else path
    if not os.access(writable, os.W_OK) or not os.access(anchor, os.W_OK | os.X_OK):
        raise PathError(f"{what} {shown(path)}: no permission to write in {anchor}; choose a folder you may write to")
    return path


def check_input_path(path: str | os.PathLike[str], what: str) -> Path:
    """Refuse an input (config, checkpoint, weights, data root) the file system cannot even look up: a
    name too long, a parent that is a file, no permission to a folder on the way. A missing file is left
    to the caller, which says what it expected there. Returns the path."""
    path = Path(path)
    _too_long(path, what)
    try:
        path.stat()
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise PathError(
            f"{what} {shown(path)}: {existing_ancestor(path)} is a file, not a folder; check the path"
        ) from None
    except OSError as err:
        raise PathError(describe_os_error(err, what)) from None
    if not os.access(path, os.R_OK):
        raise PathError(f"{what} {shown(path)}: no permission to read it; change its permissions or copy it")
    return path
