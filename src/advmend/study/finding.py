"""PSSR's finding as a committed record: the paired tests and verdicts of `advmend pssr-analysis`, and
the checks of a finding folder (docs/results/pssr_finding/<name>/) that the results page renders.

A finding folder holds finding.json (schema FINDING_SCHEMA: per row the per-example correctness of f as a
string of 0/1, the paired tests, the verdicts, the checkpoint's SHA-256, the command, timings, hardware,
versions) and finding.png. Everything the page shows is recomputed from the per-example bits; a stored
accuracy, interval or verdict that disagrees with them is refused (RecordError naming the file).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from advmend.study.records import RecordError, read_json, unbits
from advmend.study.stats import paired_bootstrap

FINDING_SCHEMA = "advmend.pssr.finding/1"
FINDING_FILE, FINDING_PNG = "finding.json", "finding.png"
FINDINGS_DIR = "pssr_finding"  # under the records root: one folder per finding

# (row, definition). fill: removed pixels interpolated from their kept neighbours (`fill_holes`), no G:
# what the surgery alone costs a clean image.
ROWS = (
    ("clean", "x"),
    ("adversarial", "x + delta"),
    ("salient removed", "x + (1 - M_s) delta"),
    ("salient only", "x + M_s delta"),
    ("random removed", "x + (1 - M_r) delta"),
    ("random only", "x + M_r delta"),
    ("PS only", "f(PS(x + delta))"),
    ("PSSR (gray-box)", "f(G(PS(x + delta)))"),
    ("clean, holes interpolated", "f(fill(PS(x)))"),
    ("PSSR (clean)", "f(G(PS(x)))"),
)
# The pipeline rows need a PSSR checkpoint; the clean-surgery row came later (older findings lack it).
OPTIONAL_ROWS = ("PSSR (gray-box)", "clean, holes interpolated", "PSSR (clean)")
PIPELINE_ROWS = ("PSSR (gray-box)", "PSSR (clean)")
REMOVED_TEST, ONLY_TEST = "salient removed - random removed", "salient only - random only"


def paired_difference(a, b, *, seed: int = 0) -> dict:
    """Accuracy difference a - b (percentage points) of two per-example correctness vectors over the
    SAME examples, with the 95 % bootstrap interval over examples (`advmend.study.stats.paired_bootstrap`).

    Pairing matters: the two accuracies share their examples, so their difference is far less noisy
    than two independent accuracies, and a gap inside the interval is not a finding."""
    a, b = np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two per-example vectors of one length, got {a.shape}, {b.shape}")
    mean, low, high = paired_bootstrap((a - b).astype(np.float64)[None, :], seed=seed)
    return {"difference": mean, "ci95": [low, high], "n_examples": int(a.size), "covers_zero": low <= 0 <= high}


def _gap(d: dict) -> str:
    lo, hi = d["ci95"]
    return f"{d['difference']:+.2f} points, 95% CI [{lo:+.2f}, {hi:+.2f}] over {d['n_examples']} paired examples"


def finding_verdict(salient_removed, random_removed, *, seed: int = 0) -> tuple[str, dict]:
    """The verdict on "removing the salient part helps more than removing a random part of the same
    size", from the paired difference of f's per-example correctness (salient removed - random removed)."""
    d = paired_difference(salient_removed, random_removed, seed=seed)
    if d["covers_zero"]:
        return (
            f"no measurable difference between removing the salient part and a random part of the same size ({_gap(d)})",
            d,
        )
    if d["ci95"][0] > 0:
        return f"removing the salient part helps more than removing a random part of the same size ({_gap(d)})", d
    return (
        f"random masks remove the attack better than the salient mask: the finding is NOT reproduced here ({_gap(d)})",
        d,
    )


def only_verdict(salient_only, random_only, *, seed: int = 0) -> tuple[str, dict]:
    """The verdict on "the salient part alone keeps more of the attack than a random part of the same
    size", from the paired difference salient only - random only (negative: f is fooled more often)."""
    d = paired_difference(salient_only, random_only, seed=seed)
    if d["covers_zero"]:
        return (
            f"no measurable difference between perturbing only the salient part and only a random part of the same size ({_gap(d)})",
            d,
        )
    if d["ci95"][1] < 0:
        return (
            f"perturbing only the salient part keeps more of the attack than a random part of the same size ({_gap(d)})",
            d,
        )
    return (
        f"a random part of the same size keeps more of the attack than the salient part: the finding is NOT reproduced here ({_gap(d)})",
        d,
    )


