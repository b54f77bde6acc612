"""Checkpoints: safetensors (no pickled code is ever executed on load) plus a JSON sidecar.

The whole checkpoint is one safetensors file: tensors (model weights, optimizer state) and, in its
string metadata, the JSON record (resolved config, epoch, metrics, eps, versions) and a seal: one
SHA-256 over the tensor contents and the exact record text together. Changing a tensor or a single
character of the record (say its eps) breaks the seal and the file is refused. (The seal detects
corruption and edits; it is not a signature: whoever can rewrite the file can recompute it.)

The file and its `.json` sidecar (a readable copy of the record; the copy inside the safetensors file
is the one that counts) are both written to temporary files and fsynced first, then renamed, so a
crash or a full disk never leaves a half-written checkpoint under the final name, nor a sidecar that
describes another checkpoint than the one beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from advmend.errors import CheckpointError
from advmend.io import check_input_path, commit_renames, versions, write_temp

# Format 2 seals the record with the tensors (metadata key SEAL_KEY). Format 1 files carried a digest of
# the tensors alone: their record (config, eps) cannot be verified, so they are refused, not trusted;
# accepting them would also let anyone bypass the seal by relabelling a file as format 1.
FORMAT = "advmend-checkpoint-2"
OLD_FORMATS = ("advmend-checkpoint-1",)
RECORD_KEY, SEAL_KEY = "advmend", "advmend_sha256"


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _seal(tensors_digest: str, record_text: str) -> str:
    """SHA-256 over the format, the tensors' digest and the exact record text (what is stored)."""
    h = hashlib.sha256()
    for part in (FORMAT, tensors_digest, record_text):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


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
    digest = _tensors_digest(tensors)
    record["tensors_sha256"] = digest  # informative; the seal below is what load_checkpoint verifies
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    metadata = {RECORD_KEY: text, SEAL_KEY: _seal(digest, text)}
    sidecar = path.with_suffix(".json")
    # Both files are complete on disk before either is renamed: a full disk (OSError, or safetensors'
    # SafetensorError) while writing leaves the previous checkpoint and its sidecar untouched.
    tmp = write_temp(path, lambda t: save_file(tensors, t, metadata=metadata))
    try:
        tmp_side = write_temp(sidecar, lambda t: Path(t).write_text(text + "\n"))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit_renames([(tmp, path), (tmp_side, sidecar)])
    return path


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _check_record(path: Path, record: dict[str, Any]) -> None:
    """The record's fields that loading code relies on, when present (a bare save has only some)."""
    problems = []
    if "image_shape" in record:
        shape = record["image_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d >= 1 for d in shape)):
            problems.append(f"image_shape {shape!r} is not [channels, height, width] of positive integers")
    if "num_classes" in record and not (_is_int(record["num_classes"]) and record["num_classes"] >= 2):
        problems.append(f"num_classes {record['num_classes']!r} is not an integer >= 2")
    if "eps" in record and not (_is_number(record["eps"]) and record["eps"] > 0):
        problems.append(f"eps {record['eps']!r} is not a finite number > 0")
    if "norm" in record and record["norm"] not in ("linf", "l2", "l1"):
        problems.append(f"norm {record['norm']!r} is not linf, l2 or l1")
    if "epoch" in record and not (_is_int(record["epoch"]) and record["epoch"] >= 0):
        problems.append(f"epoch {record['epoch']!r} is not an integer >= 0")
    if "config" in record and not isinstance(record["config"], dict):
        problems.append("config is not a mapping")
    if "best" in record:
        best = record["best"]
        if not (isinstance(best, dict) and (best.get("value") is None or _is_number(best.get("value")))):
            problems.append(f"best {best!r} is not a mapping with a numeric value")
    if "optimizer" in record and not (isinstance(record["optimizer"], dict)
                                      and isinstance(record["optimizer"].get("scalars"), dict)):  # fmt: skip
        problems.append("optimizer is not a mapping with its scalars")
    if problems:
        raise CheckpointError(
            f"{path}: invalid checkpoint record: {'; '.join(problems)}; use another checkpoint or retrain"
        )


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; returns (model state dict, record).

    Raises CheckpointError if the file is missing, not a safetensors file, not an advmend checkpoint
    of this format, its tensors or its record do not match the seal written with them (corrupt or
    tampered with), or the record's fields are invalid (e.g. an image_shape with a negative size).
    The record's "optimizer_state" holds the optimizer state dict when one was saved, and
    "extra_tensors" the `extra_tensors` passed to `save_checkpoint`, when there were any.
    """
    path = check_input_path(path, "checkpoint")
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
    if RECORD_KEY not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not an advmend checkpoint (no advmend metadata)")
    text = meta[RECORD_KEY]
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its advmend metadata is not valid JSON (corrupt file)") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{path}: its advmend metadata is not a JSON object (corrupt file)")
    if record.get("format") in OLD_FORMATS:
        raise CheckpointError(
            f"{path}: checkpoint format {record['format']!r} (older advmend) seals only the tensors, not the "
            f"record (config, eps), so the record cannot be verified; retrain it to get a {FORMAT!r} checkpoint"
        )
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {record.get('format')!r}, expected {FORMAT!r}")
    digest = _tensors_digest(tensors)
    if digest != record.get("tensors_sha256"):
        raise CheckpointError(
            f"{path}: tensor contents do not match the digest written with them: the file was modified "
            "or corrupted after saving; refusing to load it"
        )
    if meta.get(SEAL_KEY) != _seal(digest, text):
        raise CheckpointError(
            f"{path}: its record (config, eps, metrics) does not match the seal written with it: the file "
            "was modified or corrupted after saving; refusing to load it"
        )
    _check_record(path, record)
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    if "optimizer" in record:
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        record["optimizer_state"] = _unflatten_optimizer(opt_tensors, record.pop("optimizer"))
    extra = {k[len("extra.") :]: v for k, v in tensors.items() if k.startswith("extra.")}
    if extra:
        record["extra_tensors"] = extra
    return model_state, record
