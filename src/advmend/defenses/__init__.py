"""Defenses: FSR (a feature-level plug-in block)."""

from advmend.defenses.fsr import FSRBlock, FSRBlockOutput, gumbel_sigmoid_mask
from advmend.defenses.insert import FSRModel, FSROutput, fsr_losses, insert_fsr

__all__ = [
    "FSRBlock",
    "FSRBlockOutput",
    "FSRModel",
    "FSROutput",
    "fsr_losses",
    "gumbel_sigmoid_mask",
    "insert_fsr",
]
