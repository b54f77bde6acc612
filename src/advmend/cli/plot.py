"""`advmend plot RUN_DIR [--out FILE]`: loss and clean / robust validation accuracy curves as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and clean/robust accuracy curves (from metrics.jsonl) to PNG")
    p.add_argument("run_dir", help="an `advmend train` output folder")
    p.add_argument("--out", help="PNG file to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advmend.training.curves import plot_curves, read_metrics

    records = read_metrics(args.run_dir)
    out = Path(args.out) if args.out else Path(args.run_dir) / "curves.png"
    plot_curves(records, out, title=Path(args.run_dir).resolve().name)
    print(f"wrote {out} ({len(records)} epochs)")
    return 0
