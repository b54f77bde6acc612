"""A study's evaluation of one run, registered per defense (`advmend.defenses.registry.DEFENSES` names).

An entry is `protocol(model, test, eps, study, device, checkpoint, run_cfg, cache_dir, progress, log) -> dict`
(the record's "eval" section): the classifier protocol (`runner.evaluate_run`, for "none"; FSR's adds the adaptive attack on its
mask, `runner.evaluate_fsr_run`)
and PSSR's (`pssr_eval.evaluate_pssr_run`, against the classifier it protects). Both evaluate on the
subsets below: nested prefixes of one seeded permutation of the test split.
"""

from __future__ import annotations

import torch

from advmend.data import derive_seed
from advmend.registry import Registry

STUDY_PROTOCOLS: Registry = Registry("study protocol")


def subset_indices(n_total: int, seed: int) -> torch.Tensor:
    """The study's one permutation of the test split; every subset is a prefix of it (nested)."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(derive_seed(seed, 7)))


def subsets(n_test: int, e) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(clean subset or None for all, attack subset, AutoAttack subset): nested prefixes of the permutation."""
    perm = subset_indices(n_test, e.seed)
    clean_idx = None if e.clean_n is None or e.clean_n >= n_test else perm[: e.clean_n]
    return clean_idx, perm[: min(e.attack_n, n_test)], perm[: min(e.autoattack_n, n_test)]
