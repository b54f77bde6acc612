"""How faithfully a pre-processor restores clean images: PSNR and SSIM against the originals.

PSSR's regenerator must give back the clean image when there is no attack (the goal: PSNR >= 28 dB).
Both numbers come from torchmetrics (a maintained implementation, not ours): PSNR per image with
data range 1 and then averaged over images (the usual reporting; one blurry image does not hide in a
pooled MSE), SSIM with torchmetrics' defaults (11x11 Gaussian window, sigma 1.5), averaged over images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from advmend.data import BatchLoader
from advmend.data.arrays import ImageDataset


class RestorationMeter:
    """Accumulates, batch by batch, PSNR and SSIM per image (averaged over images) and, given the mask of
    the pixels a pre-processor removed, PSNR pooled over the kept and over the removed pixels: where the
    error sits (a few badly filled holes and a slightly blurred rest give the same overall PSNR)."""

    def __init__(self) -> None:
        self.psnr_sum = self.ssim_sum = 0.0
        self.n = 0
        # Pooled over pixels (torchmetrics' accumulating metric: sum of squared errors over the count).
        self.kept, self.removed = PeakSignalNoiseRatio(data_range=1.0), PeakSignalNoiseRatio(data_range=1.0)
        self.kept_count = self.removed_count = 0

    @torch.no_grad()
    def update(self, x_hat: torch.Tensor, x: torch.Tensor, removed: torch.Tensor | None = None) -> None:
        """`x_hat` against `x` (N, C, H, W); `removed` (N, 1, H, W), 1 where the pixel was removed."""
        x_hat, x = x_hat.float().clamp(0, 1), x.float()
        psnr = peak_signal_noise_ratio(x_hat, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(x_hat, x, data_range=1.0, reduction="none")
        assert isinstance(ssim, torch.Tensor)  # a tuple only with return_full_image/return_contrast_sensitivity
        self.psnr_sum += float(psnr.sum())
        self.ssim_sum += float(ssim.sum())
        self.n += x.shape[0]
        if removed is not None:
            gone = removed.bool().expand_as(x)
            for metric, where in ((self.kept, ~gone), (self.removed, gone)):
                metric.to(x.device)  # accumulate where the images are: no copy of the pixels to the host
                metric.update(x_hat[where], x[where])
            n_gone = int(gone.sum())
            self.removed_count += n_gone
            self.kept_count += gone.numel() - n_gone

    def compute(self) -> dict[str, float | None]:
        """{"psnr", "ssim", "n_examples"} and, when masks were given, {"removed": fraction of the pixels,
        "psnr_kept", "psnr_removed"} (None for a part with no pixel)."""
        n = max(self.n, 1)
        out: dict[str, float | None] = {"psnr": self.psnr_sum / n, "ssim": self.ssim_sum / n, "n_examples": self.n}
        total = self.kept_count + self.removed_count
        if total:
            out["removed"] = self.removed_count / total
            out["psnr_kept"] = float(self.kept.compute()) if self.kept_count else None
            out["psnr_removed"] = float(self.removed.compute()) if self.removed_count else None
        return out


@torch.no_grad()
def restoration_quality(
    restore: Callable[[torch.Tensor], torch.Tensor],
    ds: ImageDataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, float | None]:
    """{"psnr": dB, "ssim": in [-1, 1], "n_examples": N}: `restore(x)` against x over `ds`, image by image.

    `restore` must be deterministic (a model in eval mode); the images are compared in float32.
    """
    meter = RestorationMeter()
    for x, _ in BatchLoader(ds, batch_size, shuffle=False, device=torch.device(device)):
        meter.update(restore(x), x)
    return meter.compute()
