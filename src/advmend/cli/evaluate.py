"""`advmend eval`: evaluate a checkpoint, or a user's own model, and write its report card.

    advmend eval CHECKPOINT [--protocol NAME] [--n-examples N] [--set key=value ...] [--out DIR]
    advmend eval --model module:function --weights FILE --dataset cifar10 [--eps 8/255] [--norm linf]

Writes report.json, report.md and accuracy_vs_eps.png; the sanity suite runs with every evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint's (or your model's) robustness on the test set")
    p.add_argument("checkpoint", nargs="?", help="a .safetensors checkpoint written by advmend train")
    p.add_argument("--model", help="your own model instead of a checkpoint: module:function returning an nn.Module "
                                   "([0,1] images in, logits out)")  # fmt: skip
    p.add_argument("--weights", help="weights of --model: .safetensors, or a .pt/.pth state dict of tensors")
    p.add_argument("--dataset", help="data set of --model (default cifar10; see `advmend list`)")
    p.add_argument("--eps", help="attack radius, e.g. 8/255 (default: the checkpoint's, or the data set's threat model)")
    p.add_argument("--norm", choices=("linf", "l2", "l1"), help="threat model (default linf)")
    p.add_argument("--protocol", help="attack protocol (see `advmend list`); default: the run's eval.protocol")
    p.add_argument("--n-examples", type=int, help="evaluate a seeded subset of this many test examples")
    p.add_argument("--batch-size", type=int, help="examples per forward pass")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data or eval setting, e.g. --set data.root=DIR (repeatable)")
    p.add_argument("--out", help="report folder (default: next to the checkpoint, eval-<protocol>)")
    p.add_argument("--sanity-full", action="store_true", help="also run the costly sanity checks S01-S04")
    p.add_argument("--cascade", action=argparse.BooleanOptionalAction, default=None,
                   help="run each attack only on examples still robust (default: the protocol's choice)")
    p.add_argument("--transfer-from", metavar="CHECKPOINT",
                   help="add a transfer attack: PGD-20 crafted on this surrogate checkpoint")
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


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (what writing there creates), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def check_output(out_dir: Path, save_adv: str | None = None) -> None:
    """ConfigError, before any work, when the report folder (or --save-adv file) cannot be written."""
    from advmend.errors import ConfigError
    from advmend.evaluation.run import ADV_SUFFIXES

    if save_adv and Path(save_adv).suffix not in ADV_SUFFIXES:  # before a PSSR transfer surrogate is trained
        raise ConfigError(f"--save-adv needs a file ending in one of {ADV_SUFFIXES}, got {Path(save_adv).name!r}")
    targets = [("--out", Path(out_dir), True)] + ([("--save-adv", Path(save_adv), False)] if save_adv else [])
    for flag, path, is_folder in targets:
        if is_folder and path.exists() and not path.is_dir():
            raise ConfigError(f"{flag} {path}: exists and is not a folder; give a folder for the report files "
                              "(report.json, report.md, accuracy_vs_eps.png)")  # fmt: skip
        if not is_folder and path.is_dir():
            raise ConfigError(f"{flag} {path}: is a folder; give a file name (e.g. adv.pt)")
        top = _first_missing(path if is_folder else path.parent)
        anc = path if is_folder and top is None else (top.parent if top is not None else path.parent)
        if not anc.is_dir():
            raise ConfigError(f"{flag} {path}: {anc} is a file, not a folder; choose another {flag}")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: folder {anc} is not writable; choose another {flag}")


@contextlib.contextmanager
def undo_on_failure(out_dir: Path, save_adv: str | None = None):
    """Remove what the evaluation wrote if it fails (nothing half-done stays), and turn a write failure
    (full disk, permissions) into one line: the folder it created, else the files it added to an
    existing folder, and a --save-adv file that did not exist before."""
    from safetensors import SafetensorError

    from advmend.errors import ConfigError

    out_dir = Path(out_dir)
    top = _first_missing(out_dir)
    before = set(out_dir.iterdir()) if top is None else set()
    adv = Path(save_adv) if save_adv else None
    adv_new, adv_top = (adv is not None and not adv.exists()), (_first_missing(adv.parent) if adv else None)
    try:
        yield
    except BaseException as e:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        else:
            for p in set(out_dir.iterdir()) - before:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        if adv_new:
            adv.unlink(missing_ok=True)
        if adv_top is not None:
            shutil.rmtree(adv_top, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            text = (e.strerror if isinstance(e, OSError) else None) or str(e).strip() or type(e).__name__
            why = text.splitlines()[0][:200]
            raise ConfigError(f"could not write the evaluation output ({why}); nothing of it was kept: "
                              "free disk space or choose another --out, then rerun") from None  # fmt: skip
        raise


def run(args: argparse.Namespace) -> int:
    from advmend.attacks.presets import PROTOCOLS
    from advmend.config import DataConfig, RunConfig, apply_overrides, from_dict, parse_overrides, to_dict
    from advmend.data.sources import dataset_info
    from advmend.errors import ConfigError
    from advmend.evaluation.run import load_trained_model
    from advmend.evaluation.user_model import load_user_model
    from advmend.training.build import resolve_device

    overrides = parse_overrides(args.overrides, sections=("data", "eval"))
    if (args.checkpoint is None) == (args.model is None):
        raise ConfigError("advmend eval needs either a CHECKPOINT or --model module:function (with --weights)")
    if args.model is None and (args.weights or args.dataset):
        raise ConfigError("--weights and --dataset go with --model; a checkpoint records its own")
    if args.protocol:
        PROTOCOLS.get(args.protocol)
    for flag, value in (("--n-examples", args.n_examples), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if args.out:  # before any work: an unusable --out used to fail only when the report was written
        check_output(Path(args.out), args.save_adv)
    eps = _eps(args.eps) if args.eps is not None else None
    device = resolve_device(args.device or "auto", "--device")
    if args.model is not None:
        model, meta = load_user_model(args.model, args.weights, device)
        cfg = RunConfig(name=args.model.partition(":")[2], data=DataConfig(name=args.dataset or "cifar10"))
        record = {"eps": dataset_info(cfg.data.name)["eps"]}
    else:
        model, cfg, record = load_trained_model(args.checkpoint, device)
        meta = {"checkpoint": str(args.checkpoint), "epoch": record.get("epoch")}
    # The flags are eval.* overrides on the same path as --set (applied after it), checked with the config.
    flags = {"protocol": args.protocol, "n_examples": args.n_examples, "batch_size": args.batch_size,
             "norm": args.norm, "cascade": args.cascade, "sanity_full": True if args.sanity_full else None,
             "plot": False if args.no_plot else None}  # fmt: skip
    overrides += [(f"eval.{key}", value) for key, value in flags.items() if value is not None]
    if args.transfer_from and cfg.pssr.enabled:  # PSSR's transfer threat model reads its surrogate from the config
        overrides.append(("pssr.surrogate", str(args.transfer_from)))
    cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), overrides))
    PROTOCOLS.get(cfg.eval.protocol)
    if args.out:
        out_dir = Path(args.out)
    elif args.model is not None:
        out_dir = Path(f"eval-{cfg.eval.protocol}-{cfg.name}")
    else:
        out_dir = eval_dir(Path(args.checkpoint).parent, cfg)
    source = args.checkpoint or args.model
    heading = f"{cfg.name}: {'PSSR ' if cfg.pssr.enabled else ''}{source}, {cfg.eval.protocol} protocol"
    evaluate_checkpoint(model, cfg, record, out_dir=out_dir, device=device, eps=eps, meta=meta, heading=heading,
                        checkpoint=args.checkpoint, source=source, save_adv=args.save_adv,
                        transfer_from=None if cfg.pssr.enabled else args.transfer_from, progress=not args.quiet,
                        log=(lambda _m: None) if args.quiet else print)  # fmt: skip
    return 0


def eval_dir(folder: Path, cfg) -> Path:
    """The report folder of a checkpoint in `folder`: eval-<protocol>, eval-pssr-<protocol> for PSSR."""
    return Path(folder) / f"eval-{'pssr-' if cfg.pssr.enabled else ''}{cfg.eval.protocol}"


def evaluate_checkpoint(
    model,
    cfg,
    record: dict,
    *,
    out_dir: Path,
    device,
    meta: dict,
    heading: str,
    eps: float | None = None,
    checkpoint: str | Path | None = None,
    source: str | Path | None = None,
    save_adv: str | None = None,
    transfer_from: str | Path | None = None,
    progress: bool = True,
    log=print,
    console_sanity: bool = True,
):
    """The one evaluation of a model with its run config, for `advmend eval` (a checkpoint or a user's
    model) and for `advmend train` after training (`evaluate_after_training`, classifier and PSSR alike).

    eps: the radius; default the one the checkpoint was trained at (`evaluation_threat`), or the data
    set's for another norm. A PSSR model gets its transfer source: `pssr.surrogate`, else another seed of
    its classifier's recipe, trained once and cached (`training.pssr_loop.with_transfer_surrogate`);
    another model gets a PGD-20 transfer attack from `transfer_from`. Then the test split (checked to fit
    the model), `evaluation.run.run_protocol` (attacks, sanity suite, plot, `save_adv`, the report card)
    with its output removed on failure, and the console table. Returns the `EvalResult`.
    """
    from advmend.attacks.pgd import PGD
    from advmend.attacks.transfer import Transfer
    from advmend.data.sources import dataset_info
    from advmend.evaluation.pssr import console_text
    from advmend.evaluation.report import format_table
    from advmend.evaluation.run import evaluation_threat, load_trained_model, run_protocol
    from advmend.training.build import build_data
    from advmend.training.pssr_loop import with_transfer_surrogate
    from advmend.validate import check_data_fits_model

    out_dir = Path(out_dir)
    check_output(out_dir, save_adv)
    ev = cfg.eval
    if eps is None:  # the checkpoint's threat model, or the data set's for another norm
        eps = evaluation_threat(record, ev.norm, dataset_info(cfg.data.name)["eps"]).eps
    extra = []
    if cfg.pssr.enabled:  # no surrogate given: another seed of the classifier's recipe (issue 10)
        cfg, meta = with_transfer_surrogate(cfg, checkpoint, meta, log=log)
    elif transfer_from:
        surrogate, _, _ = load_trained_model(transfer_from, device)
        extra.append(Transfer(surrogate, PGD(eps=eps, steps=20, norm=ev.norm, name="PGD-20"), str(transfer_from)))
    test = build_data(cfg.data, need_train=False).test
    check_data_fits_model(test, image_shape=record.get("image_shape"), num_classes=record.get("num_classes"),
                          model=model, device=device, source=source or checkpoint)  # fmt: skip
    with undo_on_failure(out_dir, save_adv):  # a failed evaluation leaves no half-written report
        result = run_protocol(model, test, cfg, eps, device, out_dir, dict(meta, title=cfg.name), progress=progress,
                              extra_attacks=extra, save_adv=save_adv)  # fmt: skip
    if result.threats is not None:
        heading += ", rows labelled <threat model>/<attack>"
    print(format_table(result, heading, result.sanity if console_sanity else None))
    if result.threats is not None:
        print(console_text(result.threats), end="")
    if result.corruptions is not None:
        print(result.corruptions.console())
    print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}")
    return result


def check_before_training(cfg) -> None:
    """With eval.after_train, fail on a bad protocol or a missing test split now, not after hours of
    training (a classifier's test split must also match its training split)."""
    from advmend.attacks.presets import PROTOCOLS
    from advmend.training.build import build_data

    if cfg.eval.after_train:
        PROTOCOLS.get(cfg.eval.protocol)
        build_data(cfg.data, need_train=not cfg.pssr.enabled)


def evaluate_after_training(cfg, best: Path, out_dir: Path):
    """`advmend train`'s evaluation of the best checkpoint with eval.after_train (classifier and PSSR):
    `evaluate_checkpoint` with the run's eval and data sections, into <out>/eval-[pssr-]<protocol>/."""
    from dataclasses import replace

    from advmend.evaluation.run import load_trained_model
    from advmend.training.build import resolve_device

    device = resolve_device(cfg.train.device)
    model, run_cfg, record = load_trained_model(best, device)
    run_cfg = replace(run_cfg, name=cfg.name, eval=cfg.eval, data=cfg.data)
    epoch = record["best"]["epoch"]
    meta = {"checkpoint": str(best), "best_epoch": epoch}
    heading = f"\n{cfg.name}: best checkpoint (epoch {epoch}), {cfg.eval.protocol} protocol, test set"
    return evaluate_checkpoint(model, run_cfg, record, out_dir=eval_dir(out_dir, run_cfg), device=device, meta=meta,
                               heading=heading, checkpoint=best, progress=cfg.train.progress,
                               console_sanity=False)  # fmt: skip
