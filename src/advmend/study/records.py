"""Study records: one small JSON file per finished run, the only input of the results renderer.

A record holds the resolved config and its hash, the commit, per-epoch metrics, timings, hardware,
versions, and the evaluation with per-example correctness (a string of 0/1 per attack, in the order of
the recorded test indices), so that every figure in docs/results.md can be recomputed, and re-checked
by independent code on the same examples. Accuracies are always recomputed from the per-example bits;
a record whose stored accuracy disagrees with its bits is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from advmend.config import RunConfig, from_dict
from advmend.errors import AdvmendError
from advmend.io import atomic_write_text
from advmend.study.spec import config_digest

SCHEMA = "advmend.study.record/1"
STUDY_SCHEMA = "advmend.study/1"
STUDY_FILE = "study.json"


class RecordError(AdvmendError):
    """A study record or study file is missing, corrupt, from another study, or out of date."""


def bits(correct: torch.Tensor) -> str:
    """Per-example correctness as a string of '0'/'1' (compact, diff-friendly, language-neutral)."""
    return "".join("1" if c else "0" for c in correct.bool().tolist())


def percent(correct: torch.Tensor) -> float:
    """Accuracy in percent, exactly as the renderer recomputes it from the bits (a float32 mean is off
    in the 7th digit)."""
    return 100.0 * int(correct.bool().sum()) / max(correct.numel(), 1)


def unbits(s: str, where: str) -> list[int]:
    if not isinstance(s, str) or set(s) - {"0", "1"}:
        raise RecordError(f"{where}: per-example correctness must be a string of 0 and 1")
    return [1 if c == "1" else 0 for c in s]


def record_path(records_dir: Path, run_id: str) -> Path:
    return records_dir / f"{run_id}.json"


def write_json(path: Path, data: dict) -> None:
    """Atomic, deterministic (sorted keys, fixed indent) JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise RecordError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: corrupt {what} ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                          "delete it to rerun that run") from None  # fmt: skip
    if not isinstance(data, dict):
        raise RecordError(f"{path}: corrupt {what} (the top level must be an object)")
    return data


def _need(d: dict, key: str, tp: type | tuple, where: str) -> Any:
    if key not in d or not isinstance(d[key], tp) or isinstance(d[key], bool) and tp is not bool:
        raise RecordError(f"{where}: missing or invalid field {key!r}; delete the record to rerun that run")
    return d[key]


def _check_result(res: dict, where: str) -> None:
    n = _need(res, "n", int, where)
    ok = unbits(_need(res, "correct", str, where), where)
    if len(ok) != n:
        raise RecordError(f"{where}: {len(ok)} per-example results for n={n}")
    acc = _need(res, "accuracy", (int, float), where)
    # 1e-4 points: the float32 rounding of a stored mean passes, any edit of a result (>= 100/n) does not.
    if abs(acc - 100.0 * sum(ok) / max(n, 1)) > 1e-4:
        raise RecordError(f"{where}: stored accuracy {acc} disagrees with its per-example results; "
                          "the record was edited by hand")  # fmt: skip


def record_config_digest(rec: dict, where: str) -> str:
    """The hash of the record's config as this advmend resolves it: a field added to advmend since the
    record was written takes its default, so new options do not invalidate old records, while any value
    the run really used is compared."""
    try:
        return config_digest(from_dict(RunConfig, _need(rec, "config", dict, where)))
    except AdvmendError as e:
        raise RecordError(f"{where}: its config no longer loads ({e}); delete the record to rerun that run") from None


def load_record(path: Path, study_id: str, config_sha256: str | None = None) -> dict[str, Any]:
    """Read and check one run record; every problem is a RecordError naming the file."""
    rec = read_json(path, "study record")
    where = str(path)
    if rec.get("schema") != SCHEMA:
        raise RecordError(f"{where}: not an advmend study record (schema {rec.get('schema')!r}, expected {SCHEMA!r})")
    if rec.get("study") != study_id:
        raise RecordError(f"{where}: record of study {rec.get('study')!r}, not of {study_id!r}; "
                          "move it to its own study folder")  # fmt: skip
    if path.stem != rec.get("run"):
        raise RecordError(f"{where}: the file name does not match the recorded run {rec.get('run')!r}")
    _need(rec, "config_sha256", str, where)
    if config_sha256 is not None and record_config_digest(rec, where) != config_sha256:
        raise RecordError(f"{where}: written for another config of this run (the study or base config changed "
                          "since); restore the config, or delete the record to rerun it")  # fmt: skip
    _need(rec, "train", dict, where)
    _need(rec, "metrics", list, where)
    _need(rec, "checkpoint", dict, where)
    if rec.get("eval") is None:  # a tuning run: validation metrics only
        return rec
    ev = _need(rec, "eval", dict, where)
    _check_result(_need(ev, "clean", dict, where), f"{where}: eval.clean")
    for name, res in _need(ev, "attacks", dict, where).items():
        _check_result(res, f"{where}: eval.attacks.{name}")
    _check_result(_need(ev, "worst_case", dict, where), f"{where}: eval.worst_case")
    return rec


def cached_stage(path: Path, checkpoint_sha: str, compute: Callable[[], dict], log) -> dict:
    """A stage of the evaluation, cached next to the checkpoint it evaluated (atomic JSON)."""
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("checkpoint_sha256") == checkpoint_sha:
                log(f"  {path.stem}: cached")
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # an unreadable cache is recomputed
    t0 = time.perf_counter()
    out = dict(compute(), checkpoint_sha256=checkpoint_sha)
    out["stage_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(path, out)
    log(f"  {path.stem}: {out['stage_seconds']:.0f} s")
    return out
