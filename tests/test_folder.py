"""Image folders streamed from disk: a generated folder of tens of images (PIL), the evaluation and
training transforms' shapes, labels in sorted class-folder order, the exact centre crop, seeded
random-resized crops, selection without decoding, unreadable files and empty folders named in one
line, and `advmend eval` running the autoattack protocol on a folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from advmend.cli import main
from advmend.data import BatchLoader, ImageFolder, load_dataset, split_train_val, subset
from advmend.data.folder import random_resized_crop_box
from advmend.errors import DataError

# Created in this (unsorted) order; the labels must follow the sorted names.
CLASSES = ("zebra", "apple", "mango")
SORTED = tuple(sorted(CLASSES))


def _colour(cls: str) -> int:
    return SORTED.index(cls)  # the class's label is the channel that is bright


def make_folder(base: Path, per_class: int = 4, sizes=((300, 260), (256, 320), (241, 290))) -> Path:
    """base/{train,test}/<class>/<i>.png|jpg: images of several sizes, channel `label` bright."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in CLASSES:
            (base / split / cls).mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[i % len(sizes)]
                arr = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
                arr[..., _colour(cls)] += 150
                suffix = ".png" if i % 2 else ".JPG"
                options = {"quality": 95} if i % 2 == 0 else {}
                Image.fromarray(arr).save(base / split / cls / f"{i}{suffix}", **options)
    return base


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("images") / "imgs")


def test_labels_follow_sorted_class_folders(folder):
    ds = load_dataset("folder", "test", path=str(folder), image_size=64, workers=0)
    assert isinstance(ds, ImageFolder) and ds.classes == SORTED and len(ds) == 12
    assert ds.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x = ds.images[:]
    # Each image's bright channel is its class: label k <=> channel k brightest, for every image.
    assert x.float().mean(dim=(2, 3)).argmax(1).tolist() == ds.labels.tolist()


def test_eval_and_train_transforms_give_the_right_shapes(folder):
    test = load_dataset("folder", "test", path=str(folder), image_size=224, workers=2)
    assert test.image_shape == (3, 224, 224)
    assert test.images[[0, 5, 11]].shape == (3, 3, 224, 224) and test.images[3].shape == (3, 224, 224)
    assert int(test.images[0, 0, 0, 0]) == int(test.images[0][0, 0, 0])
    batches = list(BatchLoader(test, 5, shuffle=False))
    assert [tuple(x.shape) for x, _ in batches] == [(5, 3, 224, 224), (5, 3, 224, 224), (2, 3, 224, 224)]
    assert all(x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 for x, _ in batches)
    assert torch.equal(torch.cat([x for x, _ in batches]), test.images[:].float() / 255)  # same decode, same order
    train = load_dataset("folder", "train", path=str(folder), image_size=224, workers=2)
    loader = BatchLoader(train, 4, shuffle=True, augment=True, seed=3, drop_last=True)
    shapes = [tuple(x.shape) for x, _ in loader]
    assert shapes == [(4, 3, 224, 224)] * 3


def test_evaluation_crop_is_the_centre(tmp_path):
    """A 320x256 image at 224: the shorter side is already 256 (= 224 / 0.875), so no resampling, and the
    crop is rows 16..240, columns 48..272, exactly."""
    from PIL import Image

    base = tmp_path / "f"
    (base / "test" / "a").mkdir(parents=True)
    arr = np.random.default_rng(1).integers(0, 256, (256, 320, 3)).astype(np.uint8)
    Image.fromarray(arr).save(base / "test" / "a" / "0.png")
    ds = load_dataset("folder", "test", path=str(base), image_size=224, workers=0)
    got = ds.images[0].permute(1, 2, 0).numpy()
    assert np.array_equal(got, arr[16:240, 48:272])


def test_workers_decode_what_the_main_process_decodes(folder):
    one = load_dataset("folder", "test", path=str(folder), image_size=96, workers=0)
    two = load_dataset("folder", "test", path=str(folder), image_size=96, workers=2)
    assert torch.equal(one.images[:], two.images[:])


def test_random_resized_crops_are_seeded_and_vary(folder):
    train = load_dataset("folder", "train", path=str(folder), image_size=64, workers=2)

    def epoch(seed: int, e: int) -> torch.Tensor:
        loader = BatchLoader(train, 6, shuffle=False, augment=True, seed=seed)
        loader.set_epoch(e)
        return torch.cat([x for x, _ in loader])

    first = epoch(0, 0)
    assert torch.equal(first, epoch(0, 0))  # same (seed, epoch): same crops, whichever worker decodes
    assert not torch.equal(first, epoch(0, 1)) and not torch.equal(first, epoch(1, 0))
    plain = torch.cat([x for x, _ in BatchLoader(train, 6, shuffle=False)])
    assert not torch.equal(first, plain)  # training crops are not the evaluation's centre crop


def test_random_resized_crop_box_stays_inside_and_covers_the_scale_range():
    rng = np.random.default_rng(0)
    fractions, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = random_resized_crop_box(256, 240, rng)
        assert 0 <= left < right <= 256 and 0 <= top < bottom <= 240
        fractions.append((right - left) * (bottom - top) / (256 * 240))
        ratios.append((right - left) / (bottom - top))
    assert min(fractions) < 0.15 and max(fractions) > 0.9  # scale 0.08..1
    assert 0.7 < min(ratios) and max(ratios) < 1.4  # aspect 3/4..4/3 (rounding aside)