def attack_kept(clean: float, adversarial: float, row: float) -> float | None:
    """The share (%) of the attack's effect (clean - adversarial accuracy) that a row keeps; None when the
    attack has no effect."""
    drop = clean - adversarial
    return None if drop <= 0 else 100.0 * (clean - row) / drop


def _need(d: dict, key: str, tp, where: str) -> Any:
    if key not in d or not isinstance(d[key], tp) or (isinstance(d[key], bool) and tp is not bool):
        raise RecordError(f"{where}: missing or invalid field {key!r}; rerun the command it names")
    return d[key]


def _close(a: float, b: float) -> bool:
    return isinstance(a, (int, float)) and math.isclose(a, b, rel_tol=0, abs_tol=1e-6)


def load_finding(folder: Path) -> dict[str, Any]:
    """Read and check one finding folder; every problem is a one-line RecordError naming the file.

    Returns the record with `correct` (row -> int array), `accuracy` recomputed from the bits, and the
    recomputed paired tests and verdicts under `tests`."""
    path = folder / FINDING_FILE
    rec = read_json(path, "PSSR finding")
    where = str(path)
    if rec.get("schema") != FINDING_SCHEMA:
        raise RecordError(f"{where}: not an advmend PSSR finding (schema {rec.get('schema')!r}, expected "
                          f"{FINDING_SCHEMA!r}); rerun `advmend pssr-analysis` with --out {folder}")  # fmt: skip
    n = _need(rec, "n_examples", int, where)
    sha = _need(rec, "checkpoint_sha256", str, where)
    if len(sha) != 64 or set(sha) - set("0123456789abcdef"):
        raise RecordError(f"{where}: checkpoint_sha256 is not a SHA-256")
    for key in ("checkpoint", "command", "verdict", "verdict_only"):
        _need(rec, key, str, where)
    seed = _need(rec, "bootstrap_seed", int, where)
    rows = _need(rec, "accuracy", dict, where)
    correct = {}
    for name, _ in ROWS:
        if name not in rows:
            if name in OPTIONAL_ROWS:
                continue
            raise RecordError(f"{where}: row {name!r} is missing")
        entry = _need(rows, name, dict, where)
        w = f"{where}: accuracy.{name}"
        bits = np.array(unbits(_need(entry, "correct", str, w), w), dtype=np.int64)
        if bits.size != n:
            raise RecordError(f"{w}: {bits.size} per-example results for n_examples={n}")
        if not _close(_need(entry, "accuracy", (int, float), w), 100.0 * bits.sum() / n):
            raise RecordError(f"{w}: stored accuracy {entry['accuracy']} disagrees with its per-example results")
        correct[name] = bits
    if unknown := sorted(set(rows) - {name for name, _ in ROWS}):
        raise RecordError(f"{where}: unknown row(s) {', '.join(unknown)}")
    verdict, removed = finding_verdict(correct["salient removed"], correct["random removed"], seed=seed)
    verdict_only, only = only_verdict(correct["salient only"], correct["random only"], seed=seed)
    stored = _need(rec, "paired_tests", dict, where)
    for key, d in ((REMOVED_TEST, removed), (ONLY_TEST, only)):
        s = _need(stored, key, dict, where)
        if not (_close(s.get("difference"), d["difference"]) and isinstance(s.get("ci95"), list)
                and len(s["ci95"]) == 2 and all(_close(x, y) for x, y in zip(s["ci95"], d["ci95"]))):  # fmt: skip
            raise RecordError(f"{where}: paired test {key!r} disagrees with the per-example results")
    if rec["verdict"] != verdict or rec["verdict_only"] != verdict_only:
        raise RecordError(f"{where}: stored verdict disagrees with the per-example results")
    png = folder / FINDING_PNG
    try:
        head = png.read_bytes()[:8]
    except OSError:
        raise RecordError(f"{png}: the finding's picture is missing; rerun the command in {path.name}") from None
    if head != b"\x89PNG\r\n\x1a\n":
        raise RecordError(f"{png}: not a PNG file; rerun the command in {path.name}")
    rec = dict(rec)
    rec["correct"] = correct
    rec["acc"] = {k: 100.0 * v.sum() / n for k, v in correct.items()}
    rec["tests"] = {REMOVED_TEST: removed, ONLY_TEST: only}
    return rec


def finding_folders(root: Path) -> list[Path]:
    """Every finding folder under ROOT/pssr_finding/ (a folder there without finding.json is refused)."""
    base = root / FINDINGS_DIR
    if not base.is_dir():
        return []
    folders = sorted(p for p in base.iterdir() if p.is_dir())
    for p in folders:
        if not (p / FINDING_FILE).is_file():
            raise RecordError(f"{p / FINDING_FILE}: PSSR finding not found (every folder under {base} holds one)")
    return folders
