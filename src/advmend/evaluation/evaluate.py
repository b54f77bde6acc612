"""Evaluate a classifier: clean accuracy, each attack's robust accuracy, the per-example worst case.

Each attack runs only on the examples the model classifies correctly when clean (an example already
wrong cannot become "robust"), in eval mode, and every adversarial example is checked to lie in the
threat model's ball and in [0, 1] rather than trusted to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, pgd_tracked
from advmend.data import ArrayDataset, BatchLoader
from advmend.validate import check_logits

_TOL = 1e-5  # float32 slack on the ball constraint


@dataclass
class AttackResult:
    """One attack's outcome: settings, per-example correctness (N,), time spent."""

    settings: dict
    correct: torch.Tensor
    seconds: float
    attacked: int  # examples actually attacked (clean-correct ones)

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


def _check_bound(x_adv: torch.Tensor, x: torch.Tensor, attack: PGD) -> None:
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if attack.norm == "linf" else delta.norm(dim=1)
    worst, lo, hi = float(size.max()), float(x_adv.min()), float(x_adv.max())
    if worst > attack.eps + _TOL or lo < 0 or hi > 1:
        raise RuntimeError(
            f"{attack.describe()['name']} produced examples outside the threat model "
            f"(max {attack.norm} size {worst:.6g} > eps {attack.eps:.6g} or range [{lo:.3g}, {hi:.3g}]); "
            "this is a bug in the attack, please report it"
        )


def evaluate(
    model: nn.Module,
    ds: ArrayDataset,
    attacks: list[PGD],
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
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
    """
    start = time.perf_counter()
    device = torch.device(device)
    loader = BatchLoader(ds, batch_size, shuffle=False, device=device)
    clean = []
    with attack_mode(model), torch.no_grad():
        for x, y in loader:
            clean.append((check_logits(model(x), x.shape[0]).argmax(1) == y).cpu())
    result = EvalResult(torch.cat(clean))
    generator = torch.Generator(device=device).manual_seed(seed)
    for attack in attacks:
        t0 = time.perf_counter()
        correct, offset = [], 0
        bar = tqdm(loader, desc=attack.describe()["name"], disable=not progress, leave=False)
        for x, y in bar:
            keep = result.clean_correct[offset : offset + x.shape[0]].to(device)
            offset += x.shape[0]
            robust = torch.zeros_like(keep)
            idx = keep.nonzero().squeeze(1)
            if idx.numel():
                x_adv, fooled = pgd_tracked(model, x[idx], y[idx], attack, generator=generator, validate=False)
                _check_bound(x_adv, x[idx], attack)
                robust[idx] = ~fooled
            correct.append(robust.cpu())
        seconds = time.perf_counter() - t0
        result.attacks.append(
            AttackResult(attack.describe(), torch.cat(correct), seconds, int(result.clean_correct.sum()))
        )
    result.seconds = time.perf_counter() - start
    return result
