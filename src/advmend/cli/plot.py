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
    from advmend.io import check_input_path, check_output_path
    from advmend.training.curves import plot_curves, read_metrics

    records = read_metrics(check_input_path(args.run_dir, "run folder"))
    out = check_output_path(args.out or Path(args.run_dir) / "curves.png", "--out", folder=False)
    plot_curves(records, out, title=Path(args.run_dir).resolve().name)
    print(f"wrote {out} ({len(records)} epochs)")
    return 0
