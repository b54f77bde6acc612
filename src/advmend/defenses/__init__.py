"""Defenses: FSR (a feature-level plug-in block) and PSSR (input-level remove then restore)."""

from advmend.defenses.fsr import FSRBlock, FSRBlockOutput, MaskBPDA, gumbel_sigmoid_mask
from advmend.defenses.fsr_adaptive import ThroughSoftMask  # also registers the fsr-adaptive protocol
from advmend.defenses.insert import FSRModel, FSROutput, fsr_losses, insert_fsr
from advmend.defenses.pssr import PSSRModel, PSSROutput, Regenerator, pixel_surgery  # PSSR exports

__all__ = [
    "FSRBlock",
    "FSRBlockOutput",
    "FSRModel",
    "FSROutput",
    "PSSRModel",
    "PSSROutput",
    "Regenerator",
    "fsr_losses",
    "gumbel_sigmoid_mask",
    "insert_fsr",
    "MaskBPDA",
    "ThroughSoftMask",
    "pixel_surgery",
]
