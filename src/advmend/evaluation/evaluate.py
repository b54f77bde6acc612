"""Evaluate a classifier: clean accuracy, each attack's robust accuracy, the per-example worst case.

Each attack runs only on the examples the model classifies correctly when clean (an example already
wrong cannot become "robust"), in eval mode, and every adversarial example is checked to lie in the
threat model's ball and in [0, 1] rather than trusted to.

With `cascade=True` (Croce & Hein 2020, as AutoAttack runs its own attacks) each attack runs only on
the examples every earlier attack failed on, so no compute is spent on examples already fooled. The
worst case is unchanged (an example is robust only if every attack fails on it); each attack's number
then reads "robust accuracy after this attack and all before it".

Attacks are `PGD` settings (run by the one core) or external attacks (`AutoAttackSpec`, `Transfer`):
objects with `eps`, `norm`, `describe()` and `run(model, x, y, *, device, batch_size, generator)`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, random_targets  # noqa: F401  (random_targets: where callers found it)
from advmend.data import BatchLoader, subset
from advmend.data.arrays import ImageDataset
from advmend.errors import ModelContractError
from advmend.types import AttackRun
from advmend.validate import check_logits

_TOL = 1e-5  # float32 slack on the ball constraint


class ExternalAttack(Protocol):
    @property
    def eps(self) -> float: ...  # read-only: a frozen dataclass (AutoAttackSpec) qualifies

    @property
    def norm(self) -> str: ...

    def describe(self) -> dict: ...

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
            batch_size: int, generator: torch.Generator | None, progress: bool = False) -> AttackRun: ...  # fmt: skip


@dataclass
class AttackResult:
    """One attack's outcome: settings, per-example correctness (N,), time spent."""

    settings: dict
    correct: torch.Tensor
    seconds: float
    attacked: int  # examples actually attacked (clean-correct ones, or still-robust ones in a cascade)
    max_perturbation: float | None = None  # largest measured ||x_adv - x|| in the attack's norm
    stages: list[dict] = field(default_factory=list)  # per sub-attack: name, robust_accuracy, seconds, attacked
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.settings["name"]

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if self.correct.numel() else float("nan")


@dataclass
class EvalResult:
    """Clean and robust per-example correctness on N examples; the worst case is their AND."""

    clean_correct: torch.Tensor
    attacks: list[AttackResult] = field(default_factory=list)
    seconds: float = 0.0
    cascade: bool = False
    adv: torch.Tensor | None = None  # (N, C, H, W) worst-case adversarial examples when kept
    labels: torch.Tensor | None = None  # (N,) true labels, kept with `adv`
    sanity: Any = None  # the SanityReport, when the sanity suite ran (evaluation.run.run_protocol)
    threats: Any = None  # a PSSR model's PSSREvalResult (threat models, restoration), from run_protocol
    corruptions: Any = None  # protocol corruptions' CorruptionResult, from run_protocol

    @property
    def n(self) -> int:
        return int(self.clean_correct.numel())

    @property
    def clean_accuracy(self) -> float:
        return float(self.clean_correct.float().mean())

    @property
    def worst_correct(self) -> torch.Tensor:
        worst = self.clean_correct.clone()
        for a in self.attacks:
            worst &= a.correct
        return worst

    @property
    def worst_accuracy(self) -> float:
        return float(self.worst_correct.float().mean())


