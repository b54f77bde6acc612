"""FSR's gain over its baseline across every test study: one line per FSR row, per backbone, and a picture
of the AutoAttack gain against the training compute it cost.

A row counts when its records train FSR (config fsr.enabled) and its baseline's do not; the numbers are the
studies' own paired differences (`render.paired`: same test examples and seeds on both sides, 95 %
bootstrap interval), so the section cannot disagree with the study tables above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from advmend.study.render import MISSED, Study, _ci, _row_records, _rows, paired
from advmend.study.stats import mean_std

FSR_GAIN_PNG = "fsr_gain.png"
TITLE = "FSR's gain over its baseline, by backbone and training compute"
# Paired differences each FSR row reports, in this order (clean, the strongest attack, the worst case over
# every attack the row met, and the masking indicator).
GAIN_METRICS = ("clean", "AutoAttack", "worst", MISSED)
METHOD_NAMES = {"pgd_at": "PGD-AT", "trades": "TRADES", "mart": "MART", "fast_at": "fast AT"}


@dataclass(frozen=True)
class Gain:
    study: str
    row: str
    baseline: str
    backbone: str  # model name and width, e.g. "preact_resnet18 (width 16)"
    method: str  # the training method both rows share, e.g. "PGD-AT"
    weight: str  # FSR's loss weights, e.g. "0.3" (lambda_sep = lambda_rec) or "sep 1, rec 0.5"
    seeds: int  # seeds paired
    diffs: dict  # metric -> (mean, low, high) or None (a metric one side lacks)
    core_hours: float  # mean training cost of one FSR run: train seconds x torch threads / 3600
    baseline_core_hours: float


def _is_fsr(rec: dict) -> bool:
    return bool(((rec.get("config") or {}).get("fsr") or {}).get("enabled"))


def _backbone(rec: dict) -> str:
    model = (rec.get("config") or {}).get("model") or {}
    width = (model.get("options") or {}).get("width")
    return f"{model.get('name', '?')}" + (f" (width {width})" if width is not None else "")


def _weight(rec: dict) -> str:
    fsr = (rec.get("config") or {}).get("fsr") or {}
    sep, rec_ = fsr.get("lambda_sep", 1.0), fsr.get("lambda_rec", 1.0)
    return f"{sep:g}" if sep == rec_ else f"sep {sep:g}, rec {rec_:g}"


def _core_hours(recs: list[dict]) -> float:
    hours = [r["train"]["seconds"] * r["hardware"]["at_start"].get("torch_threads", 1) / 3600 for r in recs]
    return mean_std(hours)[0]


def fsr_gains(studies: list[Study]) -> list[Gain]:
    """Every FSR row of every test study paired with its non-FSR baseline, in study then row order."""
    out = []
    for study in studies:
        if study.definition.get("eval", {}).get("test") is False:
            continue  # a tuning study never saw the test split
        by_name = {r["name"]: r for r in _rows(study)}
        for row in _rows(study):
            base = by_name.get(row.get("baseline") or "")
            if base is None:
                continue
            recs, base_recs = _row_records(study, row), _row_records(study, base)
            if not recs or not base_recs or not all(map(_is_fsr, recs)) or any(map(_is_fsr, base_recs)):
                continue
            diffs = {m: paired(study, row, base, m) for m in GAIN_METRICS}
            seeds = max((d[0] for d in diffs.values() if d is not None), default=0)
            if not seeds:
                continue
            method = (recs[0].get("config") or {}).get("train", {}).get("method", "?")
            method = METHOD_NAMES.get(method, method)
            out.append(Gain(study.id, row["name"], base["name"], _backbone(recs[0]), method, _weight(recs[0]),
                            seeds, {m: (d[1] if d else None) for m, d in diffs.items()}, _core_hours(recs),
                            _core_hours(base_recs)))  # fmt: skip
    return out


def verdict(diff: tuple[float, float, float] | None) -> str:
    """What a paired interval says: above 0, below 0, or no measurable difference."""
    if diff is None:
        return "—"
    if diff[1] > 0:
        return "higher"
    if diff[2] < 0:
        return "lower"
    return "no measurable difference"


def gain_table(gains: list[Gain]) -> str:
    """Markdown: one line per FSR row, its paired differences against its baseline and the verdict on
    AutoAttack."""
    head = ["backbone", "FSR row − baseline", "FSR weight", "seeds", "train core-h (FSR / base)",
            *(f"Δ {m}" for m in GAIN_METRICS), "AutoAttack"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|" + "---:|" * len(GAIN_METRICS) + "---|"]
    for g in gains:
        cells = [g.backbone, f"`{g.study}`: {g.row} − {g.baseline}", g.weight, str(g.seeds),
                 f"{g.core_hours:.2f} / {g.baseline_core_hours:.2f}", *("—" if g.diffs[m] is None else _ci(g.diffs[m]) for m in GAIN_METRICS),
                 verdict(g.diffs["AutoAttack"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = (
    "Δ: FSR row − its baseline in percentage points, paired on the same test examples and seeds, mean and 95 % "
    'bootstrap interval (the study tables\' own numbers). "worst" is the per-example worst case over every '
    "attack the row met, FSR's adaptive attacks on its mask included where the row ran them. "
    f'"Δ {MISSED}" above 0: FSR raises the share of examples that survive PGD-20 but not AutoAttack, a sign '
    "that it hides weak points from a plain gradient attack (gradient masking) rather than removing them. "
    "Training compute: the mean training time of one run times its torch threads, on the CPUs the per-run "
    "tables name; these are wall-clock hours on a shared machine whose load differed between runs (the per-run "
    "tables give it), so the column places each row on the compute axis but does not measure FSR's own cost "
    "(`advmend bench --config CONFIG --set fsr.enabled=true` does, docs/performance.md)."
)


def render_gain(gains: list[Gain], png: str | None) -> str:
    """The results page's section (empty when no study has an FSR row with a finished pair)."""
    if not gains:
        return ""
    lines = [f"## {TITLE}", "",
             "Every FSR row of the test studies above against its baseline (the same training without FSR), "
             "collected in one place. The verdict reads the AutoAttack interval: higher or lower when it excludes "
             "0, otherwise no measurable difference at this sample size.", "", gain_table(gains), "", LEGEND, ""]  # fmt: skip
    if png:
        lines += [f"![FSR's AutoAttack gain against training compute]({png})", ""]
    return "\n".join(lines)


