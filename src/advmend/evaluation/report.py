"""Reports: report.json for tools, report.md for people, and the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advmend.attacks.autoattack import autoattack_version
from advmend.evaluation.evaluate import EvalResult
from advmend.evaluation.sanity import SanityReport
from advmend.io import atomic_write_text, versions


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
                "max_perturbation": a.max_perturbation,
                **({"stages": a.stages} if a.stages else {}),
                **({"notes": a.notes} if a.notes else {}),
            }
            for a in result.attacks
        ],
        "worst_case": {
            "robust_accuracy": 100 * result.worst_accuracy,
            "attacks": [a.name for a in result.attacks],
        },
        "cascade": result.cascade,
        "seconds": round(result.seconds, 3),
    }
    if per_example:
        out["per_example"] = {
            "clean": result.clean_correct.int().tolist(),
            **{a.name: a.correct.int().tolist() for a in result.attacks},
            "worst_case": result.worst_correct.int().tolist(),
        }
    return out


def settings_text(s: dict) -> str:
    """One line of an attack's exact settings."""
    if "version" in s:  # AutoAttack
        extra = (f"{s['norm']} eps={s['eps']:.4g} version={s['version']} n_iter={s['n_iter']} "
                 f"square_queries={s['n_queries']} eot={s['eot']} seed={s['seed']} ({s['implementation']})")  # fmt: skip
    else:
        extra = f"{s['norm']} eps={s['eps']:.4g} steps={s['steps']} step={s['step_size']:.4g} loss={s['loss']}"
        if s.get("targeted"):
            extra += " targeted"
        if s["random_start"]:
            extra += " rand-start"
        if s["restarts"] > 1:
            extra += f" restarts={s['restarts']}"
        if s.get("eot", 1) > 1:
            extra += f" eot={s['eot']}"
        if s.get("surrogate"):
            extra += f" surrogate={s['surrogate']}"
    if s.get("cascade"):
        extra += " [cascade]"
    return extra


def table_rows(result: EvalResult, sanity: SanityReport | None = None) -> list[tuple[str, str, str]]:
    """(name, accuracy %, settings) rows: clean, each attack (and its sub-attacks), worst case."""
    rows = [("clean", f"{100 * result.clean_accuracy:.2f}", "")]
    for a in result.attacks:
        rows.append((a.name, f"{100 * a.accuracy:.2f}", settings_text(a.settings)))
        for st in a.stages:
            rows.append((f"  after {st['name']}", f"{st['robust_accuracy']:.2f}",
                         f"{st['attacked']} examples attacked, {st['seconds']:.1f} s"))  # fmt: skip
    if result.attacks:
        note = "per example, over all attacks above"
        if result.cascade:
            labelled = any("threat_model" in a.settings for a in result.attacks)
            note += ("; [cascade]: each attack ran only on examples robust to all attacks above it"
                     + (" in its threat model" if labelled else ""))  # fmt: skip
        if sanity is not None and sanity.warnings:
            note += "; SANITY WARNINGS: " + ", ".join(c.code for c in sanity.warnings) + " (see below)"
        rows.append(("worst case", f"{100 * result.worst_accuracy:.2f}", note))
    return rows


def format_table(result: EvalResult, title: str = "", sanity: SanityReport | None = None) -> str:
    """A fixed-width table for the console (with the sanity warnings under it)."""
    rows = [("attack", "accuracy %", "settings")] + table_rows(result, sanity)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [title] if title else []
    for i, (a, b, c) in enumerate(rows):
        lines.append(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip())
        if i == 0:
            lines.append("-" * (w0 + w1 + 4 + max(len(r[2]) for r in rows)))
    lines.append(f"{result.n} examples, {result.seconds:.1f} s")
    if sanity is not None:
        counts = {k: sum(c.status == k for c in sanity.checks) for k in ("pass", "warn", "skip")}
        lines.append(f"sanity: {counts['pass']} pass, {counts['warn']} warn, {counts['skip']} skip")
        for w in sanity.warnings:
            lines.append(f"  WARN {w.code}: {w.detail or w.values} -> {w.meaning}")
    return "\n".join(lines)


