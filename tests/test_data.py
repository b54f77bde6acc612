"""Tests for advmend.data: sources, array helpers, augmentation and batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from advmend.data import (
    DATASETS,
    ArrayDataset,
    BatchLoader,
    augment_batch,
    dataset_info,
    from_numpy,
    load_dataset,
    resolve_root,
    split_train_val,
    subset,
    take,
)
from advmend.errors import ConfigError, DataError, InputError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write_cifar_layout(path: Path, n_train: int = 20, n_test: int = 10, classes: bool = True) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 8, 8, 3), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 8, 8, 3), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    if classes:
        arrays["classes"] = np.array([f"c{i}" for i in range(10)])
    np.savez(path, **arrays)


def _toy(n: int = 30) -> ArrayDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return ArrayDataset(images, torch.arange(n) % 3, ("a", "b", "c"))


# --------------------------------------------------------------------------- ArrayDataset


def test_array_dataset_properties_and_validation():
    ds = _toy(12)
    assert len(ds) == 12 and ds.num_classes == 3 and ds.image_shape == (3, 4, 4)
    with pytest.raises(DataError, match="uint8"):
        ArrayDataset(ds.images.float(), ds.labels, ds.classes)
    with pytest.raises(DataError, match="int64"):
        ArrayDataset(ds.images, ds.labels.int(), ds.classes)
    with pytest.raises(DataError, match=r"\[0, 1\].*\[0, 2\]"):
        ArrayDataset(ds.images, ds.labels, ("a", "b"))
    with pytest.raises(DataError, match="match"):
        ArrayDataset(ds.images, ds.labels[:5], ds.classes)


def test_from_numpy_nhwc_and_grayscale():
    x = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    x[:, 1, 2, 0] = 7
    ds = from_numpy(x, np.array([0, 1, 0, 1]), ["a", "b"])
    assert ds.image_shape == (3, 5, 6) and ds.labels.dtype == torch.int64
    assert int(ds.images[0, 0, 1, 2]) == 7 and ds.images.is_contiguous()
    gray = from_numpy(np.zeros((2, 5, 6), dtype=np.uint8), np.array([0, 0]), ["a"])
    assert gray.image_shape == (1, 5, 6)
    with pytest.raises(DataError, match="uint8"):
        from_numpy(x.astype(np.float32), np.zeros(4, dtype=int), ["a"])


def test_take_subset_split():
    ds = _toy(30)
    t = take(ds, [3, 1])
    assert t.labels.tolist() == [0, 1] and int(t.images[0, 0, 0, 0]) == 3
    with pytest.raises(DataError):
        take(ds, [30])

    a, b = subset(ds, 10, seed=1), subset(ds, 10, seed=1)
    assert torch.equal(a.images, b.images) and len(a) == 10
    assert not torch.equal(a.images, subset(ds, 10, seed=2).images)
    assert subset(ds, 100, seed=0) is ds
    with pytest.raises(DataError):
        subset(ds, 0, seed=0)

    train, val = split_train_val(ds, 8, seed=3)
    ids_train = set(train.images[:, 0, 0, 0].tolist())
    ids_val = set(val.images[:, 0, 0, 0].tolist())
    assert len(val) == 8 and len(train) == 22
    assert ids_train.isdisjoint(ids_val) and ids_train | ids_val == set(range(30))
    train2, val2 = split_train_val(ds, 8, seed=3)
    assert torch.equal(val.images, val2.images) and torch.equal(train.images, train2.images)
    assert not torch.equal(val.images, split_train_val(ds, 8, seed=4)[1].images)
    assert split_train_val(ds, 0, seed=0) == (ds, None)
    with pytest.raises(DataError):
        split_train_val(ds, 30, seed=0)


# --------------------------------------------------------------------------- sources


def test_npz_pickup_for_builtin_name(tmp_path):
    _write_cifar_layout(tmp_path / "cifar10.npz")
    train = load_dataset("cifar10", "train", root=str(tmp_path))
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert len(train) == 20 and len(test) == 10
    assert train.image_shape == (3, 8, 8) and train.classes[0] == "c0"
    raw = np.load(tmp_path / "cifar10.npz")["x_train"]
    assert torch.equal(train.images, torch.from_numpy(raw).permute(0, 3, 1, 2))


def test_npz_without_classes_gets_canonical_cifar10_names(tmp_path):
    _write_cifar_layout(tmp_path / "cifar10.npz", classes=False)
    assert load_dataset("cifar10", "train", root=tmp_path).classes[:2] == ("airplane", "automobile")


def test_generic_npz_loader(tmp_path):
    _write_cifar_layout(tmp_path / "mine.npz", classes=False)
    ds = load_dataset("npz", "test", path=str(tmp_path / "mine.npz"))
    assert len(ds) == 10 and ds.num_classes == 10
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="x_train"):
        load_dataset("npz", "train", path=str(tmp_path / "bad.npz"))
    with pytest.raises(DataError, match="not found"):
        load_dataset("npz", "train", path=str(tmp_path / "absent.npz"))
    with pytest.raises(ConfigError, match="path"):
        load_dataset("npz", "train")


def _npz_case(tmp_path: Path, case: str) -> Path:
    path = tmp_path / "case.npz"
    x, y = np.zeros((4, 8, 8, 3), np.uint8), np.arange(4)
    if case == "npy":
        np.save(tmp_path / "case.npy", x)
        (tmp_path / "case.npy").rename(path)
    elif case == "huge labels":  # no classes array: 2**40 inferred class names would exhaust memory
        np.savez(path, x_train=x, y_train=np.full(4, 2**40), x_test=x, y_test=y)
    elif case == "empty test":
        np.savez(path, x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    elif case == "truncated":
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
        path.write_bytes(path.read_bytes()[:100])
    return path


@pytest.mark.parametrize(
    "case,needle",
    [("npy", "single array"), ("huge labels", "labels go up to 1099511627776"),
     ("empty test", "test split is empty"), ("truncated", "cannot read")],
)  # fmt: skip
def test_npz_that_cannot_be_used(tmp_path, case, needle):
    path = _npz_case(tmp_path, case)
    with pytest.raises(DataError, match=needle) as info:
        load_dataset("npz", "test", path=str(path))
    assert str(path) in str(info.value)


def test_synthetic_size_is_bounded_and_noise_follows_config_rules():
    with pytest.raises(ConfigError, match=r"too large.*data\.options\.n_train"):
        load_dataset("synthetic", "train", n_train=2**40)
    with pytest.raises(ConfigError, match=r"data\.options\.noise: expected a finite number"):
        load_dataset("synthetic", "train", noise=float("inf"))
    assert len(load_dataset("synthetic", "test", n_test=4, noise="1e-3")) == 4  # YAML 1.1 reads 1e-3 as text


def test_missing_data_message(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "test", root=root, download=False)
    msg = str(info.value)
    assert str(root.resolve()) in msg and "download" in msg and "cifar10.npz" in msg


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10.npz").is_file(),
    reason=f"real CIFAR-10 not available at {SHARED_DATA / 'cifar10.npz'}",
)
def test_real_cifar10():
    ds = load_dataset("cifar10", "train", root=SHARED_DATA)
    assert len(ds) == 50000 and ds.image_shape == (3, 32, 32) and ds.num_classes == 10
    assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
    mean = ds.images.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (len(ds) * 32 * 32 * 255)
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465], dtype=torch.float64), atol=2e-3)
    test = load_dataset("cifar10", "test", root=SHARED_DATA)
    assert len(test) == 10000 and test.classes[0] == "airplane"


def test_folder_dataset(tmp_path):
    from PIL import Image

    for split, n in (("train", 2), ("test", 1)):
        for k, cls in enumerate(("dog", "cat")):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (6, 5), (40 * k, 10 * i, 200)).save(d / f"{i}.png")
    ds = load_dataset("folder", "train", path=str(tmp_path))
    assert ds.classes == ("cat", "dog") and len(ds) == 4 and ds.image_shape == (3, 5, 6)
    assert ds.labels.tolist() == [0, 0, 1, 1]
    # "cat" (k=1, red 40) sorts first; "dog" (k=0, red 0) gets label 1.
    assert int(ds.images[0, 0, 0, 0]) == 40 and int(ds.images[2, 0, 0, 0]) == 0
    assert int(ds.images[0, 2, 0, 0]) == 200
    gray = load_dataset("folder", "test", path=str(tmp_path), image_size=4, grayscale=True)
    assert gray.image_shape == (1, 4, 4) and len(gray) == 2

    Image.new("RGB", (3, 3)).save(tmp_path / "train" / "cat" / "odd.png")
    with pytest.raises(DataError, match="odd.png"):
        load_dataset("folder", "train", path=str(tmp_path))
    assert load_dataset("folder", "train", path=str(tmp_path), image_size=8).image_shape == (3, 8, 8)


def test_synthetic_shapes_and_determinism():
    a = load_dataset("synthetic", "train", n_train=40, image_size=16, num_classes=4)
    b = load_dataset("synthetic", "train", n_train=40, image_size=16, num_classes=4)
    t = load_dataset("synthetic", "test", n_test=20, image_size=16, num_classes=4)
    assert a.image_shape == (3, 16, 16) and len(a) == 40 and len(t) == 20 and a.num_classes == 4
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [10, 10, 10, 10]
    other = load_dataset("synthetic", "train", n_train=40, image_size=16, num_classes=4, seed=1)
    assert not torch.equal(a.images, other.images)
    gray = load_dataset("synthetic", "test", channels=1, n_test=8, image_size=8)
    assert gray.image_shape == (1, 8, 8)


def test_unknown_name_split_option():
    with pytest.raises(ConfigError, match="synthetic"):
        load_dataset("imagenet", "train")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("synthetic", "val")
    with pytest.raises(ConfigError, match="colour"):
        load_dataset("synthetic", "train", colour=True)
    with pytest.raises(ConfigError, match="bogus"):
        load_dataset("cifar10", "train", bogus=1)


def test_resolve_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ADVMEND_DATA", str(tmp_path / "env"))
    assert resolve_root(None) == (tmp_path / "env").resolve()
    assert resolve_root(str(tmp_path / "x")) == (tmp_path / "x").resolve()
    monkeypatch.delenv("ADVMEND_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_root(None) == (tmp_path / "data").resolve() and resolve_root(None).is_absolute()


def test_dataset_info():
    info = dataset_info("cifar10")
    assert info["mean"] == (0.4914, 0.4822, 0.4465) and info["eps"] == pytest.approx(8 / 255)
    assert info["augment"] is True and dataset_info("svhn")["augment"] is False
    assert dataset_info("mnist")["eps"] == pytest.approx(0.3) and len(dataset_info("mnist")["std"]) == 1
    info["eps"] = 1.0
    assert dataset_info("cifar10")["eps"] == pytest.approx(8 / 255)  # a copy
    neutral = dataset_info("synthetic", channels=1)
    assert neutral["mean"] == (0.5,) and neutral["augment"] is False
    assert set(DATASETS.names()) >= {"cifar10", "cifar100", "svhn", "mnist", "npz", "folder", "synthetic"}


# --------------------------------------------------------------------------- augmentation


def test_augment_basic_properties():
    x = torch.rand(16, 3, 8, 8)
    before = x.clone()
    out = augment_batch(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.equal(x, before)
    ident = augment_batch(x, pad=0, flip=False)
    assert torch.equal(ident, x) and ident.data_ptr() != x.data_ptr()
    with pytest.raises(InputError):
        augment_batch(torch.rand(3, 8, 8))


def test_augment_reproducible():
    x = torch.rand(32, 3, 8, 8)
    a = augment_batch(x, generator=torch.Generator().manual_seed(5))
    b = augment_batch(x, generator=torch.Generator().manual_seed(5))
    c = augment_batch(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _shifted(img: torch.Tensor, pad: int, dy: int, dx: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    return torch.nn.functional.pad(img, (pad,) * 4)[:, dy : dy + h, dx : dx + w]


def test_augment_is_shifted_copy_or_flip():
    pad = 2
    # Distinct positive values so every (offset, flip) candidate is distinguishable.
    x = (torch.arange(12 * 2 * 5 * 5, dtype=torch.float32) + 1).view(12, 2, 5, 5)
    out = augment_batch(x, pad=pad, generator=torch.Generator().manual_seed(0))
    flips = 0
    for i in range(len(x)):
        matches = [
            (dy, dx, f)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for f in (False, True)
            if torch.equal(out[i], _shifted(x[i], pad, dy, dx).flip(-1) if f else _shifted(x[i], pad, dy, dx))
        ]
        assert len(matches) == 1, f"example {i} is no shifted copy/flip"
        flips += matches[0][2]
    assert 0 < flips < len(x)  # both branches exercised with this seed

    # One offset checked by hand: crop at (0, 0) without flip shows the top-left padding.
    img = torch.ones(1, 1, 3, 3)
    offsets = [augment_batch(img, pad=1, flip=False, generator=torch.Generator().manual_seed(s)) for s in range(40)]
    top_left = torch.tensor([[[[0.0, 0, 0], [0, 1, 1], [0, 1, 1]]]])
    assert any(torch.equal(o, top_left) for o in offsets)


# --------------------------------------------------------------------------- BatchLoader


def _ids(batches) -> list[int]:
    # _toy images hold their index in every pixel; /255 undoes the float conversion.
    return [int(round(v * 255)) for x, _ in batches for v in x[:, 0, 0, 0].tolist()]


def test_loader_covers_every_index_once():
    ds = _toy(30)
    loader = BatchLoader(ds, 7, shuffle=True, seed=1)
    assert len(loader) == 5
    batches = list(loader)
    assert [len(y) for _, y in batches] == [7, 7, 7, 7, 2]
    assert sorted(_ids(batches)) == list(range(30))
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 4, 4)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert y.tolist() == [i % 3 for i in _ids(batches[:1])]
    dropped = BatchLoader(ds, 7, shuffle=True, drop_last=True)
    assert len(dropped) == 4 and len(list(dropped)) == 4


def test_loader_order_depends_on_seed_and_epoch():
    ds = _toy(30)
    loader = BatchLoader(ds, 8, shuffle=True, seed=3)
    e0 = _ids(loader)
    assert _ids(loader) == e0  # same epoch -> same order
    loader.set_epoch(1)
    e1 = _ids(loader)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    again = BatchLoader(ds, 8, shuffle=True, seed=3)
    again.set_epoch(1)
    assert _ids(again) == e1
    assert _ids(BatchLoader(ds, 8, shuffle=False)) == list(range(30))


def test_loader_ranks_disjoint_and_cover():
    ds = _toy(30)
    shares = [_ids(BatchLoader(ds, 4, shuffle=True, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 15
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(30))
    odd = [_ids(BatchLoader(_toy(31), 4, shuffle=True, rank=r, world_size=2)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 16 and set(odd[0]) | set(odd[1]) == set(range(31))
    with pytest.raises(ConfigError):
        BatchLoader(ds, 4, shuffle=True, rank=2, world_size=2)


def test_loader_augment_reproducible():
    ds = load_dataset("synthetic", "train", n_train=64, image_size=8)
    a = [x for x, _ in BatchLoader(ds, 16, shuffle=True, augment=True, seed=2)]
    b = [x for x, _ in BatchLoader(ds, 16, shuffle=True, augment=True, seed=2)]
    plain = [x for x, _ in BatchLoader(ds, 16, shuffle=True, augment=False, seed=2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, plain))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])  # fmt: skip
def test_loader_device(device):
    ds = load_dataset("synthetic", "test", n_test=20, image_size=8)
    for x, y in BatchLoader(ds, 8, shuffle=False, device=device, augment=True):
        assert x.device.type == device and y.device.type == device
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
