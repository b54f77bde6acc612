"""RNG states as uint8 tensors, so a checkpoint can hold them without pickle (exact resume).

Training draws from the global generators only (PGD random starts, FSR Gumbel noise, dropout);
the batch order and augmentation are re-seeded from (seed, epoch) by BatchLoader, and validation
attacks use their own seeded generator, so these states are all a resume needs.
"""

from __future__ import annotations

import torch


def rng_state_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator's state and, on CUDA, `device`'s generator state, as uint8 tensors."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng_state(tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Inverse of `rng_state_tensors`."""
    torch.set_rng_state(tensors["cpu"].to(torch.uint8))
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"].to(torch.uint8), device)
