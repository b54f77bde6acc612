"""The sanity suite run with every evaluation: checks that catch a misleading robustness number.

After Carlini et al., "On Evaluating Adversarial Robustness" (2019), Athalye, Carlini, Wagner,
"Obfuscated Gradients Give a False Sense of Security" (ICML 2018) and Croce & Hein's AutoAttack flags
(2020). Each check has a stable code, a status ("pass", "warn" or "skip"), the measured values, and a
one-line meaning of a warning; docs/evaluation.md says what to do about each one. A warning never hides
a number: it is printed next to it.

Cheap checks (a few forward/backward passes per example) run with every evaluation; the costly ones
(S01 eps sweep, S02 unbounded attack, S03 PGD-100 vs PGD-20, S04 restarts) run with protocol `full` or
`costly=True` (`advmend eval --sanity-full`).

Thresholds in points of accuracy are taken from the spec; on small subsets a single example is worth
more than that, so the tolerance is the larger of the spec's value and one example.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advmend.attacks.l1 import random_l1
from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, fgsm, pgd
from advmend.data.arrays import ImageDataset
from advmend.evaluation.evaluate import EvalResult, evaluate

PASS, WARN, SKIP = "pass", "warn", "skip"

# code -> (passes when, what a warning suggests). Codes are stable: reports and docs refer to them.
CHECKS: dict[str, tuple[str, str]] = {
    "S01-eps-sweep": (
        "accuracy never increases with eps over 0..4 eps and is <= 10 % at 4 eps",
        "gradient masking or too weak an attack: a real model loses accuracy as eps grows",
    ),
    "S02-unbounded": (
        "an attack with eps = 1 (the whole [0,1] box) misclassifies every example",
        "the attack cannot find the gradient direction: gradient masking or a broken attack",
    ),
    "S03-convergence": (
        "PGD-100 is not higher than PGD-20 and within 1 point of it (last iterates)",
        "PGD-20 has not converged (more steps needed) or the loss surface is obfuscated",
    ),
    "S04-restarts": (
        "5 random restarts change robust accuracy by <= 0.5 point",
        "a single run is unreliable: use restarts (protocol strong) or AutoAttack",
    ),
    "S05-fgsm-vs-pgd": (
        "iterative PGD accuracy <= FGSM accuracy",
        "a one-step attack beats an iterative one: gradient masking (Athalye et al. 2018)",
    ),
    "S06-square-vs-whitebox": (
        "black-box Square fools no example the white-box attacks missed",
        "the gradients mislead white-box attacks: gradient masking; try BPDA/EOT",
    ),
    "S07-noise": (
        "uniform noise of size eps changes accuracy by <= 2 points",
        "the model is fragile to random noise, or randomised: robust numbers may be inflated",
    ),
    "S08-determinism": (
        "two forward passes in eval mode give identical logits",
        "the model is randomised at test time: attack it with EOT or AutoAttack 'rand'",
    ),
    "S09-gradients": (
        "no example has an all-zero, NaN or inf input gradient",
        "gradients are masked (quantisation, saturation, non-differentiable pre-processing): use BPDA",
    ),
    "S10-bound": (
        "every adversarial example lies in the eps-ball and in [0,1] (asserted; a violation aborts)",
        "never a warning: a violation stops the evaluation with an error",
    ),
    "S11-logits": (
        "the model returns logits: outputs not all in [0,1], fewer than half the rows sum to 1",
        "softmax outputs flatten the cross-entropy gradient: return logits, move softmax out",
    ),
    "S12-eval-mode": (
        "after model.eval() no module is in train mode, a forward pass changes no buffer, "
        "and an example's logits do not depend on its batch-mates",
        "the model stays in train mode (BatchNorm batch statistics, dropout): fix its train()/eval()",
    ),
}


@dataclass
class Check:
    """One sanity check's outcome."""

    code: str
    status: str
    values: dict[str, Any] = field(default_factory=dict)
    detail: str = ""

    @property
    def passes_when(self) -> str:
        return CHECKS[self.code][0]

    @property
    def meaning(self) -> str:
        return CHECKS[self.code][1]

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), passes_when=self.passes_when, meaning=self.meaning)


