"""`advmend train CONFIG [--set key=value ...] [--out DIR] [--resume]`.

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m advmend train CONFIG ...`; rank 0 alone prints
and runs the after-training evaluation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier from a YAML config (a path or a bundled name)")
    p.add_argument("config", help="YAML file or bundled config name (see `advmend list`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="output folder (default: out_dir from the config, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.safetensors")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advmend.config import load_run_config
    from advmend.training.run import train_and_evaluate

    cfg = load_run_config(args.config, args.overrides)
    out_dir = Path(args.out or cfg.out_dir or Path("runs") / cfg.name)
    train_and_evaluate(cfg, out_dir, resume=args.resume, main_rank=os.environ.get("RANK", "0") == "0")
    return 0
