"""Named evaluation protocols: lists of `PGD` configurations, each a thin preset of the one core."""

from __future__ import annotations

from typing import Callable

from advmend.attacks.pgd import PGD, fgsm
from advmend.registry import Registry

Protocol = Callable[[float, str], list[PGD]]
PROTOCOLS: Registry[Protocol] = Registry("protocol")


@PROTOCOLS.register("paper")
def paper_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """The FSR paper's tables: FGSM; PGD-20 and PGD-100 (step eps/10, no random start, CE);
    "C&W" = 30 steps of PGD on the margin loss with kappa = 50."""
    step = eps / 10
    return [
        fgsm(eps, norm),
        PGD(eps=eps, steps=20, step_size=step, norm=norm, random_start=False, name="PGD-20"),
        PGD(eps=eps, steps=100, step_size=step, norm=norm, random_start=False, name="PGD-100"),
        PGD(eps=eps, steps=30, step_size=step, norm=norm, random_start=False, loss="margin",
            kappa=50.0, name="CW-30"),
    ]


@PROTOCOLS.register("strong")
def strong_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """PGD-50 with random start and 5 restarts on CE and on the CW margin (step eps/4)."""
    step = eps / 4
    return [
        PGD(eps=eps, steps=50, step_size=step, norm=norm, restarts=5, name="PGD-50x5"),
        PGD(eps=eps, steps=50, step_size=step, norm=norm, restarts=5, loss="margin", kappa=50.0,
            name="CW-50x5"),
    ]


@PROTOCOLS.register("quick")
def quick_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """FGSM and PGD-20 (paper settings): a fast check, not a robustness claim."""
    return paper_protocol(eps, norm)[:2]


def protocol_attacks(name: str, eps: float, norm: str = "linf") -> list[PGD]:
    """The attacks of protocol `name` at radius `eps`."""
    return PROTOCOLS.get(name)(eps, norm)