@dataclass
class SanityReport:
    checks: list[Check] = field(default_factory=list)
    sweep: list[tuple[float, float]] = field(default_factory=list)  # (eps, accuracy %) for the plot

    def get(self, code: str) -> Check:
        return next(c for c in self.checks if c.code == code)

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARN]

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [c.to_dict() for c in self.checks],
                "eps_sweep": [{"eps": e, "accuracy": a} for e, a in self.sweep]}  # fmt: skip


def _sample(ds: ImageDataset, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = min(n, len(ds))
    return ds.images[:n].to(device).float().div_(255), ds.labels[:n].to(device)


def _slack(points: float, n: int) -> float:
    """The spec's tolerance in points, or one example when that is larger."""
    return max(points, 100.0 / max(n, 1))


def _accuracies(model, ds, attacks, batch_size, device, seed) -> list[float]:
    res = evaluate(model, ds, attacks, batch_size=batch_size, device=device, seed=seed)
    return [100 * a.accuracy for a in res.attacks]


# --------------------------------------------------------------------------- model contract checks


def check_logits_not_probabilities(model: nn.Module, x: torch.Tensor) -> Check:
    """The borderline cases `evaluate` lets through (it rejects a model whose every row is a
    probability vector): outputs all in [0, 1] (per-class sigmoids, or probabilities), or at least
    half the rows non-negative and summing to 1. Both flatten the attacks' loss gradients."""
    with attack_mode(model), torch.no_grad():
        out = model(x).float()
    in_unit = bool(((out >= -1e-6) & (out <= 1 + 1e-6)).all())
    row_sums = out.sum(1)
    prob_rows = float((((row_sums - 1).abs() < 1e-4) & (out >= -1e-6).all(1)).float().mean())
    values = {"min": float(out.min()), "max": float(out.max()), "probability_rows": prob_rows,
              "max_abs_row_sum_minus_1": float((row_sums - 1).abs().max())}  # fmt: skip
    status = WARN if in_unit or prob_rows >= 0.5 else PASS
    detail = "every output is in [0, 1]" if in_unit else f"{100 * prob_rows:.0f} % of the rows are probability vectors"
    return Check(
        "S11-logits", status, values, f"the model seems to return probabilities: {detail}" if status == WARN else ""
    )


def check_determinism(model: nn.Module, x: torch.Tensor) -> Check:
    with attack_mode(model), torch.no_grad():
        a, b = model(x), model(x)
    diff = float((a - b).abs().max())
    status = PASS if torch.equal(a, b) else WARN
    return Check("S08-determinism", status, {"max_abs_logit_difference": diff},
                 "two eval-mode passes differ: the model is randomised" if status == WARN else "")  # fmt: skip


def check_eval_mode(model: nn.Module, x: torch.Tensor) -> Check:
    with attack_mode(model), torch.no_grad():
        in_train = [name or "(root)" for name, m in model.named_modules() if m.training]
        before = {k: v.clone() for k, v in model.named_buffers()}
        full = model(x)
        changed = [k for k, v in model.named_buffers() if k in before and not torch.equal(before[k], v)]
        k = max(1, x.shape[0] // 2)
        alone = model(x[:k])
        # Run twice to tell batch dependence from randomness (S08's business): compare with a repeat.
        again = model(x[:k])
        scale = float(full.abs().max()) + 1e-12
        batch_gap = float((alone - full[:k]).abs().max()) / scale
        noise_gap = float((alone - again).abs().max()) / scale
    batch_dependent = x.shape[0] > 1 and noise_gap == 0 and batch_gap > 1e-4
    problems = []
    if in_train:
        problems.append(f"modules still in train mode after eval(): {', '.join(in_train[:5])}")
    if changed:
        problems.append(f"an eval-mode forward changed buffers: {', '.join(changed[:5])}")
    if batch_dependent:
        problems.append(f"logits depend on the batch (relative gap {batch_gap:.3g})")
    values = {"modules_in_train_mode": in_train, "buffers_changed": changed, "batch_relative_gap": batch_gap}
    return Check("S12-eval-mode", WARN if problems else PASS, values, "; ".join(problems))


def check_gradients(model: nn.Module, ds: ImageDataset, batch_size: int, device: torch.device) -> Check:
    zero: int | torch.Tensor = 0
    nonfinite: int | torch.Tensor = 0
    with attack_mode(model):
        for i in range(0, len(ds), batch_size):
            x = ds.images[i : i + batch_size].to(device).float().div_(255).requires_grad_(True)
            y = ds.labels[i : i + batch_size].to(device)
            loss = F.cross_entropy(model(x).float(), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, x)
            g = g.flatten(1)
            zero += (g == 0).all(1).sum()
            nonfinite += (~torch.isfinite(g)).any(1).sum()
    zero, nonfinite = int(zero), int(nonfinite)
    status = WARN if zero or nonfinite else PASS
    detail = f"{zero} examples with an all-zero input gradient, {nonfinite} with NaN/inf" if status == WARN else ""
    return Check("S09-gradients", status, {"all_zero": zero, "non_finite": nonfinite, "n": len(ds)}, detail)


def check_noise(model: nn.Module, ds: ImageDataset, eps: float, norm: str, clean_acc: float, batch_size: int,
                device: torch.device, seed: int) -> Check:  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    correct = 0
    with attack_mode(model), torch.no_grad():
        for i in range(0, len(ds), batch_size):
            x = ds.images[i : i + batch_size].to(device).float().div_(255)
            y = ds.labels[i : i + batch_size].to(device)
            if norm == "linf":
                noise = (2 * torch.rand(x.shape, device=device, generator=gen) - 1) * eps
            elif norm == "l1":
                noise = random_l1(x.shape, eps, device, x.dtype, gen)
            else:
                g = torch.randn(x.shape, device=device, generator=gen)
                noise = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1) * eps
            correct += (model((x + noise).clamp(0, 1)).argmax(1) == y).sum()
    noisy = 100 * int(correct) / len(ds)
    gap, tol = abs(noisy - clean_acc), _slack(2.0, len(ds))
    return Check("S07-noise", PASS if gap <= tol else WARN,
                 {"clean": clean_acc, "noisy": noisy, "tolerance": tol})  # fmt: skip


# --------------------------------------------------------------------------- attack checks


def _is_pgd(a) -> bool:
    """A white-box attack of the PGD core: not AutoAttack ("version") nor a transfer ("surrogate")."""
    return "steps" in a.settings and "version" not in a.settings and "surrogate" not in a.settings


def check_fgsm_vs_pgd(model, ds, result: EvalResult, eps, norm, batch_size, device, seed) -> Check:
    iterative = [a for a in result.attacks if _is_pgd(a) and a.settings["steps"] > 1]
    single = [a for a in result.attacks if _is_pgd(a) and a.settings["steps"] == 1 and a.settings["eps"] == eps]
    if result.cascade or not iterative:  # cascade numbers include earlier attacks: measure afresh
        fgsm_acc, pgd_acc = _accuracies(model, ds, [fgsm(eps, norm), PGD(eps=eps, steps=20, norm=norm, name="PGD-20")],
                                        batch_size, device, seed)  # fmt: skip
        source = "measured by the sanity suite"
    else:
        worst = result.clean_correct.clone()
        for a in iterative:
            worst &= a.correct
        pgd_acc = 100 * float(worst.float().mean())
        fgsm_acc = (
            100 * single[0].accuracy
            if single
            else _accuracies(model, ds, [fgsm(eps, norm)], batch_size, device, seed)[0]
        )
        source = "iterative attacks of the protocol"
    status = PASS if pgd_acc <= fgsm_acc else WARN
    return Check("S05-fgsm-vs-pgd", status, {"fgsm": fgsm_acc, "pgd": pgd_acc, "pgd_source": source})


def check_square(result: EvalResult) -> Check:
    for a in result.attacks:
        names = [s["name"] for s in a.stages]
        if "Square" in names:
            i = names.index("Square")
            before = a.stages[i - 1]["robust_accuracy"] if i else 100 * result.clean_accuracy
            after = a.stages[i]["robust_accuracy"]
            status = WARN if after < before - 0.2 else PASS  # AutoAttack's own threshold (0.2 points)
            return Check("S06-square-vs-whitebox", status, {"white_box": before, "after_square": after})
    return Check("S06-square-vs-whitebox", SKIP, {}, "AutoAttack (with Square) did not run")


def check_bound(result: EvalResult) -> Check:
    sizes = {a.name: a.max_perturbation for a in result.attacks if a.max_perturbation is not None}
    if not sizes:
        return Check("S10-bound", SKIP, {}, "no attack ran")
    eps = {a.name: a.settings["eps"] for a in result.attacks if a.name in sizes}
    return Check("S10-bound", PASS, {"max_perturbation": sizes, "eps": eps})


def check_eps_sweep(model, ds, eps, norm, batch_size, device, seed, clean_acc) -> tuple[Check, list]:
    factors = (0.5, 1.0, 2.0, 3.0, 4.0)
    cap = 1.0 if norm == "linf" else math.inf  # an L-inf radius of 1 already covers the whole box
    attacks = [PGD(eps=min(f * eps, cap), steps=20, norm=norm, name=f"PGD-20@{f:g}eps") for f in factors]
    accs = _accuracies(model, ds, attacks, batch_size, device, seed)
    sweep = [(0.0, clean_acc)] + [(a.eps, acc) for a, acc in zip(attacks, accs)]
    rises = [(e2, a2) for (e1, a1), (e2, a2) in zip(sweep, sweep[1:]) if a2 > a1]
    status = WARN if rises or sweep[-1][1] > 10.0 else PASS
    detail = (f"accuracy rises at eps {', '.join(f'{e:.4g}' for e, _ in rises)}; " if rises else "") + (
        f"{sweep[-1][1]:.2f} % at 4 eps" if sweep[-1][1] > 10.0 else ""
    )
    return Check("S01-eps-sweep", status, {"points": [[e, a] for e, a in sweep]}, detail.strip("; ")), sweep


def check_unbounded(model, ds, batch_size, device, seed) -> Check:
    (acc,) = _accuracies(model, ds, [PGD(eps=1.0, steps=20, name="PGD-20@eps1")], batch_size, device, seed)
    return Check("S02-unbounded", PASS if acc == 0 else WARN, {"accuracy": acc})


def _last_iterate_accuracy(model, ds, attack: PGD, batch_size, device) -> float:
    """Robust accuracy (%) scored on the attack's last iterate; clean mistakes count as not robust."""
    attack = replace(attack, keep_best=False, restarts=1)
    robust = 0
    for i in range(0, len(ds), batch_size):
        x = ds.images[i : i + batch_size].to(device).float().div_(255)
        y = ds.labels[i : i + batch_size].to(device)
        with attack_mode(model), torch.no_grad():
            ok = model(x).argmax(1) == y
        if ok.any():  # only clean-correct examples can be robust (as in `evaluate`)
            x_adv = pgd(model, x[ok], y[ok], attack, validate=False)
            with attack_mode(model), torch.no_grad():
                robust += (model(x_adv).argmax(1) == y[ok]).sum()
    return 100 * int(robust) / max(len(ds), 1)


def check_convergence(model, ds, eps, norm, batch_size, device) -> Check:
    """PGD-20 against PGD-100 (step eps/10, no random start, as the paper protocol), both scored on
    their last iterate.

    Scoring the best iterate instead (as the protocol does) would make the "not higher" clause
    unable to fire: deterministic PGD-100 repeats PGD-20's first 20 steps, so every example PGD-20
    fooled stays fooled. On the last iterates the clause catches an attack that drifts back out of
    the adversarial region as it keeps ascending (an obfuscated or misleading loss surface); the other
    clause catches a PGD-20 that has not converged. The protocol's numbers are therefore not reused.
    """
    step = eps / 10
    a20, a100 = (_last_iterate_accuracy(model, ds, PGD(eps=eps, steps=k, step_size=step, norm=norm,
                                                         random_start=False, name=f"PGD-{k}"),
                                        batch_size, device) for k in (20, 100))  # fmt: skip
    # "Not higher" up to one example: last iterates near the decision boundary may flip either way.
    higher_tol, gap_tol = _slack(0.0, len(ds)), _slack(1.0, len(ds))
    problems = []
    if a100 - a20 > higher_tol:
        problems.append(f"PGD-100 ({a100:.2f} %) is higher than PGD-20 ({a20:.2f} %): more steps undo the attack")
    if a20 - a100 > gap_tol:
        problems.append(f"PGD-100 is {a20 - a100:.2f} points below PGD-20: PGD-20 has not converged")
    values = {
        "pgd20": a20,
        "pgd100": a100,
        "scored_on": "last iterate",
        "tolerance": gap_tol,
        "higher_tolerance": higher_tol,
    }
    return Check("S03-convergence", WARN if problems else PASS, values, "; ".join(problems))


def check_restarts(model, ds, eps, norm, batch_size, device, seed) -> Check:
    one, five = _accuracies(model, ds, [PGD(eps=eps, steps=20, norm=norm, name="PGD-20"),
                                        PGD(eps=eps, steps=20, norm=norm, restarts=5, name="PGD-20x5")],
                            batch_size, device, seed)  # fmt: skip
    tol = _slack(0.5, len(ds))
    return Check("S04-restarts", PASS if abs(one - five) <= tol else WARN,
                 {"restarts_1": one, "restarts_5": five, "tolerance": tol})  # fmt: skip


def run_sanity(
    model: nn.Module,
    ds: ImageDataset,
    result: EvalResult,
    eps: float,
    norm: str = "linf",
    *,
    costly: bool = False,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> SanityReport:
    """Run the sanity suite on the evaluated examples `ds` next to their `result`.

    Args:
        model: the evaluated model.
        ds: the examples `result` was computed on.
        result: the evaluation, reused where it already holds a check's numbers.
        eps, norm: the threat model.
        costly: also run S01-S04 (a few hundred forward/backward passes per example).
    """
    device = torch.device(device)
    clean = 100 * result.clean_accuracy
    x, _ = _sample(ds, batch_size, device)
    report = SanityReport()
    add = report.checks.append
    # A model stuck in train mode updates its buffers (BatchNorm statistics) on every forward pass;
    # the suite puts them back so that checking a model never changes it.
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    try:
        _run_checks(model, ds, result, eps, norm, costly, batch_size, device, seed, clean, x, report, add)
    finally:
        live = dict(model.named_buffers())
        with torch.no_grad():
            for k, v in buffers.items():
                live[k].copy_(v)
    return report


def _run_checks(model, ds, result, eps, norm, costly, batch_size, device, seed, clean, x, report, add) -> None:
    if costly:
        check, report.sweep = check_eps_sweep(model, ds, eps, norm, batch_size, device, seed, clean)
        add(check)
        add(check_unbounded(model, ds, batch_size, device, seed))
        add(check_convergence(model, ds, eps, norm, batch_size, device))
        add(check_restarts(model, ds, eps, norm, batch_size, device, seed))
    else:
        for code in ("S01-eps-sweep", "S02-unbounded", "S03-convergence", "S04-restarts"):
            add(Check(code, SKIP, {}, "costly: run with --sanity-full or protocol full"))
    add(check_fgsm_vs_pgd(model, ds, result, eps, norm, batch_size, device, seed))
    add(check_square(result))
    add(check_noise(model, ds, eps, norm, clean, batch_size, device, seed))
    add(check_determinism(model, x))
    add(check_gradients(model, ds, batch_size, device))
    add(check_bound(result))
    add(check_logits_not_probabilities(model, x))
    add(check_eval_mode(model, x))
