"""`advmend eval`: evaluate a checkpoint, or a user's own model, and write its report card.

    advmend eval CHECKPOINT [--protocol NAME] [--n-examples N] [--set key=value ...] [--out DIR]
    advmend eval --model module:function --weights FILE --dataset cifar10 [--eps 8/255] [--norm linf]
    advmend eval --model timm/resnet50 --weights FILE --dataset folder --set data.options.path=DIR ...

Writes report.json, report.md and accuracy_vs_eps.png; the sanity suite runs with every evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from advmend.cli import add_set_flag


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's (or your model's) robustness on the test set")
    p.add_argument("checkpoint", nargs="?", help="a .safetensors checkpoint written by advmend train")
    p.add_argument("--model", help="your own model instead of a checkpoint: module:function returning an nn.Module "
                                   "([0,1] images in, logits out), or a library model timm/ARCH or torchvision/ARCH "
                                   "(--set model.* applies to it)")  # fmt: skip
    p.add_argument("--weights", help="weights of --model: .safetensors, or a .pt/.pth state dict of tensors")
    p.add_argument("--dataset", help="data set of --model (default cifar10; see `advmend list`)")
    p.add_argument(
        "--eps", help="attack radius, e.g. 8/255 (default: the checkpoint's, or the data set's threat model)"
    )
    p.add_argument("--norm", choices=("linf", "l2", "l1"), help="threat model (default linf)")
    p.add_argument("--protocol", help="attack protocol (see `advmend list`); default: the run's eval.protocol")
    p.add_argument("--n-examples", type=int, help="evaluate a seeded subset of this many test examples")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    add_set_flag(p, "override a data or eval setting, e.g. --set data.root=DIR (repeatable)")
    p.add_argument("--out", help="report folder (default: next to the checkpoint, eval-<protocol>)")
    p.add_argument("--sanity-full", action="store_true", help="also run the costly sanity checks S01-S04")
    p.add_argument(
        "--cascade",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each attack only on examples still robust (default: the protocol's choice)",
    )
    p.add_argument(
        "--transfer-from",
        metavar="CHECKPOINT",
        help="add a transfer attack: PGD-20 crafted on this surrogate checkpoint",
    )
    p.add_argument("--save-adv", metavar="FILE", help="save the adversarial examples (.pt/.pth RobustBench layout, "
                                                     "or .safetensors)")  # fmt: skip
    p.add_argument("--no-plot", action="store_true", help="do not write accuracy_vs_eps.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _eps(text: str) -> float:
    """--eps: a number or a fraction such as 8/255 (parsed as config values are), > 0."""
    import math

    from advmend.errors import ConfigError
    from advmend.values import parse_number

    value = parse_number(text, "--eps")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"--eps must be a number > 0 (or a fraction like 8/255), got {text!r}")
    return value


def run(args: argparse.Namespace) -> int:
    from advmend.attacks.presets import PROTOCOLS
    from advmend.config import parse_overrides
    from advmend.errors import ConfigError
    from advmend.evaluation.checkpoint_eval import check_output, check_source, evaluate_source
    from advmend.models.external import is_external
    from advmend.training.build import resolve_device
    from advmend.training.run import prepare_evaluation

    library = args.model is not None and is_external(args.model)  # timm/ARCH: model.* settings apply too
    overrides = parse_overrides(args.overrides, sections=("data", "eval", "model") if library else ("data", "eval"))
    check_source(args.checkpoint, args.model, args.weights, args.dataset)
    if args.protocol:
        PROTOCOLS.get(args.protocol)
    for flag, value in (("--n-examples", args.n_examples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.out:  # before any work: an unusable --out used to fail only when the report was written
        check_output(Path(args.out), args.save_adv)
    eps = _eps(args.eps) if args.eps is not None else None
    device = resolve_device(args.device or "auto", "--device")
    # The flags are eval.* overrides on the same path as --set (applied after it), checked with the config.
    flags = {"protocol": args.protocol, "n_examples": args.n_examples, "batch_size": args.batch_size,
             "norm": args.norm, "cascade": args.cascade, "sanity_full": True if args.sanity_full else None,
             "plot": False if args.no_plot else None}  # fmt: skip
    overrides += [(f"eval.{key}", value) for key, value in flags.items() if value is not None]
    evaluate_source(checkpoint=args.checkpoint, model_ref=args.model, weights=args.weights, dataset=args.dataset,
                    overrides=overrides, eps=eps, device=device,
                    out=args.out, save_adv=args.save_adv, transfer_from=args.transfer_from,
                    prepare=prepare_evaluation, progress=not args.quiet,
                    log=(lambda _m: None) if args.quiet else print)  # fmt: skip
    return 0