def test_subsets_and_splits_select_files_without_decoding(folder, monkeypatch):
    ds = load_dataset("folder", "train", path=str(folder), image_size=32, workers=0)
    full = ds.images[:]
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: pytest.fail("decoded while selecting"))
    sub = subset(ds, 5, seed=0)
    train, val = split_train_val(ds, 3, seed=0)
    monkeypatch.undo()
    assert isinstance(sub, ImageFolder) and len(sub) == 5 and isinstance(val, ImageFolder) and len(train) == 9
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(0))  # subset's draw (derive_seed aside)
    got = sub.images[:]
    # Every subset image is one of the folder's, with its own label.
    for k in range(5):
        match = [j for j in range(12) if torch.equal(full[j], got[k])]
        assert match and int(ds.labels[match[0]]) == int(sub.labels[k])
    assert idx.numel() == 12


def test_unreadable_file_is_named(tmp_path):
    base = make_folder(tmp_path / "f", per_class=2)
    bad = base / "test" / "mango" / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg"):
        load_dataset("folder", "test", path=str(base), image_size=32)


def test_a_folder_without_classes_or_images_is_refused(tmp_path):
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders"):
        load_dataset("folder", "test", path=str(tmp_path / "empty"))
    (tmp_path / "empty" / "test" / "cat").mkdir()
    (tmp_path / "empty" / "test" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_dataset("folder", "test", path=str(tmp_path / "empty"))


def test_a_file_that_breaks_after_the_scan_is_named_from_the_worker(tmp_path):
    base = make_folder(tmp_path / "f", per_class=2)
    ds = load_dataset("folder", "test", path=str(base), image_size=32, workers=2)
    victim = base / "test" / "apple" / "1.png"
    victim.write_bytes(victim.read_bytes()[:60])  # truncated after the header was read
    with pytest.raises(DataError, match=r"1\.png") as err:
        list(BatchLoader(ds, 2, shuffle=False))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- through the CLI

USER_MODEL = '''
import torch
from torch import nn


def channel_net():
    """Class k when channel k is the brightest on average: right on the generated folders. Ten outputs
    (the last seven never win), as AutoAttack's targeted DLR loss needs at least four classes."""
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].weight[:3].copy_(torch.eye(3) * 8.0)
        net[2].bias.zero_()
    return net
'''


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "folder_channel_net.py").write_text(USER_MODEL)
    monkeypatch.syspath_prepend(str(mod))
    return "folder_channel_net:channel_net"


def test_eval_on_an_image_folder_runs_autoattack(tmp_path, user_model, capsys):
    base = make_folder(tmp_path / "f", per_class=2)
    out = tmp_path / "report"
    code = main(["eval", "--model", user_model, "--dataset", "folder", "--set", f"data.options.path={base}",
                 "--set", "data.options.image_size=32", "--set", "data.options.workers=2", "--protocol", "autoattack",
                 "--eps", "1/255", "--no-plot", "--quiet", "--out", str(out)])  # fmt: skip
    assert code == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["n_examples"] == 6 and report["clean_accuracy"] == 100.0
    assert [a["settings"]["name"] for a in report["attacks"]] == ["AutoAttack"]
    assert report["attacks"][0]["attacked_examples"] == 6


@pytest.mark.parametrize("case", ["no classes", "unreadable file", "name too long", "no permission"])
def test_bad_folders_are_one_line_exit_2_nothing_written(tmp_path, user_model, capsys, case):
    base = tmp_path / "f"
    if case == "no classes":
        (base / "test").mkdir(parents=True)
        path, expect = base, "no class folders"
    elif case == "unreadable file":
        make_folder(base, per_class=1)
        (base / "test" / "zebra" / "junk.png").write_bytes(b"\x89PNG but not really")
        path, expect = base, "junk.png"
    elif case == "name too long":
        path, expect = tmp_path / ("x" * 300), "File name too long"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads every folder")
        make_folder(base, per_class=1)
        (base / "test").chmod(0)
        path, expect = base, "Permission denied"
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            "--model",
            user_model,
            "--dataset",
            "folder",
            "--set",
            f"data.options.path={path}",
            "--set",
            "data.options.image_size=32",
            "--protocol",
            "quick",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    if case == "no permission":
        (base / "test").chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_memory_benchmark_runs_both_sizes_in_fresh_processes(tmp_path):
    """The benchmark itself (tiny here: its 200/2,000-image run is `advmend bench --folder-memory DIR`)."""
    from advmend.bench.folder_memory import format_result, run

    res = run(tmp_path, small=4, large=10, size=32)
    assert res[4]["n"] == 4 and res[10]["n"] == 10
    assert res[10]["attacked"] == res[10]["n"] * res[10]["clean_accuracy"] / 100
    assert res["ratio"] == pytest.approx(res[10]["peak_rss_mib"] / res[4]["peak_rss_mib"], abs=1e-3)
    assert "peak RSS 10 / 4 images" in format_result(res, 4, 10)


@pytest.mark.parametrize("dataset", ["cifar10", "npz"])
def test_a_data_root_the_filesystem_refuses_is_one_line(tmp_path, user_model, capsys, dataset):
    root = tmp_path / ("r" * 300)  # longer than any file name may be
    extra = ["--set", "data.options.path=data.npz"] if dataset == "npz" else []
    out = tmp_path / "report"
    code = main(["eval", "--model", user_model, "--dataset", dataset, "--set", f"data.root={root}", *extra,
                 "--protocol", "quick", "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "File name too long" in err and len(err.splitlines()) == 1, err
    assert not out.exists()
