"""PSSR: Pixel Surgery and Semantic Regeneration (Fu et al., arXiv 2402.00304, 2024).

An input-level "remove then restore" defense: PS removes the salient pixels of an input (scored by
the input gradient of the classifier's top-1 probability), the regenerator G restores the image, and
the protected classifier predicts on it. Design: docs/pssr.md.

The training objective lives in `advmend.defenses.pssr.objective` (not imported here: it builds on
`advmend.training`, which itself imports `advmend.defenses`).
"""

from advmend.defenses.pssr.pipeline import (
    PSSRModel,
    PSSROutput,
    PSSRPreprocess,
    build_pssr_model,
    check_pssr_config,
)  # fmt: skip
from advmend.defenses.pssr.regenerator import Regenerator, auto_depth
from advmend.defenses.pssr.surgery import apply_surgery, pixel_surgery, salient_mask, score_map

__all__ = [
    "PSSRModel",
    "PSSROutput",
    "PSSRPreprocess",
    "Regenerator",
    "apply_surgery",
    "auto_depth",
    "build_pssr_model",
    "check_pssr_config",
    "pixel_surgery",
    "salient_mask",
    "score_map",
]
