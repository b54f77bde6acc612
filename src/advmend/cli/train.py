"""`advmend train CONFIG [--set key=value ...] [--out DIR] [--resume]`.

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m advmend train CONFIG ...`, or through a scheduler
`advmend train CONFIG --launcher slurm --nodes N --gpus-per-node G` (docs/cluster.md); rank 0 alone
prints and runs the after-training evaluation.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from advmend.cli import add_set_flag
from advmend.cli.launcher_flags import TRAIN_FLAGS, add_launcher_flags, check_launcher_flags, launch_train_command


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a classifier from a YAML config (a path or a bundled name)")
    p.add_argument("config", help="YAML file or bundled config name (see `advmend list`)")
    add_set_flag(p, "override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--out", help="output folder (default: out_dir from the config, else runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.safetensors")
    add_launcher_flags(p, study=False)
    p.set_defaults(func=run)


def run_launched(args: argparse.Namespace, resume: bool) -> int:
    """This command in one rank of a launched job (the launch set RANK, WORLD_SIZE, ... as torchrun does)."""
    launch = dict.fromkeys(TRAIN_FLAGS)  # the launch's flags are spent: this rank trains
    return run(argparse.Namespace(**{**vars(args), **launch, "launcher": None, "resume": resume}))


def run(args: argparse.Namespace) -> int:
    check_launcher_flags(args, TRAIN_FLAGS)
    if args.launcher:
        return launch_train_command(args, functools.partial(run_launched, args))
    from advmend.config import load_run_config
    from advmend.io import check_output_path
    from advmend.training.run import train_and_evaluate

    cfg = load_run_config(args.config, args.overrides)
    out_dir = check_output_path(args.out or cfg.out_dir or Path("runs") / cfg.name, "--out", folder=True)
    train_and_evaluate(cfg, out_dir, resume=args.resume, main_rank=os.environ.get("RANK", "0") == "0")
    return 0
