"""Evaluating a checkpoint (or a user's model) end to end: the one path of `advmend eval`, of the
evaluation after `advmend train`, and of `advmend.evaluate`.

`evaluate_source` loads what is evaluated (a checkpoint, or a user's model with its data set) and
applies the eval/data overrides to its run config; `evaluate_checkpoint` checks the output first,
finds the threat model and the test split, runs `evaluation.run.run_protocol` (attacks, sanity suite,
plot, report card) with its output removed on failure, and prints the console table. What differs
per defense is read from its registrations (`defenses.registry.DEFENSES`: label, report folder,
transfer source key; `evaluation.sections.SECTIONS`: its console lines). What only training can
provide (PSSR's default transfer surrogate) comes in as `prepare`
(`advmend.training.run.prepare_evaluation`), since evaluation never imports training.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

Prepare = Callable  # (cfg, checkpoint, meta, log) -> (cfg, meta)


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of `path` that does not exist yet (what writing there creates), or None."""
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def check_output(out_dir: Path, save_adv: str | None = None) -> None:
    """A one-line error, before any work, when the report folder (or --save-adv file) cannot be written
    (`io.check_output_path`: a name too long, a file in the way, no permission, a read-only file system)."""
    from advmend.errors import ConfigError
    from advmend.evaluation.run import ADV_SUFFIXES
    from advmend.io import check_output_path

    if save_adv and Path(save_adv).suffix not in ADV_SUFFIXES:  # before a PSSR transfer surrogate is trained
        raise ConfigError(f"--save-adv needs a file ending in one of {ADV_SUFFIXES}, got {Path(save_adv).name!r}")
    check_output_path(out_dir, "--out", folder=True)
    if save_adv:
        check_output_path(save_adv, "--save-adv", folder=False)


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
            assert adv is not None
            adv.unlink(missing_ok=True)
        if adv_top is not None:
            shutil.rmtree(adv_top, ignore_errors=True)
        if isinstance(e, (OSError, SafetensorError)):
            text = (e.strerror if isinstance(e, OSError) else None) or str(e).strip() or type(e).__name__
            why = text.splitlines()[0][:200]
            raise ConfigError(f"could not write the evaluation output ({why}); nothing of it was kept: "
                              "free disk space or choose another --out, then rerun") from None  # fmt: skip
        raise


def eval_dir(folder: Path, cfg) -> Path:
    """The report folder of a checkpoint in `folder`: eval-<protocol>, with the defense's prefix (eval-pssr-...)."""
    from advmend.defenses.registry import defense_meta

    return Path(folder) / f"eval-{defense_meta(cfg)['eval_prefix']}{cfg.eval.protocol}"


def check_source(checkpoint, model_ref, weights, dataset) -> None:
    """ConfigError unless exactly one of a checkpoint and a user's model is given, with --weights and
    --dataset only for the latter."""
    from advmend.errors import ConfigError

    if (checkpoint is None) == (model_ref is None):
        raise ConfigError(
            "advmend eval needs either a CHECKPOINT, or --model module:function or --model timm/ARCH (with --weights)"
        )
    if model_ref is None and (weights or dataset):
        raise ConfigError("--weights and --dataset go with --model; a checkpoint records its own")


