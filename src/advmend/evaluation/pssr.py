"""PSSR under three labelled threat models; the headline is the per-example worst over all of them.

PSSR is an input transformation, the family that adaptive attacks have broken before (Athalye et al.,
"Obfuscated Gradients Give a False Sense of Security", ICML 2018; Tramer et al., "On Adaptive Attacks
to Adversarial Example Defenses", NeurIPS 2020). ../shared/specs/pssr.md and evaluation.md ask for:

1. graybox: examples crafted on the classifier f alone (PGD's last iterate), then passed through PSSR;
2. whitebox BPDA, two ways, the stronger counting per example:
   - "whitebox-bpda-mask": the attack differentiates the real pipeline f(G(PS(x))); the mask is
     computed from a detached gradient, so it is a constant in the backward pass (straight-through)
     while gradients flow through (1 - M) * x, G and f;
   - "whitebox-bpda-identity": forward through PS and G, backward as if G(PS(x)) = x
     (`advmend.attacks.BPDA` with the identity stand-in);
3. transfer: examples crafted on an independently trained surrogate (a user checkpoint, or another
   seed of the classifier's own recipe trained and cached by `run_pssr_protocol`).

Every threat model is always listed: one that ran no attack (no surrogate; white box left out by the
caller) is marked "not run" with the reason, never shown at clean accuracy. The headline is the
per-example worst case over every attack that ran.

In eval mode the pipeline is deterministic (no dropout, eval-mode scorer), so EOT is not needed
(eot = 1). Every adversarial example is checked to lie in the ball and in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.attacks.adaptive import BPDA
from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD
from advmend.attacks.presets import protocol_attacks
from advmend.attacks.transfer import Transfer
from advmend.data import ArrayDataset, BatchLoader, subset
from advmend.defenses.pssr.pipeline import PSSRModel, PSSRPreprocess
from advmend.errors import ConfigError
from advmend.evaluation.evaluate import AttackResult, EvalResult, check_bound, evaluate
from advmend.evaluation.report import result_to_dict, settings_text, write_report_files
from advmend.evaluation.run import load_trained_model
from advmend.io import file_sha256, versions
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


def transfer_attack(
    source: nn.Module,
    target: nn.Module,
    ds: ArrayDataset,
    attack: PGD,
    clean_correct: torch.Tensor,
    *,
    label: str,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> tuple[AttackResult, torch.Tensor]:
    """Craft `attack` on `source`, score on `target`: (target's result, source's per-example correctness).

    Only the examples `target` classifies correctly when clean are attacked (as in `evaluate`). The
    crafted example is PGD's last iterate (the highest loss on the source), the usual transfer choice.
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
        return min(ran, key=self.threat_accuracy) if ran else None