def sanity_markdown(sanity: SanityReport) -> list[str]:
    """The sanity table: code, result, measured values, what a warning means."""
    lines = ["## Sanity checks", "", "| check | result | measured | passes when | a warning suggests |",
             "|---|---|---|---|---|"]  # fmt: skip
    for c in sanity.checks:
        measured = c.detail or ", ".join(f"{k}={_short(v)}" for k, v in c.values.items())
        status = "**WARN**" if c.status == "warn" else c.status
        lines.append(f"| {c.code} | {status} | {measured} | {c.passes_when} | {c.meaning} |")
    lines += ["", "What each check means and what to do about a warning: docs/evaluation.md."]
    return lines


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_short(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        if len(v) > 8:
            return f"[{len(v)} items]"
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def markdown_report(
    result: EvalResult, meta: dict[str, Any], sanity: SanityReport | None = None, section: str = ""
) -> str:
    """report.md: the table a person reads first, then a model's own `section` (PSSR's threat models and
    restoration), the sanity table, then where it came from."""
    lines = [f"# advmend evaluation: {meta.get('title', '')}".rstrip(), ""]
    if sanity is not None and sanity.warnings:
        lines += [f"**{len(sanity.warnings)} sanity warning(s): {', '.join(c.code for c in sanity.warnings)}.** "
                  "The numbers below may overstate robustness; see the sanity table.", ""]  # fmt: skip
    lines += ["| attack | accuracy (%) | settings | seconds | images/s |", "|---|---:|---|---:|---:|"]
    times = {a.name: f"{a.seconds:.1f}" for a in result.attacks}
    speed = {a.name: f"{a.attacked / a.seconds:.1f}" for a in result.attacks if a.seconds > 0}
    for name, acc, settings in table_rows(result, sanity):
        lines.append(f"| {name} | {acc} | {settings} | {times.get(name, '')} | {speed.get(name, '')} |")
    if section:
        lines += [""] + section.rstrip("\n").split("\n")
    if sanity is not None:
        lines += [""] + sanity_markdown(sanity)
    notes = [n for a in result.attacks for n in a.notes]
    if notes:
        lines += ["", "AutoAttack's own checks flagged: " + "; ".join(notes)]
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
    if meta.get("model"):
        lines += ["", f"Model: `{meta['model']}`"]
    if meta.get("normalization"):
        n = meta["normalization"]
        stats = f": mean {_short(n['mean'])}, std {_short(n['std'])}" if "mean" in n else ""
        lines += ["", f"Input normalisation (inside the model; attacks work in [0, 1] pixels): {n['source']}{stats}"]
    if meta.get("plot"):
        lines += ["", f"![accuracy against eps]({meta['plot']})"]
    elif meta.get("plot_note"):
        lines += ["", meta["plot_note"]]
    if meta.get("adv_file"):
        lines += ["", f"Adversarial examples: `{meta['adv_file']}` ({meta.get('adv_layout', '')})"]
    return "\n".join(lines) + "\n"


def write_report(
    out_dir: str | Path,
    result: EvalResult,
    meta: dict[str, Any],
    sanity: SanityReport | None = None,
    *,
    section: tuple[dict[str, Any], str] | None = None,
) -> tuple[Path, Path]:
    """Write report.json and report.md atomically into `out_dir`: the one report card of every model.

    `section` is a model's own part of the card, (report.json keys, report.md text): PSSR's threat
    models and restoration (`evaluation.pssr.report_dict`, `markdown`). Its keys add to the card's,
    never replace one."""
    payload = {"meta": meta, "versions": _versions(), **result_to_dict(result)}
    if sanity is not None:
        payload["sanity"] = sanity.to_dict()
    extra, text = section if section is not None else ({}, "")
    clash = sorted(set(extra) & set(payload))
    if clash:
        raise ValueError(f"a report section may not replace the card's keys {clash}")
    payload.update(extra)
    return write_report_files(out_dir, payload, markdown_report(result, meta, sanity, text))


def write_report_files(out_dir: str | Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """report.json (`payload`) and report.md (`markdown`) in `out_dir`, each written atomically: the one
    writer of every evaluation report (`write_report`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "report.json", out / "report.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path


def _versions() -> dict[str, str]:
    out = versions()
    aa = autoattack_version()
    if aa is not None:
        out["pyautoattack"] = aa
    return out
