"""Reports: report.json for tools, report.md for people, and the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advmend.evaluation.evaluate import EvalResult
from advmend.training.checkpoint import atomic_write_text, versions


def result_to_dict(result: EvalResult, *, per_example: bool = True) -> dict[str, Any]:
    """Machine-readable evaluation result: accuracies in percent, exact settings, timings."""
    out: dict[str, Any] = {
        "n_examples": result.n,
        "clean_accuracy": 100 * result.clean_accuracy,
        "attacks": [
            {
                "settings": a.settings,
                "robust_accuracy": 100 * a.accuracy,
                "seconds": round(a.seconds, 3),
                "attacked_examples": a.attacked,
                "images_per_s": round(a.attacked / a.seconds, 2) if a.seconds > 0 else None,
            }
            for a in result.attacks
        ],
        "worst_case": {
            "robust_accuracy": 100 * result.worst_accuracy,
            "attacks": [a.name for a in result.attacks],
        },
        "seconds": round(result.seconds, 3),
    }
    if per_example:
        out["per_example"] = {
            "clean": result.clean_correct.int().tolist(),
            **{a.name: a.correct.int().tolist() for a in result.attacks},
            "worst_case": result.worst_correct.int().tolist(),
        }
    return out


def table_rows(result: EvalResult) -> list[tuple[str, str, str]]:
    """(name, accuracy %, settings) rows: clean, each attack, worst case."""
    rows = [("clean", f"{100 * result.clean_accuracy:.2f}", "")]
    for a in result.attacks:
        s = a.settings
        extra = f"{s['norm']} eps={s['eps']:.4g} steps={s['steps']} step={s['step_size']:.4g} loss={s['loss']}"
        if s["random_start"]:
            extra += " rand-start"
        if s["restarts"] > 1:
            extra += f" restarts={s['restarts']}"
        rows.append((a.name, f"{100 * a.accuracy:.2f}", extra))
    if result.attacks:
        rows.append(("worst case", f"{100 * result.worst_accuracy:.2f}", "per example, over all attacks above"))
    return rows


def format_table(result: EvalResult, title: str = "") -> str:
    """A fixed-width table for the console."""
    rows = [("attack", "accuracy %", "settings")] + table_rows(result)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [title] if title else []
    for i, (a, b, c) in enumerate(rows):
        lines.append(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip())
        if i == 0:
            lines.append("-" * (w0 + w1 + 4 + max(len(r[2]) for r in rows)))
    lines.append(f"{result.n} examples, {result.seconds:.1f} s")
    return "\n".join(lines)


def markdown_report(result: EvalResult, meta: dict[str, Any]) -> str:
    """report.md: the table a person reads first, then where it came from."""
    lines = [f"# advmend evaluation: {meta.get('title', '')}".rstrip(), ""]
    lines += ["| attack | accuracy (%) | settings | seconds |", "|---|---:|---|---:|"]
    times = {a.name: f"{a.seconds:.1f}" for a in result.attacks}
    for name, acc, settings in table_rows(result):
        lines.append(f"| {name} | {acc} | {settings} | {times.get(name, '')} |")
    lines += [
        "",
        f"Examples: {result.n} ({meta.get('split', 'test')} split"
        + (f", seeded subset, seed {meta['subset_seed']}" if meta.get("subset_seed") is not None else "")
        + f"). Total time: {result.seconds:.1f} s on {meta.get('device', '?')}.",
        "",
        "Robust accuracy counts an example only if it is classified correctly clean and under the attack;"
        " the worst case counts it only if every attack fails on it. Every adversarial example was checked"
        " to lie in the eps-ball and in [0, 1].",
    ]
    if meta.get("checkpoint"):
        lines += ["", f"Checkpoint: `{meta['checkpoint']}` (sha256 `{meta.get('checkpoint_sha256', '')}`)"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | Path, result: EvalResult, meta: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.md atomically into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "versions": versions(), **result_to_dict(result)}
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown_report(result, meta))
    return json_path, md_path
