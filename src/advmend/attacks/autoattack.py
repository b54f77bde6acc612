"""AutoAttack through the reference implementation (the `pyautoattack` package).

Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020, https://arxiv.org/abs/2003.01690. Version "standard": APGD-CE,
APGD-T (9 target classes), FAB-T (9 target classes), Square (5000 queries), each run on the points
still robust. Version "rand" (for randomised defenses): APGD-CE and APGD-DLR with EOT over 20 draws.

advmend does not re-implement any of it: the package's attacks run with their own settings, and
advmend only (1) runs the model in its contract (eval mode, frozen parameters, [0, 1] input, logits),
(2) runs the sub-attacks one at a time on the points still robust, exactly as the package's own
cascade does, so that each sub-attack's robust accuracy and time are known, and (3) passes the
examples through advmend's perturbation-bound assertion like every other attack.

`pyautoattack` is imported lazily: advmend works without it, and `AutoAttackSpec.run` says how to
install it. BPDA (`advmend.attacks.BPDA`) and EOT (`eot=`) compose with it: pass a `BPDA` module as the
model, and set `eot` to average APGD's gradients over that many draws.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import grad_ready
from advmend.errors import ConfigError, InputError
from advmend.types import AttackRun

VERSIONS = ("standard", "rand")
NORM_NAMES = {"linf": "Linf", "l2": "L2", "l1": "L1"}
SUB_ATTACK_NAMES = {"apgd-ce": "APGD-CE", "apgd-t": "APGD-T", "fab-t": "FAB-T", "square": "Square",
                    "apgd-dlr": "APGD-DLR", "fab": "FAB"}  # fmt: skip
INSTALL_HINT = "AutoAttack needs the reference implementation: pip install pyautoattack"


def _import_autoattack():
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} (import failed: {e})") from None
    return AutoAttack


def autoattack_version() -> str | None:
    """The installed pyautoattack version, or None."""
    try:
        import pyautoattack
    except ImportError:
        return None
    return getattr(pyautoattack, "__version__", "unknown")


class _Flags(logging.Handler):
    """Collects the warnings AutoAttack's own checks log (randomised model, probabilities, ...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.messages:
            self.messages.append(msg)


