"""Training PSSR's regenerator against a frozen classifier (docs/pssr.md).

`train_pssr(cfg, out_dir)` describes G's training as a `training.stage.Stage` and runs it with the
classifier's loop (`advmend.training.loop.run_stage`): a progress bar, one log line and one
metrics.jsonl record per epoch, validation on the held-out split, `last` (with optimizer and RNG state,
for `--resume`) and `best` checkpoints written atomically, by the same code. The differences are PSSR's:

- the classifier f comes from `pssr.classifier` (a checkpoint) or, when that is null, is trained
  first in the same command by the classifier loop into `<out>/classifier/` with the `train` section;
- the regenerator G is trained with Adam (`pssr.lr`, cosine decay per step over `pssr.epochs`) on
  batches of `pssr.batch_size`, with adversarial examples made on the fly (`pssr.attack`, against f
  for `pssr.threat: graybox` or against the whole pipeline for `adaptive`);
- validation reports the pipeline's clean accuracy, its accuracy on `train.val_attack` examples
  crafted on f (gray-box) and on the pipeline itself (white box, mask constant), and their
  per-example worst case (`val_robust_acc`); `train.select: robust` selects on the gray-box accuracy
  among the epochs that keep PSSR's clean accuracy within 3 points of the classifier's (`pssr_selection`).

The checkpoints hold the whole pipeline (f and G) and a config whose `model`/`fsr` sections are the
classifier's, so `advmend eval` and `load_trained_model` rebuild it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from advmend.checkpoint import load_checkpoint
from advmend.config import PSSRConfig, RunConfig, from_dict, to_dict
from advmend.data import BatchLoader
from advmend.defenses.pssr.objective import PSSRObjective
from advmend.defenses.pssr.pipeline import PSSRModel, check_classifier_record, check_pssr_run, pipeline_for_training
from advmend.errors import CheckpointError, ConfigError
from advmend.evaluation.evaluate import evaluate
from advmend.evaluation.pssr import GRAYBOX, MASK, evaluate_pssr, restoration
from advmend.evaluation.run import load_trained_model
from advmend.io import file_sha256
from advmend.training.build import attack_threat, build_attack, build_data, resolve_device
from advmend.training.loop import LATEST, SELECT, TrainResult, check_train_config, log_line, run_stage, train
from advmend.training.precision import Precision
from advmend.training.run_folder import BEST, LAST, unchanged_except
from advmend.training.schedule import Schedule
from advmend.training.stage import Phase, Selection, Stage
from advmend.training.trainers import TRAINERS

CLASSIFIER_DIR = "classifier"


def _classifier(cfg: RunConfig, out_dir: Path, resume: bool, log) -> Path:
    """The classifier checkpoint: `pssr.classifier`, or one trained now into <out>/classifier/."""
    if cfg.pssr.classifier is not None:
        path = Path(cfg.pssr.classifier)
        if not path.is_file():
            raise CheckpointError(
                f"pssr.classifier: checkpoint {str(path)!r} not found (or set it to null to train one)"
            )
        return path
    clf_dir = out_dir / CLASSIFIER_DIR
    clf_cfg = replace(cfg, name=f"{cfg.name}-classifier", pssr=PSSRConfig())
    return _trained_classifier(clf_cfg, clf_dir, log, reuse=f"using the classifier already trained in {clf_dir}",
                               resume=f"resuming the classifier in {clf_dir}",
                               start=f"no pssr.classifier given: training the classifier first into {clf_dir}")  # fmt: skip


def _trained_classifier(cfg: RunConfig, out: Path, log: Callable[[str], None], *, reuse: str, resume: str,
                        start: str) -> Path:  # fmt: skip
    """The best checkpoint of classifier `cfg` in `out`: reused when that run is finished (all epochs, or
    stopped early), resumed when it was interrupted, trained from scratch otherwise."""
    if (out / LAST).exists():
        _, record = load_checkpoint(out / LAST)
        if record.get("epoch", 0) >= cfg.train.epochs or (record.get("early_stopping") or {}).get("stopped"):
            log(reuse)
            return out / BEST
        log(resume)
        return train(cfg, out, resume=True, log=log).best
    log(start)
    return train(cfg, out, resume=False, log=log).best


def train_pssr(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, log: Callable[[str], None] = print
) -> TrainResult:
    """Train the PSSR regenerator of `cfg` into `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir)
    p = cfg.pssr
    check_pssr_run(cfg)
    device = resolve_device(cfg.train.device)
    check_train_config(cfg, device)
    has_last = (out_dir / LAST).exists()
    if not resume and (has_last or (out_dir / CLASSIFIER_DIR / LAST).exists()):
        raise ConfigError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and not has_last and not (out_dir / CLASSIFIER_DIR / LAST).exists():
        raise CheckpointError(f"--resume: no {LAST} in {out_dir} to resume from")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a folder")
    data = build_data(cfg.data, need_test=False)  # fail on bad data before training anything
    info = data.info

    clf_path = _classifier(cfg, out_dir, resume, log)
    f, f_cfg, f_record = load_trained_model(clf_path, device)
    check_classifier_record(f_record, f"pssr.classifier: {clf_path}")
    if f_record["num_classes"] != info["num_classes"] or tuple(f_record["image_shape"]) != tuple(info["image_shape"]):
        raise ConfigError(
            f"pssr.classifier: {clf_path} was trained for {f_record['num_classes']} classes of shape "
            f"{tuple(f_record['image_shape'])}, but data {cfg.data.name!r} has {info['num_classes']} of "
            f"{tuple(info['image_shape'])}"
        )
    if (f_cfg.model, f_cfg.fsr) != (cfg.model, cfg.fsr):
        log(f"pssr.classifier: using the classifier's own model/fsr sections ({f_cfg.model.name}) from {clf_path}")
    # The saved config must rebuild the whole pipeline: f's architecture, this run's pssr section.
    cfg = replace(cfg, model=f_cfg.model, fsr=f_cfg.fsr, pssr=replace(p, classifier=str(clf_path)))
    stage = _regenerator_stage(cfg, out_dir, data, clf_path, f, device)
    # Resumed only when the regenerator has a `last`: --resume on a run killed while its classifier was
    # trained (resumed above) starts the regenerator's training.
    return run_stage(stage, out_dir, resume=resume and has_last, log=log)


def _regenerator_stage(cfg: RunConfig, out_dir: Path, data, clf_path: Path, f, device: torch.device) -> Stage:
    """G's stage: the pipeline with f frozen, Adam on `pssr.lr` with a cosine decay over the reconstruction
    pre-training and the adversarial epochs, PSSR's validation, and its resume rules."""
    p, t, info = cfg.pssr, cfg.train, data.info
    torch.manual_seed(t.seed)
    model = pipeline_for_training(cfg, f, info["num_classes"], info["image_shape"]).to(device)
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=p.lr)
    objective = PSSRObjective(
        build_attack(p.attack, info["radii"], keep_best=False), threat=p.threat, lambda_pix=p.lambda_pix,
        lambda_pix_clean=p.lambda_pix_clean, lambda_sem=p.lambda_sem, lambda_ce=p.lambda_ce, lambda_feat=p.lambda_feat,
        lambda_feat_clean=p.lambda_feat_clean, lambda_rd=p.lambda_rd, rdrop=p.rdrop,
    )  # fmt: skip
    # Reconstruction pre-training (pssr.pretrain_epochs): the first epochs train G to restore clean
    # images through the surgery (L_pix only, no attack), so the adversarial stage starts from a
    # restorer. One epoch counter over both phases keeps --resume exact.
    pretrain = PSSRObjective(None, lambda_pix=p.lambda_pix or 1.0, lambda_sem=0.0, lambda_feat=0.0, lambda_rd=0.0)
    total = p.pretrain_epochs + p.epochs
    val_attack = build_attack(t.val_attack, info["radii"], keep_best=True, name=f"PGD-{t.val_attack.steps}")
    loader = BatchLoader(data.train, p.batch_size, shuffle=True, device=device, augment=info["augment"],
                         drop_last=len(data.train) >= 2 * p.batch_size, seed=t.seed)  # fmt: skip
    weights = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    validate, selection = None, LATEST
    if data.val is not None:
        validate = lambda m: _validate(m, data.val, val_attack, cfg, device)  # noqa: E731
        selection = pssr_selection(t.select, f, data.val, cfg, device)
    # G's stage runs on one process with the classifier loop's precision switch (train.amp): the attack on
    # f, the surgery and both passes through G and f run under autocast. channels_last is left out: a quick
    # check on CPU found it slower for the U-Net (bf16's gain: python -m advmend.bench.pssr_speed --amp bf16).
    return Stage(
        name="pssr epoch", config=cfg, model=model, view=model,
        phases=(Phase(pretrain, p.pretrain_epochs, "pretrain"), Phase(objective, p.epochs, "adversarial")),
        optimizer=optimizer, schedule=Schedule(lr=p.lr, epochs=total, kind="cosine"),  # Adam, cosine (spec)
        loader=loader, device=device, precision=Precision(t.amp, device),
        validate=validate, val_every=t.val_every, selection=selection,
        record={
            "num_classes": info["num_classes"], "image_shape": list(info["image_shape"]),
            **asdict(attack_threat(p.attack, info["radii"])),
            "classifier": {"path": str(clf_path), "sha256": file_sha256(clf_path)},
        },
        check_resume=lambda record: _check_resume(out_dir, record, cfg, info, clf_path),
        checkpoint_bytes=weights + 2 * sum(q.numel() * q.element_size() for q in trainable),  # Adam: 2 slots
        progress=t.progress, lr_key="pssr.lr", log_line=_log_line,
    )  # fmt: skip


# PSSR's clean-accuracy goal: the pipeline's clean accuracy at most this many points below the classifier's alone.
CLEAN_GOAL_POINTS = 3.0


def pssr_selection(select: str, f, val_data, cfg: RunConfig, device) -> Selection:
    """PSSR's model selection for `train.select`.

    "robust" selects on what PSSR can provide: its gray-box validation accuracy (the attack crafted on
    f), among the epochs whose clean accuracy meets the goal (within CLEAN_GOAL_POINTS of f alone on
    the same split; epochs missing it rank below every one meeting it). White-box accuracy is recorded
    but does not select: behind PSSR a plain classifier's is 0 at every epoch, and a metric that is
    identically 0 would leave the choice to chance. "clean" and "last" select as for a classifier.
    """
    if select != "robust":
        return Selection(SELECT[select], f"{SELECT[select]} (train.select={select})")
    alone = 100 * evaluate(f, val_data, [], batch_size=cfg.eval.batch_size, device=device).clean_accuracy
    floor = alone - CLEAN_GOAL_POINTS

    def goal(rec: dict) -> bool:
        return rec.get("val_clean_acc", float("-inf")) >= floor

    return Selection(
        "val_graybox_acc",
        f"val_graybox_acc among epochs with val_clean_acc >= {floor:.2f} (the classifier's {alone:.2f} "
        f"- {CLEAN_GOAL_POINTS:g}) (train.select=robust)",
        goal,
    )


def _check_resume(out_dir: Path, record: dict, cfg: RunConfig, info: dict, clf_path: Path) -> dict:
    """ConfigError when the regenerator in `out_dir` cannot continue with `cfg`; else the config its
    continued checkpoints record (config.yaml is rewritten with it: pssr.epochs may change)."""
    p = cfg.pssr
    # A regenerator is built for one image shape and sits in front of one label space: pairing it
    # with a classifier (and data) of another one would fail deep inside load_state_dict.
    if (record.get("num_classes"), tuple(record.get("image_shape") or ())) != (
        info["num_classes"],
        tuple(info["image_shape"]),
    ):
        raise ConfigError(
            f"--resume: the regenerator in {out_dir} was trained for {record.get('num_classes')} classes of shape "
            f"{tuple(record.get('image_shape') or ())}, but classifier {str(clf_path)!r} and data {cfg.data.name!r} "
            f"have {info['num_classes']} of {tuple(info['image_shape'])}"
        )
    # The classifier is the same file content, wherever it lies now (a run folder that holds its own
    # classifier may have been moved): compared by the SHA-256 the run recorded.
    recorded = (record.get("classifier") or {}).get("sha256")
    if recorded is not None and recorded != file_sha256(clf_path):
        raise ConfigError(
            f"--resume: classifier {str(clf_path)!r} is not the one the regenerator in {out_dir} was "
            "trained in front of (another SHA-256); resume with that classifier, or start a new run"
        )
    # Every other setting as for a classifier run (a changed lr, loss weight or attack would continue
    # another recipe); pssr.epochs may change to train further, as train.epochs may for a classifier.
    epochs = unchanged_except(out_dir, record, cfg, ("pssr.epochs", "pssr.classifier")).get("pssr.epochs")
    if epochs is not None and p.pretrain_epochs + p.epochs <= record["epoch"]:
        raise ConfigError(
            f"--resume: pssr.epochs={p.epochs} ({epochs[0]} in the run), but the regenerator in {out_dir} has "
            f"already trained {record['epoch']} epochs: nothing would be trained; keep pssr.epochs as it was, "
            "or start a new run with another --out"
        )
    return to_dict(cfg)


def _log_line(rec: dict, epochs: int) -> str:
    """The classifier's epoch line, then PSSR's phase, reconstruction loss, removed share and PSNR."""
    psnr = f" val psnr {rec['val_psnr']:.2f} dB" if "val_psnr" in rec else ""
    return (
        log_line(rec, epochs)
        + f" | {rec['stage']} | pix {rec['pix_adv']:.4f} removed {100 * rec['removed']:.1f}%{psnr}"
    )


SURROGATE_DIR = "transfer-surrogate-seed{seed}"


def transfer_surrogate(cfg, checkpoint: Path, log=print) -> Path:
    """The default transfer source of a PSSR checkpoint: its classifier's recipe with the next seed,
    trained into `<checkpoint's folder>/transfer-surrogate-seed<N>/` and reused from there next time.

    "Independently trained" (docs/pssr.md): same architecture, data and training settings,
    another seed, so the transfer threat model needs no user input. The recipe is the classifier
    checkpoint's own config when that file is still there, else this run's model/fsr/train sections.
    """
    recipe = replace(cfg, pssr=PSSRConfig())
    clf = Path(cfg.pssr.classifier) if cfg.pssr.classifier else None
    if clf is not None and clf.is_file():
        _, record = load_checkpoint(clf)
        recipe = replace(from_dict(RunConfig, record["config"]), pssr=PSSRConfig())
    seed = recipe.train.seed + 1
    # Validated once, after its last epoch (which is then its best): a crafting source needs no epoch
    # selection, and per-epoch PGD validation would cost more than its training (the CPU study's plain
    # recipe: 1007 s of validation for 713 s of training).
    clf_cfg = replace(recipe, name=f"{cfg.name}-transfer-surrogate-seed{seed}", data=cfg.data,
                      train=replace(recipe.train, seed=seed, val_every=recipe.train.epochs),
                      eval=replace(recipe.eval, after_train=False))  # fmt: skip
    out = checkpoint.parent / SURROGATE_DIR.format(seed=seed)
    return _trained_classifier(clf_cfg, out, log, reuse=f"transfer surrogate: reusing {out / BEST}",
                               resume=f"transfer surrogate: resuming {out}",
                               start=f"transfer surrogate: no pssr.surrogate given, training the classifier's "
                                     f"recipe with seed {seed} into {out}")  # fmt: skip


def with_transfer_surrogate(cfg: RunConfig, checkpoint: str | Path, meta: dict, log=print) -> tuple[RunConfig, dict]:
    """(cfg, meta) for `evaluation.run.run_protocol`: the user's pssr.surrogate when set, else the default one of
    `transfer_surrogate`, so that every PSSR evaluation has its transfer threat model."""
    if cfg.pssr.surrogate:
        return cfg, dict(meta, surrogate_origin="user")
    path = transfer_surrogate(cfg, Path(checkpoint), log=log)
    origin = "trained by advmend (another seed of the classifier's recipe)"
    return replace(cfg, pssr=replace(cfg.pssr, surrogate=str(path))), dict(meta, surrogate_origin=origin)


def _validate(model: PSSRModel, val_data, attack, cfg: RunConfig, device) -> dict:
    """Pipeline accuracy on the validation split (clean, gray-box, white-box with the mask constant, worst)
    and the PSNR / SSIM of G(PS(x)) against the clean validation images."""
    quality = restoration(model, val_data, batch_size=cfg.eval.batch_size, device=device)  # G in eval mode
    ev = evaluate_pssr(model, val_data, [attack], threat_models=(GRAYBOX, MASK), batch_size=cfg.eval.batch_size,
                       device=device, seed=cfg.eval.seed)  # fmt: skip
    return {
        "val_clean_acc": 100 * ev.result.clean_accuracy,
        "val_graybox_acc": 100 * ev._ran_accuracy(GRAYBOX),
        "val_whitebox_acc": 100 * ev._ran_accuracy(MASK),
        "val_robust_acc": 100 * ev.result.worst_accuracy,
        "val_psnr": round(quality["psnr"], 3),
        "val_ssim": round(quality["ssim"], 4),
        "val_seconds": round(ev.result.seconds, 2),
    }


TRAINERS.register("pssr", prepare_evaluation=with_transfer_surrogate)(train_pssr)
