"""Evaluate a trained model under a named protocol and write its report (shared by `train` and `eval`).

Every model goes through `run_protocol`: a classifier, an FSR model, a user's model, and a PSSR
pipeline (its three labelled threat models, `evaluation.pssr`, as a section of the same card)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import advmend.evaluation.pssr  # noqa: F401  (registers PSSR's evaluation section)
from advmend.attacks.presets import PROTOCOLS, protocol_attacks
from advmend.config import RunConfig, check_config
from advmend.data import subset
from advmend.data.arrays import ImageDataset
from advmend.defenses.registry import defense_of
from advmend.errors import ConfigError
from advmend.evaluation.corruptions import run_corruptions
from advmend.evaluation.evaluate import EvalResult, accuracy_curve, evaluate
from advmend.evaluation.load import load_trained_model  # noqa: F401  (where callers have always found it)
from advmend.evaluation.plots import accuracy_vs_eps_png
from advmend.evaluation.report import write_report
from advmend.evaluation.sanity import run_sanity
from advmend.evaluation.sections import SECTIONS
from advmend.io import atomic_write_bytes, file_sha256
from advmend.models import describe_normalization
from advmend.types import Radii, ThreatModel

ADV_SUFFIXES = (".pt", ".pth", ".safetensors")


def evaluation_threat(record: dict, norm: str, radii: Radii) -> ThreatModel:
    """The threat model to evaluate a checkpoint under when no eps is given: the one its training attack
    used (recorded with it) when `norm` is that attack's norm, else the data set's standard radius for
    `norm` (`radii`). Checkpoints from before the norm was recorded were trained under L-inf; a user's
    model has no training attack (no "eps" in its record) and is evaluated at the data set's radius."""
    if "eps" in record:
        trained = ThreatModel(record.get("norm", "linf"), float(record["eps"]))
        if trained.norm == norm:
            return trained
    return ThreatModel.resolve(norm, None, radii)


def save_adversarial(path: str | Path, result: EvalResult) -> str:
    """Write the worst-case adversarial examples in RobustBench's external-evaluation layout.

    RobustBench / AutoAttack's `eval.py` save `{'adv_complete': x_adv}` with `torch.save`: a dict holding
    one float tensor (N, C, H, W) in [0, 1], in the order of the evaluated examples, an example's clean
    image where no attack fooled it. advmend writes exactly that dict of plain tensors for .pt/.pth (it
    loads with `torch.load(weights_only=True)`: no pickled code), or the same tensor under the same key,
    plus `labels`, for .safetensors. Returns a description of the layout for the report.
    """
    path = Path(path)
    if path.suffix not in ADV_SUFFIXES:
        raise ConfigError(f"--save-adv needs a file ending in one of {ADV_SUFFIXES}, got {path.name!r}")
    if result.adv is None:
        raise ConfigError("no adversarial examples were kept (evaluate(..., keep_adv=True))")
    path.parent.mkdir(parents=True, exist_ok=True)
    assert result.adv is not None  # checked above
    adv = result.adv.contiguous()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        labels = result.labels
        assert labels is not None  # kept with the adversarial examples

        atomic_write_bytes(path, lambda tmp: save_file({"adv_complete": adv, "labels": labels.contiguous()}, tmp))
        return "safetensors: adv_complete (N, C, H, W) float32 in [0, 1], labels (N,) int64"
    atomic_write_bytes(path, lambda tmp: torch.save({"adv_complete": adv}, tmp))
    return "RobustBench external evaluation: torch.save({'adv_complete': (N, C, H, W) float32 in [0, 1]})"