@dataclass(frozen=True)
class AutoAttackSpec:
    """Settings of one AutoAttack run; eps is always explicit.

    Args:
        eps: radius of the threat model.
        norm: "linf", "l2" or "l1" (the package's L1 version: APGD-L1 with its larger-radius schedule
            and 5 restarts, APGD-T on 5 targets, then FAB-T and Square in L1).
        version: "standard" or "rand" (randomised models; EOT over `eot` draws).
        seed: seed of the package's random starts and Square's sampling.
        n_queries: Square's query budget (None: the version's default, 5000). Fewer is weaker: only
            for tests and quick looks, and the report shows the value used.
        n_iter: APGD/FAB iterations (None: 100). Same caveat.
        eot: EOT draws per APGD gradient (None: the version's default, 1 for standard, 20 for rand).
        name: label used in reports.
    """

    eps: float
    norm: str = "linf"
    version: str = "standard"
    seed: int = 0
    n_queries: int | None = None
    n_iter: int | None = None
    eot: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ConfigError(f"AutoAttack eps must be a finite number > 0, given explicitly, got {self.eps!r}")
        if self.norm not in NORM_NAMES:
            raise ConfigError(f"AutoAttack norm must be one of {tuple(NORM_NAMES)}, got {self.norm!r}")
        if self.version not in VERSIONS:
            raise ConfigError(f"AutoAttack version must be one of {VERSIONS}, got {self.version!r}")
        for key in ("n_queries", "n_iter", "eot"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"AutoAttack {key} must be >= 1, got {value}")

    def describe(self) -> dict:
        """Exact settings, for reports."""
        return {
            "name": self.name or ("AutoAttack" if self.version == "standard" else f"AutoAttack-{self.version}"),
            "implementation": f"pyautoattack {autoattack_version()}",
            "norm": self.norm,
            "eps": self.eps,
            "version": self.version,
            "seed": self.seed,
            "n_queries": self.n_queries or 5000,
            "n_iter": self.n_iter or 100,
            "eot": self.eot or (20 if self.version == "rand" else 1),
            "steps": self.n_iter or 100,
            "loss": "ce/dlr/fab/square",
            "random_start": True,
            "restarts": 5 if self.norm == "l1" and self.version == "standard" else 1,  # APGD-CE's, as the package sets
        }

    def build(self, model: nn.Module, device: torch.device, num_classes: int):
        """The package's AutoAttack object with this spec's settings applied after its own."""
        AutoAttack = _import_autoattack()
        adversary = AutoAttack(model, norm=NORM_NAMES[self.norm], eps=float(self.eps), version=self.version,
                               seed=self.seed, device=device)  # fmt: skip
        adversary.verbose = False
        # The package's own target counts (9; APGD-T 5 in L1), capped by the classes there are.
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, num_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, num_classes - 1)
        if self.n_queries is not None:
            adversary.square.n_queries = self.n_queries
        if self.n_iter is not None:
            for sub in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
                sub.n_iter = self.n_iter
            for apgd in (adversary.apgd, adversary.apgd_targeted):  # APGD's schedule, as its __init__ sets it
                apgd.n_iter_orig = self.n_iter  # the L1 schedule (3, 2, 1 x eps) splits this budget
                apgd.n_iter_2 = max(int(0.22 * self.n_iter), 1)
                apgd.n_iter_min = max(int(0.06 * self.n_iter), 1)
                apgd.size_decr = max(int(0.03 * self.n_iter), 1)
        if self.eot is not None:
            adversary.apgd.eot_iter = self.eot
            adversary.apgd_targeted.eot_iter = self.eot
        return adversary

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: torch.device,
            batch_size: int = 256, generator: torch.Generator | None = None, progress: bool = False) -> AttackRun:  # fmt: skip
        """Run the cascade on (x, y); see `AttackRun`. `generator` is unused: `seed` seeds the package."""
        if x.shape[0] == 0:
            raise InputError("AutoAttack got no examples to attack")
        flags = _Flags()
        logger = logging.getLogger("auto-attack")
        logger.addHandler(flags)
        # Gradients are needed whatever the caller's context (see `pgd_tracked`).
        try:
            with torch.inference_mode(False), torch.enable_grad(), attack_mode(model):
                # The package `.view`s its inputs and the gradient buffers it allocates like them
                # (`zeros_like(x)`), which fails for channels_last or permuted inputs: it gets a
                # standard-layout copy. Its gradients then stay standard-layout whatever the model's
                # layout (APGD adds them into that buffer, FAB reads a leaf's `.grad`), and the examples
                # go back in the caller's layout.
                x_in = grad_ready(x).contiguous()
                y = grad_ready(y)
                with torch.no_grad():
                    num_classes = model(x_in[:1]).shape[1]
                if num_classes < 3:
                    raise InputError(f"AutoAttack's DLR and targeted attacks need >= 3 classes, got {num_classes}")
                adversary = self.build(model, device, num_classes)
                x_adv = x.detach().clone()  # made outside inference mode: an ordinary tensor
                fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                stages = []
                for sub in list(adversary.attacks_to_run):
                    t0 = time.perf_counter()
                    todo = (~fooled).nonzero().squeeze(1)
                    if todo.numel():
                        adversary.attacks_to_run = [sub]
                        cand, _ = adversary.run_standard_evaluation(x_in[todo], y[todo], batch_size=batch_size)
                        cand = cand.to(x.device)
                        with torch.no_grad():
                            hit = model(cand).argmax(1) != y[todo]
                        x_adv[todo[hit]] = cand[hit]
                        fooled[todo[hit]] = True
                    stages.append({"name": SUB_ATTACK_NAMES.get(sub, sub), "fooled": fooled.clone(),
                                   "seconds": time.perf_counter() - t0, "attacked": int(todo.numel())})  # fmt: skip
        finally:
            logger.removeHandler(flags)
        return AttackRun(x_adv, fooled, stages, flags.messages)
