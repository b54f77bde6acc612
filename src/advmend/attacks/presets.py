"""Named evaluation protocols: lists of attacks, each a thin preset of the one PGD core or AutoAttack.

| protocol | attacks | cascade | costly sanity checks |
|---|---|---|---|
| quick | FGSM, PGD-20 (paper settings) | no | no |
| paper | FSR's tables: FGSM, PGD-20, PGD-100, CW-30 | no (each number independent, as in the paper) | no |
| strong | PGD-50 x 5 restarts on CE and on the CW margin | yes | no |
| autoattack | AutoAttack standard (pyautoattack) | yes | no |
| full | all of the above | yes | yes (S01-S04) |
| corruptions | none: the 15 common corruptions x 5 severities (`evaluation.corruptions`) | - | - |

A cascade runs each attack only on the examples still robust to the ones before it; the worst case is
the same, and no compute is spent on examples already fooled.
"""

from __future__ import annotations

from collections.abc import Callable

from advmend.attacks.autoattack import AutoAttackSpec
from advmend.attacks.pgd import PGD, fgsm
from advmend.registry import Registry

Attack = PGD | AutoAttackSpec
Protocol = Callable[[float, str], list[Attack]]
PROTOCOLS: Registry[Protocol] = Registry("protocol")
# Each protocol is registered with how it runs: `cascade` (see above) and `sanity_full`, whether the
# costly sanity checks run with it (`PROTOCOLS.meta(name)`).


def cw_margin(
    eps: float,
    norm: str = "linf",
    *,
    steps: int = 30,
    step_size: float | None = None,
    kappa: float = 50.0,
    restarts: int = 1,
    random_start: bool = False,
    name: str = "",
) -> PGD:
    """A Carlini-Wagner *style* attack: PGD on the CW margin loss max_{j != y} z_j - z_y (clipped at kappa).

    With norm "l2" this is the usual "CW-L2" row of robustness tables. It is honestly PGD on the CW
    margin inside a fixed eps-ball, not Carlini & Wagner's original optimisation (which minimises the
    perturbation size with a binary search over a trade-off constant and a tanh change of variables).
    """
    return PGD(eps=eps, steps=steps, step_size=step_size, norm=norm, random_start=random_start,
               restarts=restarts, loss="margin", kappa=kappa, name=name or f"CW-{steps}")  # fmt: skip


def targeted_pgd(eps: float, norm: str = "linf", *, steps: int = 20, loss: str = "ce", name: str = "") -> PGD:
    """PGD towards a random wrong class per example (`evaluate` draws the targets, seeded); robust
    accuracy still counts prediction == true label."""
    return PGD(eps=eps, steps=steps, norm=norm, loss=loss, targeted=True, name=name or f"PGD-{steps}-targeted")


@PROTOCOLS.register("paper", cascade=False, sanity_full=False)
def paper_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """The FSR paper's tables: FGSM; PGD-20 and PGD-100 (step eps/10, no random start, CE);
    "C&W" = 30 steps of PGD on the margin loss with kappa = 50."""
    step = eps / 10
    return [
        fgsm(eps, norm),
        PGD(eps=eps, steps=20, step_size=step, norm=norm, random_start=False, name="PGD-20"),
        PGD(eps=eps, steps=100, step_size=step, norm=norm, random_start=False, name="PGD-100"),
        cw_margin(eps, norm, steps=30, step_size=step, kappa=50.0, name="CW-30"),
    ]


@PROTOCOLS.register("strong", cascade=True, sanity_full=False)
def strong_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """PGD-50 with random start and 5 restarts on CE and on the CW margin (step eps/4)."""
    step = eps / 4
    return [
        PGD(eps=eps, steps=50, step_size=step, norm=norm, restarts=5, name="PGD-50x5"),
        cw_margin(eps, norm, steps=50, step_size=step, restarts=5, random_start=True, name="CW-50x5"),
    ]


@PROTOCOLS.register("quick", cascade=False, sanity_full=False)
def quick_protocol(eps: float, norm: str = "linf") -> list[PGD]:
    """FGSM and PGD-20 (paper settings): a fast check, not a robustness claim."""
    return paper_protocol(eps, norm)[:2]


@PROTOCOLS.register("autoattack", cascade=True, sanity_full=False)
def autoattack_protocol(eps: float, norm: str = "linf") -> list[Attack]:
    """AutoAttack standard (APGD-CE, APGD-T, FAB-T, Square 5000) by the reference implementation."""
    return [AutoAttackSpec(eps=eps, norm=norm, version="standard")]


@PROTOCOLS.register("full", cascade=True, sanity_full=True)
def full_protocol(eps: float, norm: str = "linf") -> list[Attack]:
    """Everything: the paper's attacks, the strong ones, AutoAttack; run with the costly sanity checks."""
    return paper_protocol(eps, norm) + strong_protocol(eps, norm) + autoattack_protocol(eps, norm)


@PROTOCOLS.register("corruptions", cascade=False, sanity_full=False, corruptions=True)
def corruptions_protocol(eps: float, norm: str = "linf") -> list[Attack]:
    """No attack: accuracy under the 15 common corruptions at 5 severities (`evaluation.corruptions`)."""
    return []


def protocol_attacks(name: str, eps: float, norm: str = "linf") -> list[Attack]:
    """The attacks of protocol `name` at radius `eps`."""
    return PROTOCOLS.get(name)(eps, norm)