def run_protocol(
    model: nn.Module,
    test: ImageDataset,
    cfg: RunConfig,
    eps: float,
    device: torch.device,
    out_dir: Path,
    meta: dict,
    progress: bool = True,
    *,
    extra_attacks: Sequence = (),
    save_adv: str | Path | None = None,
) -> EvalResult:
    """Evaluate on the test set (or its seeded `eval.n_examples` subset), run the sanity suite, and write
    report.json, report.md and accuracy_vs_eps.png (and the adversarial examples with `save_adv`).

    A defense with its own threat models (its `evaluation.sections.SECTIONS` entry) is evaluated by that
    entry. PSSR's (`evaluation.pssr.evaluate_pssr`; the transfer source is `cfg.pssr.surrogate`, "not
    run" without one): the card's attack rows are `<threat model>/<attack>` and its worst case is the
    headline; the sanity suite and the plot's sweep attack the whole pipeline (white box, mask
    constant); the card adds the threat-model table and the restoration quality of the clean images
    (`result.threats` holds them). `extra_attacks` are for the other models (a PSSR transfer source is
    `pssr.surrogate`)."""
    ev = cfg.eval
    check_config(ev)  # the rules of loading, for a config built or changed in Python
    n = ev.n_examples
    if save_adv is not None and Path(save_adv).suffix not in ADV_SUFFIXES:
        raise ConfigError(f"--save-adv needs a file ending in one of {ADV_SUFFIXES}, got {Path(save_adv).name!r}")
    ds = subset(test, n, ev.seed) if n is not None and n < len(test) else test
    options = PROTOCOLS.meta(ev.protocol)
    if options.get("corruptions"):  # no attacks: accuracy under common corruptions, its own card section
        meta = dict(meta, subset_seed=ev.seed if ds is not test else None)
        return run_corruptions(model, ds, cfg, device, out_dir, meta, progress, extra=(*extra_attacks, save_adv))
    cascade = options.get("cascade", False) if ev.cascade is None else ev.cascade
    costly = options.get("sanity_full", False) if ev.sanity_full is None else ev.sanity_full
    attacks = protocol_attacks(ev.protocol, eps, ev.norm) + list(extra_attacks)
    threats, defense = None, defense_of(cfg)
    if defense in SECTIONS:  # a defense with its own threat models (PSSR)
        if extra_attacks:
            raise ConfigError(
                f"a {defense} model's transfer source is a config key (--transfer-from), not an extra attack"
            )
        threats, result, attacked, meta = SECTIONS.get(defense)(model, ds, cfg, attacks, device, meta, progress, cascade,
                                                              save_adv is not None)  # fmt: skip
    else:
        result = evaluate(model, ds, attacks, batch_size=ev.batch_size, device=device, seed=ev.seed,
                          progress=progress, cascade=cascade, keep_adv=save_adv is not None)  # fmt: skip
        attacked = result
    t0 = time.perf_counter()
    sanity = run_sanity(model, ds, attacked, eps, ev.norm, costly=costly, batch_size=ev.batch_size,
                        device=device, seed=ev.seed)  # fmt: skip
    sanity_seconds = time.perf_counter() - t0
    # The picture's curve is its own cheap PGD sweep (a few eps on a seeded subset), recorded in
    # report.json. With eval.plot false (--no-plot) neither the sweep nor the PNG is made: the sweep
    # exists for the picture, and the sanity suite's S01 sweep is the check. Computed before anything
    # is written, so a failure leaves nothing half-written.
    curve = None
    if ev.plot:
        curve = accuracy_curve(model, ds, eps, ev.norm, batch_size=ev.batch_size, device=device, seed=ev.seed)
    meta = dict(meta, protocol=ev.protocol, eps=eps, norm=ev.norm, device=str(device), split="test",
                subset_seed=ev.seed if ds is not test else None, cascade=cascade, sanity_full=costly,
                timings={"evaluation_s": round(result.seconds, 3), "sanity_s": round(sanity_seconds, 3)},
                hardware={"device": str(device), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads()})  # fmt: skip
    meta["normalization"] = describe_normalization(model)
    if meta.get("checkpoint") and not meta.get("checkpoint_sha256"):
        meta["checkpoint_sha256"] = file_sha256(meta["checkpoint"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if curve is not None:
        meta["accuracy_vs_eps"] = curve
        points = list(zip(curve["eps"], curve["accuracy"]))
        label = f"{curve['attack']} sweep ({curve['n_examples']} examples)"
        extra = [("S01 sanity sweep, PGD-20", sanity.sweep)] if sanity.sweep else []
        marks = [(a.name, a.settings["eps"], 100 * a.accuracy) for a in result.attacks]
        note = accuracy_vs_eps_png(out_dir / "accuracy_vs_eps.png", points, marks=marks, label=label, extra=extra,
                                   title=f"{meta.get('title', '')} {ev.norm}".strip())  # fmt: skip
        meta["plot" if note is None else "plot_note"] = "accuracy_vs_eps.png" if note is None else note
    if save_adv is not None:
        meta["adv_layout"] = save_adversarial(save_adv, result)
        meta["adv_file"] = str(save_adv)
    section = None
    if threats is not None:
        hooks = SECTIONS.meta(defense)
        section = (hooks["report"](threats), hooks["markdown"](threats, meta))
    write_report(out_dir, result, meta, sanity, section=section)
    result.sanity, result.threats = sanity, threats
    return result
