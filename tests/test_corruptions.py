"""Common corruptions: every corruption changes the image, a higher severity moves it farther from the
original, the same seed gives the same images (another seed other ones), known answers for the
deterministic ones, bad names and severities refused, and protocol `corruptions` end to end (the
report card's table, the mean corruption accuracy, the picture, the cache)."""

from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from advmend.cli import main
from advmend.data import load_dataset, subset
from advmend.data.corruptions import CORRUPTIONS, corrupt, corruption_names
from advmend.errors import ConfigError, InputError

# Real CIFAR-10: $ADVMEND_DATA, else the shared data folder beside the repository; skipped when absent.
SHARED = os.environ.get("ADVMEND_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
# The published CIFAR-10-C parameters trade one effect against another in these three (glass blur: more
# blur hides more of the pixel swaps; elastic: the affine part shrinks as the elastic part grows; frost:
# less of the image, more of the texture), so their distance to the original is not monotone.
NOT_MONOTONE = {"glass_blur", "elastic_transform", "frost"}
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
          "elastic_transform"}  # fmt: skip


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    if not (Path(SHARED) / "cifar10.npz").is_file():
        pytest.skip("CIFAR-10 data not available")
    return subset(load_dataset("cifar10", "test", root=SHARED), 32, seed=0).images


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).div(255).flatten(1).norm(dim=1).mean())


def test_the_fifteen_corruptions_are_registered_in_the_papers_order():
    assert corruption_names() == [
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    ]  # fmt: skip
    assert sorted(CORRUPTIONS.names()) == sorted(corruption_names())


@pytest.mark.parametrize("name", corruption_names())
def test_each_corruption_changes_the_image_more_with_severity(images, name):
    outs = [corrupt(images, name, s, seed=0) for s in range(1, 6)]
    for out in outs:
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert not torch.equal(out, images)
    dist = [_distance(out, images) for out in outs]
    assert not torch.equal(outs[0], outs[4])
    if name not in NOT_MONOTONE:
        # Each severity farther than the one before; 2 % slack for motion blur's severities 3 and 4, whose
        # published kernels differ only in taps of weight < 0.3 % (radius 6 vs 8 at sigma 2).
        assert all(b > 0.98 * a for a, b in zip(dist, dist[1:])) and dist[4] > 1.5 * dist[0], dist
    elif name == "glass_blur":  # two rounds of swaps (severities 4, 5) move farther than one at the same blur
        assert dist[3] > 1.1 * dist[1] and dist[4] > 1.1 * dist[2], dist
    elif name == "frost":  # severities 1-3: more texture, the image kept (nearly) whole
        assert dist[0] < dist[1] < dist[2], dist
    else:  # elastic: severity 1 is the largest affine move (8 % of the side), 5 the smallest (3 %)
        assert dist[0] > 1.2 * dist[4], dist


@pytest.mark.parametrize("name", corruption_names())
def test_same_seed_same_images_other_seed_other_images(images, name):
    first = corrupt(images, name, 3, seed=7)
    assert torch.equal(first, corrupt(images, name, 3, seed=7))
    if name in RANDOM:
        assert not torch.equal(first, corrupt(images, name, 3, seed=8))
    else:  # a deterministic corruption does not depend on the seed
        assert torch.equal(first, corrupt(images, name, 3, seed=8))


def test_brightness_is_hsv_value_plus_c():
    rng = np.random.default_rng(0)
    px = rng.integers(0, 256, (1, 3, 4, 5)).astype(np.uint8)
    px[0, :, 0, 0] = 0  # a black pixel becomes grey
    out = corrupt(torch.from_numpy(px), "brightness", 4, seed=0).numpy()
    for i in range(4):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*(px[0, :, i, j] / 255.0))
            want = np.array(colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)))
            assert np.all(np.abs(out[0, :, i, j] / 255.0 - want) <= 1 / 255 + 1e-6)


def test_contrast_and_pixelate_known_answers():
    from PIL import Image

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.uint8)
    out = corrupt(torch.from_numpy(x), "contrast", 5, seed=0).numpy()
    f = x / 255.0
    means = f.mean(axis=(2, 3), keepdims=True)
    assert np.abs(out - np.floor(np.clip((f - means) * 0.15 + means, 0, 1) * 255)).max() <= 1
    pix = corrupt(torch.from_numpy(x), "pixelate", 5, seed=0).numpy()
    for k in range(2):
        img = Image.fromarray(x[k].transpose(1, 2, 0))
        want = np.asarray(img.resize((20, 20), Image.Resampling.BOX).resize((32, 32), Image.Resampling.BOX))
        assert np.abs(pix[k].transpose(1, 2, 0).astype(int) - want.astype(int)).max() <= 2