def plot_gain(gains: list[Gain], path: Path) -> None:
    """Δ AutoAttack (95 % interval) against the training compute of one FSR run, one marker per backbone."""
    from matplotlib.ticker import FuncFormatter

    from advmend.plotting import pyplot, save_png

    plt = pyplot("advmend results")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    markers = dict(zip(sorted({g.backbone for g in gains}), "osD^v<>"))
    for backbone, marker in markers.items():
        pts = [g for g in gains if g.backbone == backbone and g.diffs["AutoAttack"] is not None]
        if not pts:
            continue
        xs = [g.core_hours for g in pts]
        ys = [g.diffs["AutoAttack"][0] for g in pts]
        err = [[g.diffs["AutoAttack"][0] - g.diffs["AutoAttack"][1] for g in pts],
               [g.diffs["AutoAttack"][2] - g.diffs["AutoAttack"][0] for g in pts]]  # fmt: skip
        ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=backbone)
        for g, x, y in zip(pts, xs, ys):
            ax.annotate(f"{g.method}, λ {g.weight} ({g.seeds} seed{'s' if g.seeds != 1 else ''})", (x, y),
                        textcoords="offset points", xytext=(6, 4), fontsize=7)  # fmt: skip
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.margins(x=0.3)  # room for the labels right of the last point
    ax.set_xlabel("training compute of one FSR run (core-hours, log scale)")
    ax.set_ylabel("Δ AutoAttack vs baseline (points)")
    ax.set_title("FSR's AutoAttack gain (mean, 95 % paired bootstrap interval)")
    if ax.get_legend_handles_labels()[0]:  # rows without AutoAttack give no point
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
