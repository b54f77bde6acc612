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
    from advmend.cli.evaluate import undo_on_failure
    from advmend.config import load_run_config
    from advmend.data import dataset_info
    from advmend.evaluation.report import format_table
    from advmend.evaluation.run import evaluation_threat, load_trained_model, run_protocol
    from advmend.training.build import build_data, resolve_device
    from advmend.training.loop import train

    cfg = load_run_config(args.config, args.overrides)
    out_dir = Path(args.out or cfg.out_dir or Path("runs") / cfg.name)
    if cfg.pssr.enabled:  # PSSR dispatch: its own loop and three-threat-model evaluation (cli/pssr.py)
        from advmend.cli.pssr import train_pssr_command

        return train_pssr_command(cfg, out_dir, resume=args.resume)
    if cfg.eval.after_train:
        # Fail on a bad protocol or missing test split now, not after hours of training.
        from advmend.attacks.presets import PROTOCOLS

        PROTOCOLS.get(cfg.eval.protocol)
        build_data(cfg.data)  # the test split exists and matches the training split
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"advmend train: {cfg.name} -> {out_dir}")
    result = train(cfg, out_dir, resume=args.resume)
    if not main_rank:
        return 0
    print(f"checkpoints: {result.last} (last), {result.best} (best by train.select={cfg.train.select})")
    if cfg.eval.after_train:
        device = resolve_device(cfg.train.device)
        model, _, record = load_trained_model(result.best, device)
        test = build_data(cfg.data, need_train=False).test
        eval_dir = out_dir / f"eval-{cfg.eval.protocol}"
        with undo_on_failure(eval_dir):  # a failed evaluation leaves no half-written report
            eps = evaluation_threat(record, cfg.eval.norm, dataset_info(cfg.data.name)["eps"]).eps
            res = run_protocol(model, test, cfg, eps, device, eval_dir,
                               {"title": cfg.name, "checkpoint": str(result.best), "best_epoch": record["best"]["epoch"]},
                               progress=cfg.train.progress)  # fmt: skip
        print(format_table(res, f"\n{cfg.name}: best checkpoint (epoch {record['best']['epoch']}), "
                                f"{cfg.eval.protocol} protocol, test set"))  # fmt: skip
        print(f"report: {eval_dir / 'report.md'}, {eval_dir / 'report.json'}")
    return 0