def perturbation_size(x_adv: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example size of x_adv - x in the attack's norm, in float64 (an L1 sum over thousands of pixels
    drifts in float32 by more than the check's tolerance)."""
    delta = (x_adv.double() - x.double()).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.abs().sum(1) if norm == "l1" else delta.norm(dim=1)


def check_bound(x_adv: torch.Tensor, x: torch.Tensor, attack: Any) -> float:
    """Assert every example lies in the eps-ball and in [0, 1]; return the largest perturbation."""
    broken = (f"{attack.describe()['name']} returned examples of the wrong shape or non-finite values; "
              "this is a bug in the attack, please report it")  # fmt: skip
    if x_adv.shape != x.shape:
        raise RuntimeError(broken)
    size = perturbation_size(x_adv, x, attack.norm)
    # The four numbers the checks need, in one host sync.
    finite, worst, lo, hi = torch.stack(
        [torch.isfinite(x_adv).all().to(size.dtype), size.max(), x_adv.min(), x_adv.max()]
    ).tolist()
    if not finite:
        raise RuntimeError(broken)
    # float32 rounding grows with the radius: an L1 radius of 12 spreads over thousands of pixels
    if worst > attack.eps + _TOL * max(1.0, attack.eps) or lo < 0 or hi > 1:
        raise RuntimeError(
            f"{attack.describe()['name']} produced examples outside the threat model "
            f"(max {attack.norm} size {worst:.6g} > eps {attack.eps:.6g} or range [{lo:.3g}, {hi:.3g}]); "
            "this is a bug in the attack, please report it"
        )
    return worst


PROBABILITY_TOL = 1e-4  # |row sum - 1| below which a non-negative row reads as a probability vector


def check_not_probabilities(logits: torch.Tensor) -> None:
    """ModelContractError when `logits` (a probe batch of the model's outputs on real inputs) are
    probabilities: EVERY row non-negative and summing to 1 within 1e-4.

    Attacks need logits: cross-entropy on probabilities double-applies the softmax and its gradients
    all but vanish, so robust accuracy would be grossly overstated. Real logits essentially never pass
    this test on a whole batch (they would need every score >= 0 and every row to sum to 1); a model
    that does only partly (some rows, or sigmoid-like outputs in [0, 1]) is left to the S11 sanity flag.
    """
    out = logits.detach().float()
    if out.shape[1] < 2:  # one score per row says nothing about a distribution over classes
        return
    sums = out.sum(1)
    if bool((out >= 0).all()) and bool(((sums - 1).abs() <= PROBABILITY_TOL).all()):
        raise ModelContractError(
            f"the model returns probabilities, not logits: on the first {out.shape[0]} evaluated examples "
            f"every output row is >= 0 and sums to 1 (within {PROBABILITY_TOL:g}); attacks need the "
            "pre-softmax scores, so remove the final softmax (or return log-probabilities)"
        )


def _images(ds: ImageDataset, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    idx = idx.cpu()
    return ds.images[idx].to(device).float().div_(255), ds.labels[idx].to(device)


def evaluate(
    model: nn.Module,
    ds: ImageDataset,
    attacks: Sequence[PGD | ExternalAttack],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
    cascade: bool = False,
    keep_adv: bool = False,
) -> EvalResult:
    """Clean accuracy and robust accuracy of `model` on `ds` under each attack.

    Args:
        model: the classifier ([0, 1] images in, logits out); evaluated in eval mode, modes restored.
        ds: the examples (e.g. the test set or a seeded subset of it).
        attacks: attack settings, e.g. from `advmend.attacks.protocol_attacks`.
        batch_size: examples per forward pass.
        device: where the model lives.
        seed: seeds the attacks' random starts, so an evaluation is repeatable.
        progress: show a progress bar per attack.
        cascade: run each attack only on the examples still robust to all earlier ones.
        keep_adv: keep, per example, the adversarial example of the first attack that fooled it (the
            clean image where none did) in `EvalResult.adv`, e.g. for `--save-adv`.
    """
    start = time.perf_counter()
    device = torch.device(device)
    loader = BatchLoader(ds, batch_size, shuffle=False, device=device)
    clean: list[torch.Tensor] = []
    with attack_mode(model), torch.no_grad():
        for x, y in loader:
            logits = check_logits(model(x), x.shape[0])
            if not clean:  # the first batch is the probe: rejected before any attack runs
                check_not_probabilities(logits)
            clean.append((logits.argmax(1) == y).cpu())
    result = EvalResult(torch.cat(clean), cascade=cascade)
    alive = result.clean_correct.clone()  # robust to every attack so far
    adv = ds.images.float().div(255) if keep_adv else None
    adv_set = torch.zeros_like(alive)
    generator = torch.Generator(device=device).manual_seed(seed)
    for attack in attacks:
        todo = alive if cascade else result.clean_correct
        t0 = time.perf_counter()
        robust = torch.zeros_like(todo)
        worst = 0.0
        stages, notes = [], []
        idx_all = todo.nonzero().squeeze(1)
        if idx_all.numel():  # every attack runs through one interface: .run() on the examples it attacks
            x, y = _images(ds, idx_all, device)
            out = attack.run(model, x, y, device=device, batch_size=batch_size, generator=generator, progress=progress)
            worst = check_bound(out.x_adv, x, attack)
            fooled = out.fooled.cpu()
            robust[idx_all] = ~fooled
            base = todo.clone()
            for stage in out.stages:
                correct = base.clone()
                correct[idx_all] = ~stage["fooled"].cpu()
                stages.append({"name": stage["name"], "robust_accuracy": 100 * float(correct.float().mean()),
                               "seconds": round(stage["seconds"], 3), "attacked": stage["attacked"]})  # fmt: skip
            notes = list(out.notes)
            if adv is not None:
                new = idx_all[fooled & ~adv_set[idx_all]]
                adv[new] = out.x_adv[fooled & ~adv_set[idx_all]].cpu()
                adv_set[new] = True
        seconds = time.perf_counter() - t0
        settings = dict(attack.describe(), cascade=cascade)
        if cascade:
            robust &= alive
        alive &= robust
        result.attacks.append(AttackResult(settings, robust, seconds, int(todo.sum()), worst, stages, notes))
    if adv is not None:
        result.adv, result.labels = adv, ds.labels.clone()
    result.seconds = time.perf_counter() - start
    return result


CURVE_FACTORS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # multiples of the threat eps; 1.0 is the threat eps itself
CURVE_STEPS = 10
CURVE_EXAMPLES = 200


def accuracy_curve(
    model: nn.Module,
    ds: ImageDataset,
    eps: float,
    norm: str = "linf",
    *,
    n_examples: int = CURVE_EXAMPLES,
    factors: Sequence[float] = CURVE_FACTORS,
    steps: int = CURVE_STEPS,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Accuracy against eps for the report's picture: a cheap PGD sweep on a seeded subset.

    PGD-`steps` (step 2.5 * e / steps, uniform random start, Madry et al.) at each e = f * eps for f in
    `factors` (0 to 2 eps by default), on the seeded subset of min(n_examples, len(ds)) examples. Each
    point is an independent `evaluate` with the same `seed`, so the point at the threat eps is exactly
    what that attack alone gives on the subset. It is a picture of how accuracy falls with eps, not a
    robustness claim: the protocol's attacks (stronger, on every example) give the headline numbers.

    Returns:
        {"attack", "norm", "steps", "step_size": "2.5 * eps / steps", "random_start", "n_examples",
        "seed", "eps": [...], "accuracy": [...] (percent), "seconds"}.
    """
    t0 = time.perf_counter()
    sub = subset(ds, n_examples, seed) if n_examples < len(ds) else ds
    eps_list, accuracy = [], []
    for f in factors:
        e = float(f * eps)
        attacks = [] if e == 0 else [PGD(eps=e, steps=steps, step_size=2.5 * e / steps, norm=norm,
                                         random_start=True, name=f"PGD-{steps}@{f:g}eps")]  # fmt: skip
        res = evaluate(model, sub, attacks, batch_size=batch_size, device=device, seed=seed)
        eps_list.append(e)
        accuracy.append(100 * (res.worst_accuracy if attacks else res.clean_accuracy))
    return {
        "attack": f"PGD-{steps}",
        "norm": norm,
        "steps": steps,
        "step_size": f"2.5 * eps / {steps}",
        "random_start": True,
        "n_examples": len(sub),
        "seed": seed,
        "eps": eps_list,
        "accuracy": accuracy,
        "seconds": round(time.perf_counter() - t0, 3),
    }