def test_gray_and_imagenet_sized_images():
    rng = np.random.default_rng(2)
    gray = torch.from_numpy(rng.integers(0, 256, (2, 1, 28, 28)).astype(np.uint8))
    big = torch.from_numpy(rng.integers(0, 256, (1, 3, 224, 224)).astype(np.uint8))
    for name in corruption_names():
        assert corrupt(gray, name, 2, seed=0).shape == gray.shape
        if name != "glass_blur":  # its sequential pixel swaps at 224 pixels cost seconds; 32 pixels cover it
            out = corrupt(big, name, 5, seed=0)
            assert out.shape == big.shape and not torch.equal(out, big)


@pytest.mark.parametrize("name,severity", [("smog", 1), ("fog", 0), ("fog", 6), ("fog", True), ("fog", 2.0)])
def test_unknown_corruption_or_severity_is_refused(name, severity):
    with pytest.raises(ConfigError, match="unknown corruption"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), name, severity, seed=0)


def test_images_must_be_uint8_batches():
    with pytest.raises(InputError, match="uint8"):
        corrupt(torch.zeros(1, 3, 8, 8), "fog", 1, seed=0)


# --------------------------------------------------------------------------- the protocol

USER_MODEL = """
import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                         nn.Linear(128, 10))
"""


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    if not (Path(SHARED) / "cifar10.npz").is_file():
        pytest.skip("CIFAR-10 data not available")
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "corruptions_tiny_net.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(mod))
    monkeypatch.setenv("ADVMEND_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADVMEND_DATA", SHARED)
    return "corruptions_tiny_net:tiny"


def _eval(user_model, out, *extra):
    return main(["eval", "--model", user_model, "--dataset", "cifar10", "--protocol", "corruptions", "--n-examples",
                 "40", "--set", "eval.corruptions=[fog,contrast,gaussian_noise]", "--set", "eval.severities=[1,5]",
                 "--quiet", "--out", str(out), *extra])  # fmt: skip


def test_protocol_reports_table_mean_picture_and_reuses_the_cache(tmp_path, user_model, capsys):
    assert _eval(user_model, tmp_path / "a") == 0
    console = capsys.readouterr().out
    assert "mean corruption accuracy" in console
    card = json.loads((tmp_path / "a" / "report.json").read_text())
    section = card["corruptions"]
    assert list(section["accuracy"]) == ["fog", "contrast", "gaussian_noise"]
    assert all(list(row) == ["1", "5"] for row in section["accuracy"].values())
    values = [v for row in section["accuracy"].values() for v in row.values()]
    assert section["mean_corruption_accuracy"] == pytest.approx(np.mean(values))
    assert section["cache"] == {"hits": 0, "misses": 6} and card["n_examples"] == 40
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| corruption | severity 1 | severity 5 | mean |" in md and "| fog |" in md
    assert (tmp_path / "a" / "corruption_examples.png").stat().st_size > 0
    assert card["meta"]["plot"] == "corruption_examples.png"
    # A second model evaluation on the same subset reads the cached copies and gives the same numbers.
    assert _eval(user_model, tmp_path / "b", "--no-plot") == 0
    again = json.loads((tmp_path / "b" / "report.json").read_text())["corruptions"]
    assert again["cache"] == {"hits": 6, "misses": 0} and again["accuracy"] == section["accuracy"]
    assert not (tmp_path / "b" / "corruption_examples.png").exists()


def test_a_damaged_cache_file_is_recomputed(tmp_path, user_model):
    assert _eval(user_model, tmp_path / "a", "--no-plot") == 0
    for f in (tmp_path / "cache" / "corruptions").glob("*.npy"):
        f.write_bytes(b"garbage")
    assert _eval(user_model, tmp_path / "b", "--no-plot") == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["corruptions"] for d in "ab")
    assert b["cache"]["misses"] == 6 and a["accuracy"] == b["accuracy"]


@pytest.mark.parametrize("setting,expect", [("eval.corruptions=[smog]", "unknown corruption 'smog'"),
                                            ("eval.severities=[0]", "unknown corruption severity 0"),
                                            ("eval.severities=[]", "must name at least one")])  # fmt: skip
def test_bad_corruption_settings_are_one_line_exit_2_nothing_written(tmp_path, user_model, capsys, setting, expect):
    out = tmp_path / "report"
    code = main(["eval", "--model", user_model, "--dataset", "cifar10", "--protocol", "corruptions",
                 "--set", setting, "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_save_adv_with_corruptions_is_refused(tmp_path, user_model, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", user_model, "--dataset", "cifar10", "--protocol", "corruptions", "--n-examples",
                 "8", "--save-adv", str(tmp_path / "adv.pt"), "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "runs no attack" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "adv.pt").exists()
