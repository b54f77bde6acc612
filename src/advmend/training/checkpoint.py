"""Checkpoints: safetensors (no pickled code is ever executed on load) plus a JSON sidecar.

The whole checkpoint is one safetensors file: tensors (model weights, optimizer state) and, in its
string metadata, the JSON record (resolved config, epoch, metrics, versions) and a SHA-256 over the
tensor contents. It is written to a temporary file, fsynced and renamed, so a crash never leaves a
half-written checkpoint under the final name. The `.json` sidecar is a readable copy of the record;
the copy inside the safetensors file is the one that counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from advmend.errors import CheckpointError

FORMAT = "advmend-checkpoint-1"


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Library and platform versions, recorded with every checkpoint and report."""
    import advmend

    out = {
        "advmend": getattr(advmend, "__version__", "unknown"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(tmp_path)` to a temporary file in the same folder, fsync, rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable (a power cut keeps old or new, never none)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for pid, slots in state["state"].items():
        for key, value in slots.items():
            name = f"optim.{pid}.{key}"
            if isinstance(value, torch.Tensor):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    record: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `model` (and `optimizer`) with `record` (config, epoch, metrics) atomically.

    `extra_tensors` (e.g. RNG states as uint8 tensors, EMA weights) are stored under `extra.<name>`
    and come back from `load_checkpoint` in `record["extra_tensors"]`.
    Returns the path of the safetensors file; the sidecar is `path` with a `.json` suffix.
    """
    path = Path(path)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v.detach().cpu().contiguous()
    record = dict(record, format=FORMAT, versions=versions())
    if optimizer is not None:
        opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        record["optimizer"] = opt_rest
    # Tied weights would share storage; safetensors refuses that, so store independent copies.
    seen: set[int] = set()
    for k, v in tensors.items():
        if v.untyped_storage().data_ptr() in seen:
            tensors[k] = v.clone()
        seen.add(tensors[k].untyped_storage().data_ptr())
    record["tensors_sha256"] = _tensors_digest(tensors)
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, metadata={"advmend": text}))
    atomic_write_text(path.with_suffix(".json"), text + "\n")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; returns (model state dict, record).

    Raises CheckpointError if the file is missing, not a safetensors file, not an advmend checkpoint,
    or its tensors do not match the digest recorded when it was written (corrupt or tampered with).
    The record's "optimizer_state" holds the optimizer state dict when one was saved, and
    "extra_tensors" the `extra_tensors` passed to `save_checkpoint`, when there were any.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint ({str(e).splitlines()[0][:120]}); "
            "it may be truncated or corrupt: use another checkpoint or retrain"
        ) from None
    if "advmend" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an advmend checkpoint (no advmend metadata)")
    try:
        record = json.loads(meta["advmend"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its advmend metadata is not valid JSON (corrupt file)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: its advmend metadata is not a JSON object (corrupt file)")
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {record.get('format')!r}, expected {FORMAT!r}")
    if _tensors_digest(tensors) != record.get("tensors_sha256"):
        raise CheckpointError(
            f"{path}: tensor contents do not match the digest written with them: the file was modified "
            "or corrupted after saving; refusing to load it"
        )
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if "optimizer" in record:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        record["optimizer_state"] = _unflatten_optimizer(opt_tensors, record.pop("optimizer"))
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    if extra:
        record["extra_tensors"] = extra
    return model_state, record


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, for reports (which checkpoint was evaluated)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
