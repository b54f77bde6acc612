"""Accuracy against eps, as a PNG next to the report (matplotlib, from the `plot` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from advmend.errors import ConfigError
from advmend.plotting import pyplot, save_png


def accuracy_vs_eps_png(path: str | Path, points: list[tuple[float, float]], *, title: str = "",
                        marks: Sequence[tuple[str, float, float]] = (), label: str = "accuracy",
                        extra: Sequence[tuple[str, list[tuple[float, float]]]] = ()) -> str | None:  # fmt: skip
    """Plot accuracy (%) against eps and write it atomically to `path`.

    Args:
        points: (eps, accuracy %) of the eps sweep (`evaluate.accuracy_curve`).
        marks: (label, eps, accuracy %) single points, e.g. each attack of the protocol.
        label: the legend entry of `points`, e.g. "PGD-10 sweep, 200 examples".
        extra: (label, points) further curves drawn dashed, e.g. the S01 sanity sweep.

    Returns:
        None when written, else why not (matplotlib missing), for the report.
    """
    try:
        plt = pyplot("the accuracy-vs-eps plot")
    except ConfigError:
        return "no plot: matplotlib is not installed (pip install 'advmend[plot]')"
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    if points:
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=label)
    for extra_label, extra_points in extra:
        if extra_points:
            xs, ys = zip(*sorted(extra_points))
            ax.plot(xs, ys, marker=".", linestyle="--", alpha=0.7, label=extra_label)
    for label, eps, acc in marks:  # at the same eps the labels would overlap: they go in the legend
        ax.scatter([eps], [acc], marker="x", zorder=3, label=f"{label}: {acc:.1f} %")
    ax.set_xlabel("eps")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title(title or "accuracy against eps", fontsize=9)
    if points or marks or any(p for _, p in extra):
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    save_png(fig, path)
    return None
