"""PSSR under three labelled threat models; the headline is the per-example worst over all of them.

PSSR is an input transformation, the family that adaptive attacks have broken before (Athalye et al.,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018; Tramer et al., "On Adaptive Attacks
to Adversarial Example Defenses", NeurIPS 2020). docs/pssr.md and docs/evaluation.md ask for:

1. graybox: examples crafted on the classifier f alone (PGD's last iterate), then passed through PSSR;
2. whitebox BPDA, two ways, the stronger counting per example:
   - "whitebox-bpda-mask": the attack differentiates the real pipeline f(G(PS(x))); the mask is
     computed from a detached gradient, so it is a constant in the backward pass (straight-through)
     while gradients flow through (1 - M) * x, G and f;
   - "whitebox-bpda-identity": forward through PS and G, backward as if G(PS(x)) = x
     (`advmend.attacks.BPDA` with the identity stand-in);
3. transfer: examples crafted on an independently trained surrogate (a user checkpoint, or another
   seed of the classifier's own recipe, trained and cached by the commands: `cli.evaluate`).

Every threat model is always listed: one that ran no attack (no surrogate; white box left out by the
caller) is marked "not run" with the reason, never shown at clean accuracy. The headline is the
per-example worst case over every attack that ran.

In eval mode the pipeline is deterministic (no dropout, eval-mode scorer), so EOT is not needed
(eot = 1). Every adversarial example is checked to lie in the ball and in [0, 1].

A PSSR checkpoint goes through the same evaluation as every other model (`evaluation.run.run_protocol`:
the sanity suite on the whole pipeline, the plot, `--save-adv`, the one report card); this module adds
the threat-model section of that card (`report_dict`, `markdown`) and the restoration quality of
clean images (`restoration`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.attacks.adaptive import BPDA
from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD
from advmend.attacks.transfer import Transfer, crafting_attacks
from advmend.config import RunConfig
from advmend.data import BatchLoader
from advmend.data.arrays import ImageDataset
from advmend.defenses.pssr.pipeline import PSSRModel, PSSRPreprocess, check_classifier_record
from advmend.defenses.pssr.regenerator import fill_holes
from advmend.errors import ConfigError
from advmend.evaluation.evaluate import AttackResult, EvalResult, check_bound, evaluate
from advmend.evaluation.image_quality import RestorationMeter
from advmend.evaluation.load import load_trained_model
from advmend.evaluation.sections import SECTIONS
from advmend.validate import check_data_fits_model

GRAYBOX, MASK, IDENTITY, TRANSFER = "graybox", "whitebox-bpda-mask", "whitebox-bpda-identity", "transfer"
THREAT_MODELS = {
    GRAYBOX: "crafted on the classifier alone, scored on PSSR",
    MASK: "white box: PGD through PS, G and f with the mask constant in the backward pass",
    IDENTITY: "white box: BPDA with the identity in place of the whole pre-processor",
    TRANSFER: "crafted on an independently trained surrogate, scored on PSSR",
}
WHITEBOX = (MASK, IDENTITY)  # the white-box threat model is the per-example worst of its BPDA variants
NOT_RUN = "not run"


class AdvStore:
    """Per example, the first adversarial example (over every threat model) that fooled PSSR; the clean
    image where none did: the worst-case examples `--save-adv` writes (`EvalResult.adv`)."""

    def __init__(self, ds: ImageDataset):
        self.adv = ds.images.float().div(255)
        self.labels = ds.labels.clone()
        self.filled = torch.zeros(len(ds), dtype=torch.bool)

    def put(self, idx: torch.Tensor, x_adv: torch.Tensor, fooled: torch.Tensor) -> None:
        """Examples `idx` (dataset positions) with their `x_adv`; keep those `fooled` not kept before."""
        idx, fooled = idx.cpu(), fooled.cpu()
        new = fooled & ~self.filled[idx]
        self.adv[idx[new]] = x_adv[new.to(x_adv.device)].detach().float().cpu()
        self.filled[idx[new]] = True

    def put_result(self, result: EvalResult) -> None:
        """The examples of an `evaluate(..., keep_adv=True)` that one of its attacks fooled."""
        fooled = result.clean_correct & ~result.worst_correct
        assert result.adv is not None  # evaluate(..., keep_adv=True)
        self.put(torch.arange(result.n), result.adv, fooled)


def transfer_attack(
    source: nn.Module,
    target: nn.Module,
    ds: ImageDataset,
    attack: PGD,
    clean_correct: torch.Tensor,
    *,
    label: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = False,
    store: AdvStore | None = None,
) -> tuple[AttackResult, torch.Tensor]:
    """Craft `attack` on `source`, score on `target`: (target's result, source's per-example correctness).

    Only the examples `target` classifies correctly when clean are attacked (as in `evaluate`). The
    crafted example is PGD's last iterate (the highest loss on the source), the usual transfer choice.
    With `store`, the crafted examples that fool `target` are kept there (`--save-adv`).
    """
    device = torch.device(device)
    craft = Transfer(source, attack)  # crafts with the last iterate, advmend's one transfer rule
    loader = BatchLoader(ds, batch_size, shuffle=False, device=device)
    correct, source_correct, offset = [], [], 0
    t0 = time.perf_counter()
    for x, y in tqdm(loader, desc=f"{label}/{attack.describe()['name']}", disable=not progress, leave=False):
        keep = clean_correct[offset : offset + x.shape[0]].to(device)
        offset += x.shape[0]
        robust, src_ok = torch.zeros_like(keep), torch.zeros_like(keep)
        idx = keep.nonzero().squeeze(1)
        if idx.numel():
            run = craft.run(target, x[idx], y[idx], device=device, batch_size=batch_size, generator=generator)
            check_bound(run.x_adv, x[idx], attack)
            robust[idx] = ~run.fooled
            if store is not None:
                store.put(idx.cpu() + offset - x.shape[0], run.x_adv, run.fooled)
            with torch.no_grad(), attack_mode(source):  # context: does the example still fool f itself?
                src_ok[idx] = source(run.x_adv).argmax(1) == y[idx]
        correct.append(robust.cpu())
        source_correct.append(src_ok.cpu())
    settings = dict(attack.describe(), name=f"{label}/{attack.describe()['name']}", threat_model=label,
                    final_iterate=True)  # fmt: skip
    result = AttackResult(settings, torch.cat(correct), time.perf_counter() - t0, int(clean_correct.sum()))
    return result, torch.cat(source_correct)


def _relabel(result: EvalResult, label: str) -> list[AttackResult]:
    return [replace(a, settings=dict(a.settings, name=f"{label}/{a.name}", threat_model=label)) for a in result.attacks]


@dataclass
class PSSREvalResult:
    """All threat models' attacks in one `EvalResult` (its worst case is the headline), plus the
    undefended classifier's accuracy on the gray-box examples (context, not part of the headline)."""

    result: EvalResult
    threat_models: list[str]
    classifier_clean: torch.Tensor | None = None
    classifier_graybox: dict[str, torch.Tensor] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)  # threat model -> why it ran no attack
    restoration: dict | None = None  # PSNR / SSIM of G(PS(x)) against clean x (`restoration`)

    def attacks_of(self, label: str | tuple[str, ...]) -> EvalResult:
        """The attacks of one threat model (or several) with the clean correctness, as an `EvalResult`:
        e.g. the white-box (mask constant) attacks the sanity suite reads next to the pipeline itself."""
        labels = (label,) if isinstance(label, str) else tuple(label)
        r = self.result
        return EvalResult(r.clean_correct, [a for a in r.attacks if a.settings.get("threat_model") in labels],
                          cascade=r.cascade)  # fmt: skip

    def ran(self, label: str) -> bool:
        return any(a.settings.get("threat_model") == label for a in self.result.attacks)

    def threat_accuracy(self, label: str | tuple[str, ...]) -> float | None:
        """Per-example worst case over the attacks of one threat model (or several), clean-correct
        included; None when none of them ran an attack (never the clean accuracy: that would pass an
        unattacked threat model off as robust)."""
        labels = (label,) if isinstance(label, str) else tuple(label)
        attacks = [a for a in self.result.attacks if a.settings.get("threat_model") in labels]
        if not attacks:
            return None
        worst = self.result.clean_correct.clone()
        for a in attacks:
            worst &= a.correct
        return float(worst.float().mean())

    @property
    def headline_threat(self) -> str | None:
        ran = [t for t in self.threat_models if self.ran(t)]
        return min(ran, key=self._ran_accuracy) if ran else None

    def _ran_accuracy(self, label: str) -> float:
        acc = self.threat_accuracy(label)
        assert acc is not None  # a threat model that ran
        return acc


