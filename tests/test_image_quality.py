"""PSNR / SSIM of restored images (evaluation/image_quality.py) against known answers."""

import math

import pytest
import torch

from advmend.data import ArrayDataset
from advmend.evaluation.image_quality import RestorationMeter, restoration_quality


def _dataset(n: int = 10) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 205, (n, 3, 16, 16), generator=g, dtype=torch.uint8)  # x <= 0.8
    return ArrayDataset(images, torch.zeros(n, dtype=torch.long), ("a",))


def test_a_constant_shift_has_the_psnr_of_its_mse():
    # x + 0.1 stays inside [0, 1] (x <= 0.8): MSE = 0.01 exactly, PSNR = 10 log10(1 / 0.01) = 20 dB
    q = restoration_quality(lambda x: x + 0.1, _dataset(), batch_size=4)
    assert q["psnr"] == pytest.approx(20.0, abs=1e-3) and q["n_examples"] == 10
    assert q["ssim"] < 1


def test_psnr_is_averaged_per_image_not_pooled():
    # Half the images exact up to 1e-3 (60 dB), half shifted by 0.1 (20 dB): the per-image mean is 40 dB;
    # a pooled MSE would give about 23 dB.
    ds = _dataset(8)

    def restore(x):
        shift = torch.tensor([0.1, 1e-3] * (x.shape[0] // 2)).view(-1, 1, 1, 1)
        return x + shift

    assert restoration_quality(restore, ds, batch_size=8)["psnr"] == pytest.approx(40.0, abs=1e-2)


def test_the_identity_has_ssim_one():
    q = restoration_quality(lambda x: x, _dataset(), batch_size=3)
    assert q["ssim"] == pytest.approx(1.0, abs=1e-6) and math.isinf(q["psnr"])


def test_the_kept_and_the_removed_pixels_have_their_own_pooled_psnr():
    # Removed pixels off by 0.1 (20 dB), kept ones by 1e-3 (60 dB): the overall PSNR hides which is which.
    x = _dataset(4).images.float() / 255
    removed = torch.zeros(4, 1, 16, 16)
    removed[:, :, :4] = 1  # a quarter of every image
    meter = RestorationMeter()
    for lo in (0, 2):  # two batches: the pooled sums carry over
        x_b, m_b = x[lo : lo + 2], removed[lo : lo + 2]
        meter.update(x_b + 0.1 * m_b + 1e-3 * (1 - m_b), x_b, removed=m_b)
    q = meter.compute()
    assert q["removed"] == pytest.approx(0.25) and q["n_examples"] == 4
    assert q["psnr_removed"] == pytest.approx(20.0, abs=1e-3) and q["psnr_kept"] == pytest.approx(60.0, abs=1e-2)
    assert "removed" not in restoration_quality(lambda x: x, _dataset(), batch_size=3)  # no mask, no split