def evaluate_pssr(
    model: PSSRModel,
    ds: ArrayDataset,
    attacks: list[PGD],
    *,
    surrogate: nn.Module | None = None,
    threat_models: tuple[str, ...] = (GRAYBOX, MASK, IDENTITY, TRANSFER),
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> PSSREvalResult:
    """Evaluate `model` under each threat model with each attack; see the module docstring.

    The transfer threat model runs only when a `surrogate` is given; otherwise it is listed as "not
    run". Gray-box and transfer use the PGD attacks of `attacks` (a protocol without one, such as
    AutoAttack alone, crafts with PGD-20 at its radius and norm, so gray-box and transfer still run);
    external attacks (AutoAttack) run under the two white-box threat models.
    """
    start = time.perf_counter()
    device = torch.device(device)
    labels = list(threat_models)
    crafters = [a for a in attacks if isinstance(a, PGD)]
    if not crafters and attacks:
        ref = attacks[0]
        crafters = [PGD(eps=ref.eps, steps=20, step_size=2.5 * ref.eps / 20, norm=ref.norm, name="PGD-20")]
    base = evaluate(model, ds, attacks if MASK in labels else [], batch_size=batch_size, device=device,
                    seed=seed, progress=progress)  # fmt: skip
    clean = base.clean_correct
    results = _relabel(base, MASK)
    if IDENTITY in labels:
        bpda = BPDA(PSSRPreprocess(model), model.classifier)
        results += _relabel(
            evaluate(bpda, ds, attacks, batch_size=batch_size, device=device, seed=seed, progress=progress), IDENTITY
        )
    out = PSSREvalResult(EvalResult(clean), labels)
    if TRANSFER in labels and surrogate is None:
        out.not_run[TRANSFER] = "no surrogate was given"
    generator = torch.Generator(device=device).manual_seed(seed)
    for label, source in ((GRAYBOX, model.classifier), (TRANSFER, surrogate)):
        if label not in labels or source is None:
            continue
        # Crafting on a source model needs the PGD core; external attacks (AutoAttack) run white-box only.
        for attack in crafters:
            res, src_ok = transfer_attack(source, model, ds, attack, clean, label=label, batch_size=batch_size,
                                          device=device, generator=generator, progress=progress)  # fmt: skip
            results.append(res)
            if label == GRAYBOX:
                out.classifier_graybox[attack.describe()["name"]] = src_ok
    if GRAYBOX in labels:
        loader = BatchLoader(ds, batch_size, shuffle=False, device=device)
        with torch.no_grad(), attack_mode(model.classifier):
            out.classifier_clean = torch.cat([(model.classifier(x).argmax(1) == y).cpu() for x, y in loader])
    out.result.attacks = results
    for t in labels:
        if not out.ran(t):
            out.not_run.setdefault(t, "no attack in the protocol")
    out.result.seconds = time.perf_counter() - start
    return out


def not_run_text(ev: PSSREvalResult) -> str:
    """Console lines for the threat models that ran no attack (the attack table lists only attacks)."""
    return "".join(f"{t}: {NOT_RUN} ({ev.not_run.get(t, '')})\n" for t in ev.threat_models if not ev.ran(t))


def report_dict(ev: PSSREvalResult, meta: dict) -> dict:
    """report.json: every number with its threat model, the headline and the per-example data."""
    r = ev.result
    payload = {"meta": meta, "versions": versions(), **result_to_dict(r)}
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
    return payload


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def markdown(ev: PSSREvalResult, meta: dict) -> str:
    """report.md: one row per (threat model, attack), the per-threat-model worst case and the headline."""
    r = ev.result
    lines = [f"# PSSR evaluation: {meta.get('title', '')}".rstrip(), ""]
    lines += ["| threat model | attack | accuracy (%) | settings | seconds |", "|---|---|---:|---|---:|"]
    lines.append(f"| none | clean | {100 * r.clean_accuracy:.2f} | | |")
    for t in ev.threat_models:
        if not ev.ran(t):
            lines.append(f"| {t} | {NOT_RUN} | {NOT_RUN} | {ev.not_run.get(t, '')} | |")
            continue
        for a in r.attacks:
            if a.settings.get("threat_model") != t:
                continue
            s = a.settings
            lines.append(f"| {t} | {s['name'].split('/', 1)[1]} | {100 * a.accuracy:.2f} | {settings_text(s)} "
                         f"| {a.seconds:.1f} |")  # fmt: skip
        lines.append(f"| {t} | worst case | {100 * ev.threat_accuracy(t):.2f} | per example | |")
    wb = ev.threat_accuracy(WHITEBOX)
    if wb is not None and sum(ev.ran(t) for t in WHITEBOX) > 1:
        lines.append(f"| whitebox | worst of the BPDA variants | {100 * wb:.2f} | per example | |")
    if r.attacks:
        lines.append(f"| **all** | **headline (worst case)** | **{100 * r.worst_accuracy:.2f}** | "
                     f"weakest: {ev.headline_threat} | |")  # fmt: skip
    lines += ["", "Threat models:"] + [f"- `{t}`: {THREAT_MODELS[t]}" for t in ev.threat_models]
    if ev.classifier_clean is not None:
        lines += ["", f"Undefended classifier f alone: clean {100 * float(ev.classifier_clean.float().mean()):.2f}%"
                  + "".join(f"; {k} gray-box examples {100 * float(v.float().mean()):.2f}%"
                            for k, v in ev.classifier_graybox.items())
                  + " (gray-box examples exist only for the examples PSSR classifies correctly)."]  # fmt: skip
    lines += [
        "",
        f"Examples: {r.n} ({meta.get('split', 'test')} split). Total time: {r.seconds:.1f} s on {meta.get('device', '?')}."
        " Robust accuracy counts an example only if PSSR classifies it correctly clean and under the attack;"
        " each worst case counts it only if every attack in its group fails. The pipeline is deterministic in"
        " eval mode (EOT not needed). Every adversarial example was checked to lie in the eps-ball and in [0, 1].",
    ]
    if meta.get("surrogate"):
        lines += ["", f"Transfer source: `{meta['surrogate']}` ({meta.get('surrogate_origin') or 'user'}; "
                  "an independently trained classifier: the same recipe with another seed when advmend trained it)."]
    if meta.get("checkpoint"):
        lines += ["", f"Checkpoint: `{meta['checkpoint']}` (sha256 `{meta.get('checkpoint_sha256', '')}`)"]
    return "\n".join(lines) + "\n"


def write_pssr_report(out_dir: str | Path, ev: PSSREvalResult, meta: dict) -> tuple[Path, Path]:
    """Write report.json and report.md atomically into `out_dir`."""
    return write_report_files(out_dir, report_dict(ev, meta), markdown(ev, meta))


def run_pssr_protocol(
    model: PSSRModel,
    test: ArrayDataset,
    cfg,
    eps: float,
    device: torch.device,
    out_dir: Path,
    meta: dict,
    progress: bool = True,
) -> PSSREvalResult:
    """The three-threat-model evaluation of a PSSR run on its test set (or the seeded
    `eval.n_examples` subset) with the `eval.protocol` attacks; writes report.json/.md to `out_dir`."""
    n = cfg.eval.n_examples
    if n is not None and n < 1:
        raise ConfigError(f"eval.n_examples must be >= 1, got {n}")
    ds = subset(test, n, cfg.eval.seed) if n is not None and n < len(test) else test
    # The commands fill pssr.surrogate with a trained-and-cached one when the user gave none
    # (`advmend.training.pssr_loop.transfer_surrogate`); without any, transfer is listed as "not run".
    source = Path(cfg.pssr.surrogate) if cfg.pssr.surrogate else None
    surrogate = None
    if source is not None:
        surrogate, _, s_record = load_trained_model(source, device)
        if s_record.get("config", {}).get("pssr", {}).get("enabled"):
            raise ConfigError(f"transfer surrogate {str(source)!r} is a PSSR checkpoint; give a classifier's checkpoint")
        # A surrogate of another data set would fail mid-attack (or, worse, "transfer" nonsense).
        check_data_fits_model(ds, image_shape=s_record.get("image_shape"), num_classes=s_record.get("num_classes"),
                              source=f"the transfer surrogate {str(source)!r}",
                              hint="give a surrogate trained on the same data set (pssr.surrogate, --transfer-from)")  # fmt: skip
        if len(ds):  # same image shape but another label space (e.g. CIFAR-100 vs CIFAR-10): also refused
            x = ds.images[:2].to(device).float().div_(255.0)
            with torch.no_grad(), attack_mode(model), attack_mode(surrogate):
                k_model, k_source = model(x).shape[1], surrogate(x).shape[1]
            if k_model != k_source:
                raise ConfigError(f"transfer surrogate {str(source)!r} predicts {k_source} classes but the PSSR model "
                                  f"{k_model}: give a surrogate trained on the same data set")  # fmt: skip
    ev = evaluate_pssr(model, ds, protocol_attacks(cfg.eval.protocol, eps, cfg.eval.norm), surrogate=surrogate,
                       batch_size=cfg.eval.batch_size, device=device, seed=cfg.eval.seed, progress=progress)  # fmt: skip
    meta = dict(meta, protocol=cfg.eval.protocol, eps=eps, norm=cfg.eval.norm, device=str(device), split="test",
                subset_seed=cfg.eval.seed if ds is not test else None,
                surrogate=str(source) if source is not None else None,
                surrogate_origin=meta.get("surrogate_origin", "user") if source is not None else None)  # fmt: skip
    if meta.get("checkpoint"):
        meta["checkpoint_sha256"] = file_sha256(meta["checkpoint"])
    write_pssr_report(out_dir, ev, meta)
    return ev
