"""How faithfully a pre-processor restores clean images: PSNR and SSIM against the originals.

PSSR's regenerator must give back the clean image when there is no attack (issue 10: PSNR >= 28 dB).
Both numbers come from torchmetrics (a maintained implementation, not ours): PSNR per image with
data range 1 and then averaged over images (the usual reporting; one blurry image does not hide in a
pooled MSE), SSIM with torchmetrics' defaults (11x11 Gaussian window, sigma 1.5), averaged over images.
"""

from __future__ import annotations

from typing import Callable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from advmend.data import ArrayDataset, BatchLoader


@torch.no_grad()
def restoration_quality(
    restore: Callable[[torch.Tensor], torch.Tensor],
    ds: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """{"psnr": dB, "ssim": in [-1, 1], "n_examples": N}: `restore(x)` against x over `ds`, image by image.

    `restore` must be deterministic (a model in eval mode); the images are compared in float32.
    """
    psnr_sum = ssim_sum = 0.0
    n = 0
    for x, _ in BatchLoader(ds, batch_size, shuffle=False, device=torch.device(device)):
        x_hat = restore(x).float().clamp(0, 1)
        x = x.float()
        psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
        psnr_sum += float(psnr.sum())
        ssim_sum += float(ssim.sum())
        n += x.shape[0]
    return {"psnr": psnr_sum / n, "ssim": ssim_sum / n, "n_examples": n}
