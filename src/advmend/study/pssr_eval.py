"""The study protocol for a PSSR run: the classifier alone and PSSR in front of it, on the same examples.

A PSSR row of a study (its config has `pssr.enabled`) is judged against the classifier it protects,
example by example: on the study's clean subset, f alone and the pipeline's clean accuracy
and the restoration quality of G(PS(x)) (PSNR, SSIM); on the attack subset, f alone under PGD-20 and
the pipeline under every threat model (gray-box, the two white-box BPDA variants, transfer from an
independently trained surrogate) with the same PGD-20; on the AutoAttack subset, AutoAttack standard
on the whole pipeline (white box, mask constant). The worst case is per example over every attack on
the pipeline. Each stage is cached next to the checkpoint like the classifier protocol's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from advmend.attacks.autoattack import AutoAttackSpec
from advmend.attacks.pgd import PGD
from advmend.attacks.presets import protocol_attacks
from advmend.data import take
from advmend.data.arrays import ImageDataset
from advmend.evaluation.evaluate import AttackResult, evaluate
from advmend.evaluation.load import load_trained_model
from advmend.evaluation.pssr import GRAYBOX, IDENTITY, MASK, THREAT_MODELS, TRANSFER, evaluate_pssr, restoration
from advmend.evaluation.sanity import run_sanity
from advmend.io import file_sha256
from advmend.study.protocols import STUDY_PROTOCOLS, subsets
from advmend.study.records import bits, cached_stage, percent

PGD20 = "PGD-20"  # the study's PGD (FSR paper settings), the one attack every threat model runs


def _entry(a: AttackResult, n: int) -> dict:
    return {"n": n, "accuracy": percent(a.correct), "correct": bits(a.correct), "settings": a.settings,
            "seconds": round(a.seconds, 2), **({"stages": a.stages} if a.stages else {})}  # fmt: skip


def evaluate_pssr_run(model, test: ImageDataset, eps: float, study, device, checkpoint: Path, surrogate: Path,
                      cache_dir: Path, progress: bool, log: Callable[[str], None], *, indices) -> dict:  # fmt: skip
    """The PSSR study protocol (module docstring) on the best checkpoint; `surrogate` is the transfer source,
    `indices` the (clean or None, attack, AutoAttack) subsets of the test split."""
    e = study.eval
    sha = file_sha256(checkpoint)
    clean_idx, att_idx, aa_idx = indices
    kw = dict(batch_size=e.batch_size, device=device, seed=e.seed, progress=progress)
    f = model.classifier
    pgd20 = [a for a in protocol_attacks("paper", eps, "linf") if isinstance(a, PGD) and a.name == PGD20]

    def clean_stage() -> dict:
        ds = test if clean_idx is None else take(test, clean_idx)
        pssr, alone = evaluate(model, ds, [], **kw), evaluate(f, ds, [], **kw)
        quality = restoration(model, ds, batch_size=e.batch_size, device=device)
        return {"n": pssr.n, "accuracy": percent(pssr.clean_correct), "correct": bits(pssr.clean_correct),
                "seconds": round(pssr.seconds, 2), "indices": None if clean_idx is None else clean_idx.tolist(),
                "classifier_alone": {"accuracy": percent(alone.clean_correct), "correct": bits(alone.clean_correct)},
                "restoration": {"psnr": round(quality["psnr"], 4), "ssim": round(quality["ssim"], 5),
                                "n": quality["n_examples"], "of": "G(PS(x)) against clean x (torchmetrics)",
                                **{k: None if quality.get(k) is None else round(quality[k], 4)
                                   for k in ("removed", "psnr_kept", "psnr_removed")},
                                "surgery_interpolated_accuracy": round(quality["accuracy"]["surgery_interpolated"], 2)}}  # fmt: skip

    def attack_stage() -> dict:
        ds = take(test, att_idx)
        source, _, _ = load_trained_model(surrogate, device)
        ev = evaluate_pssr(model, ds, pgd20, surrogate=source, threat_models=(GRAYBOX, MASK, IDENTITY, TRANSFER), **kw)
        alone = evaluate(f, ds, pgd20, **kw)
        out = {"indices": att_idx.tolist(), "clean_correct": bits(ev.result.clean_correct),
               "attacks": {a.name: _entry(a, ev.result.n) for a in ev.result.attacks},
               "classifier_alone": {"clean_correct": bits(alone.clean_correct), PGD20: _entry(alone.attacks[0], alone.n)}}  # fmt: skip
        if e.sanity:  # on the defended model under white-box PGD-20 (mask constant): the attack that reaches G
            rep = run_sanity(
                model,
                ds,
                ev.attacks_of(MASK),
                eps,
                "linf",
                costly=False,
                batch_size=e.batch_size,
                device=device,
                seed=e.seed,
            )
            out["sanity"] = [{"code": c.code, "status": c.status, "detail": c.detail} for c in rep.checks]
        return out

    def autoattack_stage() -> dict:
        res = evaluate(
            model, take(test, aa_idx), [AutoAttackSpec(eps=eps, norm="linf", seed=e.seed)], cascade=True, **kw
        )
        return {"entry": _entry(res.attacks[0], res.n), "clean_correct": bits(res.clean_correct)}

    cache_dir.mkdir(parents=True, exist_ok=True)
    clean = cached_stage(cache_dir / "pssr-clean.json", sha, clean_stage, log)
    att = cached_stage(cache_dir / "pssr-attacks.json", sha, attack_stage, log)
    attacks = dict(att["attacks"])
    aa = None
    if len(aa_idx) > 0:
        aa = cached_stage(cache_dir / "pssr-autoattack.json", sha, autoattack_stage, log)
        attacks[f"{MASK}/AutoAttack"] = aa["entry"]
    n_w = len(aa_idx) if len(aa_idx) > 0 else len(att_idx)
    worst = torch.tensor([c == "1" for c in att["clean_correct"][:n_w]])
    for entry in attacks.values():
        worst &= torch.tensor([c == "1" for c in entry["correct"][:n_w]])
    return {
        "kind": "pssr",
        "protocol": "study (PSSR): f alone and PSSR clean on clean_n (with PSNR/SSIM of G(PS(x))); PGD-20 (FSR paper "
        "settings) on f alone and on PSSR under gray-box, white-box BPDA (mask constant; identity) and "
        "transfer on attack_n; AutoAttack standard on the whole pipeline on autoattack_n; subsets are "
        "prefixes of one seeded permutation",
        "eps": eps,
        "norm": "linf",
        "seed": e.seed,
        "threat_models": THREAT_MODELS,
        "surrogate": {"file": surrogate.as_posix(), "sha256": file_sha256(surrogate)},
        "clean": {k: clean[k] for k in ("n", "accuracy", "correct", "seconds", "indices")},
        "restoration": clean["restoration"],
        "classifier_alone": {
            "clean": clean["classifier_alone"],
            PGD20: att["classifier_alone"][PGD20],
            "attack_clean_correct": att["classifier_alone"]["clean_correct"],
        },  # fmt: skip
        "attack_indices": att["indices"],
        "attacks": attacks,
        "worst_case": {"n": n_w, "accuracy": percent(worst), "correct": bits(worst), "attacks": list(attacks)},
        "sanity": att.get("sanity", []),
        "seconds": round(sum(s["stage_seconds"] for s in (clean, att, aa) if s is not None), 2),
    }


@STUDY_PROTOCOLS.register("pssr")
def pssr_protocol(model, test: ImageDataset, eps: float, study, device, checkpoint: Path, run_cfg, cache_dir: Path,
                  progress: bool, log: Callable[[str], None]) -> dict:  # fmt: skip
    """`evaluate_pssr_run` with the run's transfer source (`pssr.surrogate`, filled by `prepare_evaluation`)
    and the study's subsets."""
    return evaluate_pssr_run(model, test, eps, study, device, checkpoint, Path(run_cfg.pssr.surrogate), cache_dir,
                             progress, log, indices=subsets(len(test), study.eval))  # fmt: skip
