"""Attacks: one PGD core (FGSM, PGD L-inf/L2/L1, restarts, CW margin, targeted, EOT), BPDA, AutoAttack
(reference implementation, imported lazily), transfer attacks, and named protocols."""

from advmend.attacks.adaptive import BPDA, bpda
from advmend.attacks.autoattack import AutoAttackSpec
from advmend.attacks.l1 import project_l1_box
from advmend.attacks.losses import LOSSES, ce_loss, kl_loss, margin_loss
from advmend.attacks.modes import attack_mode
from advmend.attacks.pgd import PGD, fgsm, pgd, pgd_tracked
from advmend.attacks.presets import PROTOCOLS, cw_margin, protocol_attacks, targeted_pgd
from advmend.attacks.transfer import Transfer

__all__ = [
    "AutoAttackSpec",
    "BPDA",
    "Transfer",
    "cw_margin",
    "targeted_pgd",
    "bpda",
    "kl_loss",
    "LOSSES",
    "PGD",
    "PROTOCOLS",
    "attack_mode",
    "ce_loss",
    "fgsm",
    "margin_loss",
    "pgd",
    "pgd_tracked",
    "project_l1_box",
    "protocol_attacks",
]
