"""`advmend bench --loop`: the product's training loop against a minimal PGD-AT loop on the same images."""

from __future__ import annotations

import torch
from torch import nn

from advmend.bench.loop_overhead import _pad_crop_flip, format_loop_rows, loop_config, minimal_pgd_at


def test_pad_crop_flip_moves_each_image_by_its_own_offset():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = _pad_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape and not torch.equal(out, x)
    for i in range(2):  # every output row is a (possibly mirrored) shifted window of the padded image
        padded = torch.nn.functional.pad(x[i, 0], (2, 2, 2, 2))
        windows = [padded[dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i, 0], w) or torch.equal(out[i, 0], w.flip(1)) for w in windows)


def test_minimal_loop_trains_the_model_and_reports_every_epoch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 10))  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (40,))
    ips = minimal_pgd_at(model, images, labels, epochs=2, batch_size=16, lr=0.1, eps=8 / 255, steps=2,
                         channels_last=True)  # fmt: skip
    assert len(ips) == 2 and all(v > 0 for v in ips)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loop_config_strips_everything_around_the_epochs():
    cfg = loop_config("cifar10/pgdat_small_cnn_cpu", 5000, 3)
    assert (cfg.data.train_subset, cfg.data.val_size, cfg.train.epochs) == (5000, 0, 3)
    assert cfg.train.amp == "off" and cfg.train.channels_last and not cfg.eval.after_train and not cfg.fsr.enabled


def test_format_gives_the_ratio_to_the_minimal_loop():
    from advmend.bench.loop_overhead import LoopRow

    text = format_loop_rows([LoopRow("advmend train", [90.0, 95.0, 100.0]), LoopRow("minimal", [100.0])])
    assert "| advmend train | 95.0 | 3 | 0.950x |" in text and "| minimal | 100.0 | 1 | 1.000x |" in text