def evaluate_pssr(
    model: PSSRModel,
    ds: ImageDataset,
    attacks: list[PGD],
    *,
    surrogate: nn.Module | None = None,
    threat_models: tuple[str, ...] = (GRAYBOX, MASK, IDENTITY, TRANSFER),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
    cascade: bool = False,
    keep_adv: bool = False,
) -> PSSREvalResult:
    """Evaluate `model` under each threat model with each attack; see the module docstring.

    The transfer threat model runs only when a `surrogate` is given; otherwise it is listed as "not
    run". Gray-box and transfer use the PGD attacks of `attacks` (a protocol without one, such as
    AutoAttack alone, crafts with PGD-20 at its radius and norm, so gray-box and transfer still run);
    external attacks (AutoAttack) run under the two white-box threat models.

    `cascade` runs each white-box attack only on the examples still robust to the earlier attacks of
    its own threat model (the protocol's choice, `eval.cascade`); gray-box and transfer attack every
    clean-correct example. `keep_adv` keeps the worst-case adversarial examples in `result.adv`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    labels = list(threat_models)
    crafters = crafting_attacks(attacks)
    store = AdvStore(ds) if keep_adv else None
    whitebox: dict[str, Any] = {"batch_size": batch_size, "device": device, "seed": seed, "progress": progress,
                "cascade": cascade, "keep_adv": keep_adv}  # fmt: skip
    base = evaluate(model, ds, attacks if MASK in labels else [], **whitebox)
    clean = base.clean_correct
    results = _relabel(base, MASK)
    if store is not None:
        store.put_result(base)
    if IDENTITY in labels:
        identity = evaluate(BPDA(PSSRPreprocess(model), model.classifier), ds, attacks, **whitebox)
        results += _relabel(identity, IDENTITY)
        if store is not None:
            store.put_result(identity)
    out = PSSREvalResult(EvalResult(clean, cascade=cascade), labels)
    if TRANSFER in labels and surrogate is None:
        out.not_run[TRANSFER] = "no surrogate was given"
    generator = torch.Generator(device=device).manual_seed(seed)
    for label, source in ((GRAYBOX, model.classifier), (TRANSFER, surrogate)):
        if label not in labels or source is None:
            continue
        # Crafting on a source model needs the PGD core; external attacks (AutoAttack) run white-box only.
        for attack in crafters:
            res, src_ok = transfer_attack(source, model, ds, attack, clean, label=label, batch_size=batch_size,
                                          device=device, generator=generator, progress=progress, store=store)  # fmt: skip
            results.append(res)
            if label == GRAYBOX:
                out.classifier_graybox[attack.describe()["name"]] = src_ok
    if GRAYBOX in labels:
        loader = BatchLoader(ds, batch_size, shuffle=False, device=device)
        with torch.no_grad(), attack_mode(model.classifier):
            out.classifier_clean = torch.cat([(model.classifier(x).argmax(1) == y).cpu() for x, y in loader])
    out.result.attacks = results
    if store is not None:
        out.result.adv, out.result.labels = store.adv, store.labels
    for t in labels:
        if not out.ran(t):
            out.not_run.setdefault(t, "no attack in the protocol")
    out.result.seconds = time.perf_counter() - start
    return out


def not_run_text(ev: PSSREvalResult) -> str:
    """Console lines for the threat models that ran no attack (the attack table lists only attacks)."""
    return "".join(f"{t}: {NOT_RUN} ({ev.not_run.get(t, '')})\n" for t in ev.threat_models if not ev.ran(t))


def restoration(
    model: PSSRModel, ds: ImageDataset, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> dict:
    """How PSSR treats the clean images of `ds`, the pipeline in eval mode (modes restored afterwards).

    PSNR (dB) and SSIM of G(PS(x)) against x, per image and averaged; PSNR pooled over the kept and over
    the removed pixels (`removed`: their fraction); and f's accuracy on x, on the surgery with its holes
    interpolated and no G (`fill_holes`: what removing the pixels alone costs) and on G(PS(x)), so a clean
    accuracy loss reads as the surgery's or the regenerator's.
    """
    meter = RestorationMeter()
    correct = dict.fromkeys(("classifier_alone", "surgery_interpolated", "pssr"), 0)
    with attack_mode(model):
        for x, y in BatchLoader(ds, batch_size, shuffle=False, device=torch.device(device)):
            _, mask, surgical = model.surgery(x)  # the score map needs gradients: outside no_grad
            with torch.no_grad():
                x_hat = model.regenerate(surgical, mask, x)
                meter.update(x_hat, x, removed=mask)
                inputs = (x, fill_holes(surgical, mask), x_hat)
                for key, image in zip(correct, inputs):
                    correct[key] += int((model.classifier(image).argmax(1) == y).sum())
    quality: dict[str, Any] = dict(meter.compute())
    quality["accuracy"] = {k: 100 * v / max(quality["n_examples"], 1) for k, v in correct.items()}
    return quality


def check_surrogate(model: PSSRModel, surrogate: nn.Module, record: dict, ds: ImageDataset, source: str,
                    device: torch.device | str = "cpu") -> None:  # fmt: skip
    """ConfigError unless `surrogate` (loaded from checkpoint `source`, with its `record`) can be the
    transfer source of `model` on `ds`: a classifier, of the same image shape and class count."""
    check_classifier_record(record, f"transfer surrogate {source!r}")
    # A surrogate of another data set would fail mid-attack (or, worse, "transfer" nonsense).
    check_data_fits_model(ds, image_shape=record.get("image_shape"), num_classes=record.get("num_classes"),
                          source=f"the transfer surrogate {source!r}",
                          hint="give a surrogate trained on the same data set (pssr.surrogate, --transfer-from)")  # fmt: skip
    if len(ds):  # same image shape but another label space (e.g. CIFAR-100 vs CIFAR-10): also refused
        x = ds.images[:2].to(device).float().div_(255.0)
        with torch.no_grad(), attack_mode(model), attack_mode(surrogate):
            k_model, k_source = model(x).shape[1], surrogate(x).shape[1]
        if k_model != k_source:
            raise ConfigError(f"transfer surrogate {source!r} predicts {k_source} classes but the PSSR model "
                              f"{k_model}: give a surrogate trained on the same data set")  # fmt: skip


def console_text(ev: PSSREvalResult) -> str:
    """The console lines under the attack table: threat models not run, the headline, the restoration."""
    text = not_run_text(ev)  # threat models without an attack: listed, never at clean accuracy
    if ev.result.attacks:
        text += (f"headline (worst over all threat models): {100 * ev.result.worst_accuracy:.2f}% "
                 f"(weakest: {ev.headline_threat})\n")  # fmt: skip
    if ev.restoration is not None:
        q = ev.restoration
        text += (
            f"restoration of clean images: PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.4f} ({q['n_examples']} images)\n"
        )
        text += "".join(f"  {line}\n" for line in restoration_breakdown(q))
    return text


def report_dict(ev: PSSREvalResult) -> dict:
    """The threat-model section of report.json (beside the card's keys): every threat model with its
    status and per-example worst case, the white-box and headline numbers, the undefended classifier's
    context and the restoration quality of clean images."""
    r = ev.result
    payload: dict[str, Any] = {}
    payload["threat_models"] = {
        t: {"description": THREAT_MODELS[t], "status": "run", "robust_accuracy": _pct(ev.threat_accuracy(t)),
            "attacks": [a.name for a in r.attacks if a.settings.get("threat_model") == t]}
        if ev.ran(t) else
        {"description": THREAT_MODELS[t], "status": NOT_RUN, "reason": ev.not_run.get(t, ""),
         "robust_accuracy": None, "attacks": []}
        for t in ev.threat_models
    }  # fmt: skip
    if any(t in ev.threat_models for t in WHITEBOX):
        payload["whitebox"] = {"definition": "per example, worst over the BPDA variants (and AutoAttack)",
                               "robust_accuracy": _pct(ev.threat_accuracy(WHITEBOX)),
                               "status": "run" if ev.threat_accuracy(WHITEBOX) is not None else NOT_RUN}  # fmt: skip
    if r.attacks:
        payload["headline"] = {
            "robust_accuracy": 100 * r.worst_accuracy,
            "definition": "per example, worst over every attack of every threat model",
            "weakest_threat_model": ev.headline_threat,
        }
    if ev.classifier_clean is not None:
        # Only examples PSSR classified correctly were attacked, so the undefended classifier's
        # numbers here are on that subset's crafted examples: context, not the classifier's own robustness.
        payload["undefended_classifier"] = {
            "clean_accuracy": 100 * float(ev.classifier_clean.float().mean()),
            "graybox_examples_accuracy": {k: 100 * float(v.float().mean()) for k, v in ev.classifier_graybox.items()},
            "note": "accuracy of f alone on the gray-box examples (crafted only on examples PSSR gets right)",
        }
    if ev.restoration is not None:
        payload["restoration"] = dict(ev.restoration, definition="G(PS(x)) against the clean test image x, "
                                      "pipeline in eval mode; PSNR (dB, data range 1) and SSIM per image, averaged; psnr_kept and "
                                      "psnr_removed pooled over the kept and the removed pixels (removed: their fraction); "
                                      "accuracy: f on x, on the surgery with its holes interpolated and no G, on G(PS(x))")  # fmt: skip
    return payload


def restoration_breakdown(q: dict) -> list[str]:
    """Where the restoration's error and the clean accuracy go (two sentences; none for an old record)."""
    lines = []
    if q.get("removed") is not None:
        db = lambda v: "no pixel" if v is None else f"{v:.2f} dB"  # noqa: E731
        lines.append(f"PSNR over the kept pixels {db(q['psnr_kept'])}, over the removed pixels "
                     f"({100 * q['removed']:.1f} % of them) {db(q['psnr_removed'])} (pooled over pixels).")  # fmt: skip
    if q.get("accuracy"):
        a = q["accuracy"]
        lines.append(f"f's accuracy on these images: {a['classifier_alone']:.2f} % on x, "
                     f"{a['surgery_interpolated']:.2f} % on the surgery with its holes interpolated (no G), "
                     f"{a['pssr']:.2f} % on G(PS(x)).")  # fmt: skip
    return lines


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def markdown(ev: PSSREvalResult, meta: dict | None = None) -> str:
    """The threat-model section of report.md (its attacks are the card's `<threat model>/<attack>` rows):
    each threat model's per-example worst case, or "not run" with the reason; the white-box worst case;
    the headline; the transfer source and the restoration of clean images."""
    r, meta = ev.result, meta or {}
    lines = ["## Threat models", "", "| threat model | attacks | robust accuracy (%) | what it is, or why not run |",
             "|---|---|---:|---|"]  # fmt: skip
    for t in ev.threat_models:
        if not ev.ran(t):
            lines.append(f"| {t} | {NOT_RUN} | {NOT_RUN} | {ev.not_run.get(t, '')} |")
            continue
        names = ", ".join(a.name.split("/", 1)[1] for a in r.attacks if a.settings.get("threat_model") == t)
        lines.append(f"| {t} | {names} | {100 * ev._ran_accuracy(t):.2f} | {THREAT_MODELS[t]} |")
    wb = ev.threat_accuracy(WHITEBOX)
    if wb is not None and sum(ev.ran(t) for t in WHITEBOX) > 1:
        lines.append(f"| whitebox | worst of the BPDA variants | {100 * wb:.2f} | per example |")
    if r.attacks:
        lines.append(f"| **all** | **headline (worst case)** | **{100 * r.worst_accuracy:.2f}** | "
                     f"per example, over every attack; weakest: {ev.headline_threat} |")  # fmt: skip
    if ev.classifier_clean is not None:
        lines += ["", f"Undefended classifier f alone: clean {100 * float(ev.classifier_clean.float().mean()):.2f}%"
                  + "".join(f"; {k} gray-box examples {100 * float(v.float().mean()):.2f}%"
                            for k, v in ev.classifier_graybox.items())
                  + " (gray-box examples exist only for the examples PSSR classifies correctly)."]  # fmt: skip
    lines += [
        "",
        "Robust accuracy counts an example only if PSSR classifies it correctly clean and under the attack;"
        " each worst case counts it only if every attack in its group fails; the headline is the card's"
        " worst case. The pipeline is deterministic in eval mode (EOT not needed). The sanity suite and the"
        " plot's sweep attack the whole pipeline (white box, mask constant).",
    ]
    if meta.get("surrogate"):
        lines += [
            "",
            f"Transfer source: `{meta['surrogate']}` ({meta.get('surrogate_origin') or 'user'}; "
            "an independently trained classifier: the same recipe with another seed when advmend trained it).",
        ]
    if ev.restoration is not None:
        q = ev.restoration
        lines += ["", "## Restoration of clean images", "",
                  " ".join([f"G(PS(x)) against the clean image x, pipeline in eval mode, over {q['n_examples']} "
                            f"evaluated test images: PSNR {q['psnr']:.2f} dB, SSIM {q['ssim']:.4f} (per image, "
                            "averaged; torchmetrics).", *restoration_breakdown(q)])]  # fmt: skip
    return "\n".join(lines) + "\n"


def evaluate_section(model: PSSRModel, ds: ImageDataset, cfg: RunConfig, attacks: list, device: torch.device,
                     meta: dict, progress: bool, cascade: bool, keep_adv: bool) -> tuple:  # fmt: skip
    """PSSR's section of `run_protocol`: its threat models on `ds` with the transfer source
    `cfg.pssr.surrogate` (checked to fit) and the restoration quality of its clean images; returns
    (threats, the card's result, the white-box attacks the sanity suite checks, `meta` with the
    surrogate's provenance)."""
    ev = cfg.eval
    # The commands fill pssr.surrogate with a trained-and-cached one when the user gave none
    # (`advmend.training.pssr_loop.with_transfer_surrogate`); without any, transfer is listed as "not run".
    source = str(cfg.pssr.surrogate) if cfg.pssr.surrogate else None
    surrogate = None
    if source is not None:
        surrogate, _, s_record = load_trained_model(source, device)
        check_surrogate(model, surrogate, s_record, ds, source, device)
    threats = evaluate_pssr(model, ds, attacks, surrogate=surrogate, batch_size=ev.batch_size, device=device,
                            seed=ev.seed, progress=progress, cascade=cascade, keep_adv=keep_adv)  # fmt: skip
    t0 = time.perf_counter()
    threats.restoration = dict(restoration(model, ds, batch_size=ev.batch_size, device=device),
                               seconds=round(time.perf_counter() - t0, 3))  # fmt: skip
    meta = dict(meta, surrogate=source, surrogate_origin=meta.get("surrogate_origin", "user") if source else None)
    return threats, threats.result, threats.attacks_of(MASK), meta  # the sanity suite: mask constant


SECTIONS.register("pssr", report=report_dict, markdown=markdown, console=console_text)(evaluate_section)