def evaluate_source(
    *,
    checkpoint: str | Path | None = None,
    model_ref: str | None = None,
    weights: str | None = None,
    dataset: str | None = None,
    overrides: Sequence[tuple[str, object]] = (),
    eps: float | None = None,
    device=None,
    out: str | Path | None = None,
    save_adv: str | None = None,
    transfer_from: str | Path | None = None,
    prepare: Prepare | None = None,
    progress: bool = True,
    log=print,
):
    """Evaluate a checkpoint, or a user's model (`model_ref` "module:function" with `weights` and its
    `dataset`), or a library model by name (`model_ref` "timm/ARCH" or "torchvision/ARCH" with `weights`, or
    `model.pretrained` among the overrides), under its run config with `overrides` ((dotted key, value) pairs
    on eval.*, data.* and, for a library model, model.*) applied, on `device` (a torch.device; default CPU);
    the report goes to `out` (default: next to the checkpoint, `eval_dir`). Returns the `EvalResult`."""
    import torch

    from advmend.attacks.presets import PROTOCOLS
    from advmend.config import DataConfig, RunConfig, apply_overrides, from_dict, to_dict
    from advmend.defenses.registry import defense_meta
    from advmend.evaluation.load import load_trained_model
    from advmend.evaluation.user_model import load_library_model, load_user_model
    from advmend.models.external import is_external

    check_source(checkpoint, model_ref, weights, dataset)
    if out:  # before any work: an unusable --out used to fail only when the report was written
        check_output(Path(out), save_adv)
    dev = torch.device(device if device is not None else "cpu")
    if model_ref is not None and is_external(model_ref):
        model, cfg, meta = load_library_model(model_ref, weights, dataset, overrides, dev)
        record: dict = {}  # no training attack: evaluated at the data set's standard radius
    elif model_ref is not None:
        model, meta = load_user_model(model_ref, weights, dev)
        cfg = RunConfig(name=model_ref.partition(":")[2], data=DataConfig(name=dataset or "cifar10"))
        record = {}
    else:
        assert checkpoint is not None  # check_source: a checkpoint or a model reference
        model, cfg, record = load_trained_model(checkpoint, dev)
        meta = {"checkpoint": str(checkpoint), "epoch": record.get("epoch")}
    defense = defense_meta(cfg)
    overrides = list(overrides)
    if transfer_from and defense["transfer_key"]:  # a defense whose transfer source is a config key (PSSR)
        overrides.append((defense["transfer_key"], str(transfer_from)))
        transfer_from = None
    cfg = from_dict(RunConfig, apply_overrides(to_dict(cfg), overrides))
    PROTOCOLS.get(cfg.eval.protocol)
    if out:
        out_dir = Path(out)
    elif model_ref is not None:
        out_dir = Path(f"eval-{cfg.eval.protocol}-{cfg.name}")
    else:
        assert checkpoint is not None
        out_dir = eval_dir(Path(checkpoint).parent, cfg)
    source = checkpoint or model_ref
    label = f"{defense['label']} " if defense["label"] else ""
    heading = f"{cfg.name}: {label}{source}, {cfg.eval.protocol} protocol"
    return evaluate_checkpoint(model, cfg, record, out_dir=out_dir, device=dev, eps=eps, meta=meta, heading=heading,
                               checkpoint=checkpoint, source=source, save_adv=save_adv, transfer_from=transfer_from,
                               prepare=prepare, progress=progress, log=log)  # fmt: skip


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
    prepare: Prepare | None = None,
    progress: bool = True,
    log=print,
    console_sanity: bool = True,
):
    """The one evaluation of a model with its run config, for `advmend eval` (a checkpoint or a user's
    model) and for `advmend train` after training (`evaluate_after_training`, classifier and PSSR alike).

    eps: the radius; default the one the checkpoint was trained at (`evaluation_threat`), or the data
    set's for another norm. `prepare` adds what only training can provide (PSSR's transfer source:
    `pssr.surrogate`, else another seed of its classifier's recipe, trained once and cached); a model
    without its own transfer source key gets a PGD-20 transfer attack from `transfer_from`. Then the
    test split (checked to fit the model), `evaluation.run.run_protocol` (attacks, sanity suite, plot,
    `save_adv`, the report card) with its output removed on failure, and the console table. Returns the
    `EvalResult`.
    """
    from advmend.attacks.pgd import PGD
    from advmend.attacks.transfer import Transfer
    from advmend.data.sources import dataset_radii
    from advmend.defenses.registry import defense_of
    from advmend.evaluation.load import load_trained_model, test_split
    from advmend.evaluation.report import format_table
    from advmend.evaluation.run import evaluation_threat, run_protocol
    from advmend.evaluation.sections import SECTIONS
    from advmend.validate import check_data_fits_model

    out_dir = Path(out_dir)
    check_output(out_dir, save_adv)
    ev = cfg.eval
    extra = []
    if prepare is not None:
        cfg, meta = prepare(cfg, checkpoint, meta, log)
    test = test_split(cfg.data)
    check_data_fits_model(test, image_shape=record.get("image_shape"), num_classes=record.get("num_classes"),
                          model=model, device=device, source=source or checkpoint)  # fmt: skip
    if eps is None:  # the checkpoint's threat model, or the data set's (by its image size) for another norm
        eps = evaluation_threat(record, ev.norm, dataset_radii(cfg.data.name, test.image_shape, cfg.data.radii)).eps
    if transfer_from:
        surrogate, _, _ = load_trained_model(transfer_from, device)
        extra.append(Transfer(surrogate, PGD(eps=eps, steps=20, norm=ev.norm, name="PGD-20"), str(transfer_from)))
    with undo_on_failure(out_dir, save_adv):  # a failed evaluation leaves no half-written report
        result = run_protocol(model, test, cfg, eps, device, out_dir, dict(meta, title=cfg.name), progress=progress,
                              extra_attacks=extra, save_adv=save_adv)  # fmt: skip
    section = SECTIONS.meta(defense_of(cfg)) if result.threats is not None else None
    if section is not None:
        heading += ", rows labelled <threat model>/<attack>"
    print(format_table(result, heading, result.sanity if console_sanity else None))
    if section is not None:
        print(section["console"](result.threats), end="")
    if result.corruptions is not None:
        print(result.corruptions.console())
    print(f"report: {out_dir / 'report.md'}, {out_dir / 'report.json'}")
    return result
