"""`advmend eval CHECKPOINT [--protocol NAME] [--n-examples N] [--set key=value ...] [--out DIR]`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's robustness on the test set")
    p.add_argument("checkpoint", help="a .safetensors checkpoint written by advmend train")
    p.add_argument("--protocol", help="attack protocol (see `advmend list`); default: the run's eval.protocol")
    p.add_argument("--n-examples", type=int, help="evaluate a seeded subset of this many test examples")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data or eval setting, e.g. --set data.root=DIR (repeatable)")
    p.add_argument("--out", help="report folder (default: next to the checkpoint, eval-<protocol>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from advmend.attacks.presets import PROTOCOLS
    from advmend.config import RunConfig, apply_overrides, from_dict, to_dict
    from advmend.errors import ConfigError
    from advmend.evaluation.report import format_table
    from advmend.evaluation.run import load_trained_model, run_protocol
    from advmend.training.build import build_data, resolve_device

    for item in args.overrides:
        if not item.split("=", 1)[0].strip().startswith(("data.", "eval.")):
            raise ConfigError(f"advmend eval --set only changes data.* and eval.* settings, got {item!r}")
    device = resolve_device(args.device or "auto")
    model, cfg, record = load_trained_model(args.checkpoint, device)
    cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), args.overrides))
    ev = cfg.eval
    ev = replace(ev, protocol=args.protocol or ev.protocol)
    if args.n_examples is not None:
        ev = replace(ev, n_examples=args.n_examples)
    if args.batch_size is not None:
        ev = replace(ev, batch_size=args.batch_size)
    PROTOCOLS.get(ev.protocol)
    cfg = replace(cfg, eval=ev)
    test = build_data(cfg.data, need_train=False).test
    out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval-{ev.protocol}"
    result = run_protocol(model, test, cfg, record["eps"], device, out_dir,
                          {"title": cfg.name, "checkpoint": str(args.checkpoint), "epoch": record.get("epoch")},
                          progress=not args.quiet)  # fmt: skip
    print(format_table(result, f"{cfg.name}: {args.checkpoint}, {ev.protocol} protocol"))
    print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}")
    return 0
