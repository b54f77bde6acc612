"""Where data sets come from: ``.npz`` files, torchvision, image folders, a synthetic toy set.

Every loader has the signature ``load(root: Path, split: str, download: bool, **opts)`` and
returns an :class:`~advmend.data.arrays.ArrayDataset`, except ``folder``, which returns an
:class:`~advmend.data.folder.ImageFolder` streamed from disk (same attributes, decoded on demand).
Use :func:`load_dataset`, which resolves the root, checks the split and rejects unknown options.
"""

from __future__ import annotations

import inspect
import os
import pickle
import shutil
import warnings
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F

from advmend.data.arrays import ArrayDataset, derive_seed, from_numpy
from advmend.data.folder import ImageFolder
from advmend.errors import ConfigError, DataError
from advmend.registry import Registry
from advmend.types import STANDARD_RADII, Radii
from advmend.values import parse_number

__all__ = ["DATASETS", "DATASET_INFO", "SPLITS", "dataset_info", "dataset_radii", "load_dataset", "resolve_root"]

DATASETS: Registry[Callable[..., ArrayDataset | ImageFolder]] = Registry("dataset")
SPLITS = ("train", "test")

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

_DIGITS = tuple(str(i) for i in range(10))

DATASET_INFO: dict[str, dict[str, Any]] = {
    "cifar10": {
        "mean": (0.4914, 0.4822, 0.4465), "std": (0.2471, 0.2435, 0.2616), "eps": 8 / 255,
        "augment": True, "num_classes": 10, "image_shape": (3, 32, 32),
    },
    "cifar100": {
        "mean": (0.5071, 0.4865, 0.4409), "std": (0.2673, 0.2564, 0.2762), "eps": 8 / 255,
        "augment": True, "num_classes": 100, "image_shape": (3, 32, 32),
    },
    "svhn": {
        "mean": (0.4377, 0.4438, 0.4728), "std": (0.198, 0.201, 0.197), "eps": 8 / 255,
        "augment": False, "num_classes": 10, "image_shape": (3, 32, 32),
    },
    "mnist": {
        "mean": (0.1307,), "std": (0.3081,), "eps": 0.3,
        "augment": False, "num_classes": 10, "image_shape": (1, 28, 28),
    },
}  # fmt: skip


def dataset_info(name: str, *, channels: int = 3) -> dict[str, Any]:
    """Normalisation statistics, default L-inf eps and augmentation convention of a data set.

    Args:
        name: A registered data set name.
        channels: Channel count used for the neutral defaults of npz/folder/synthetic.

    Returns:
        A fresh dict with keys ``mean``, ``std`` (per-channel tuples), ``eps`` (float),
        ``augment`` (bool: pad-crop+flip is standard), ``num_classes`` and ``image_shape``
        (``None`` where they depend on the files).

    Raises:
        ConfigError: Unknown data set name.
    """
    DATASETS.get(name)  # raises ConfigError listing the valid names
    if name in DATASET_INFO:
        return dict(DATASET_INFO[name])
    return {
        "mean": (0.5,) * channels, "std": (0.5,) * channels, "eps": 8 / 255,
        # An image folder trains with a random-resized crop and flip, made while decoding.
        "augment": name == "folder", "num_classes": None, "image_shape": None,
    }  # fmt: skip


# The smallest image side at which a data set without radii of its own is taken as ImageNet-like: ImageNet
# models are evaluated at 224 x 224, and the ImageNet radii (4/255, L2 3.0) are sized for that many pixels.
IMAGENET_SIDE = 224


def dataset_radii(name: str, image_shape: tuple[int, ...] | None = None, row: str | None = None) -> Radii:
    """The standard attack radius of each norm on a data set (what an attack with eps null uses).

    Args:
        name: A registered data set name.
        image_shape: (C, H, W) of its images, when known; it decides the row of a data set without radii
            of its own (folder, npz, synthetic): ImageNet's for images of at least `IMAGENET_SIDE` pixels a
            side, else CIFAR-10's.
        row: A `STANDARD_RADII` row chosen by the user (`data.radii`); it overrides both rules.

    A built-in data set keeps its own L-inf radius (MNIST 0.3) and CIFAR-10's L2 and L1 radii.

    Raises:
        ConfigError: Unknown data set name or row.
    """
    info = dataset_info(name)
    if row is not None:
        if row not in STANDARD_RADII:
            raise ConfigError(f"data.radii must be one of {sorted(STANDARD_RADII)}, got {row!r}")
        return Radii(name, row, dict(STANDARD_RADII[row]))
    if name in DATASET_INFO:
        return Radii(name, "cifar10", STANDARD_RADII["cifar10"] | {"linf": float(info["eps"])})
    large = image_shape is not None and min(image_shape[-2:]) >= IMAGENET_SIDE
    row = "imagenet" if large else "cifar10"
    return Radii(name, row, dict(STANDARD_RADII[row]))


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """The data root: ``root`` if given, else ``$ADVMEND_DATA``, else ``./data``; made absolute."""
    if root is None or str(root) == "":
        root = os.environ.get("ADVMEND_DATA") or "data"
    return Path(root).expanduser().resolve()


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    **opts: Any,
) -> ArrayDataset | ImageFolder:
    """Loads one split of a registered data set into memory.

    Args:
        name: Registered name (``DATASETS.names()``): cifar10, cifar100, svhn, mnist, npz,
            folder, synthetic.
        split: ``"train"`` or ``"test"``.
        root: Data folder (see :func:`resolve_root`).
        download: Let torchvision download a missing built-in data set.
        **opts: Loader options (e.g. ``path`` for npz/folder, ``image_size``).

    Returns:
        The data set.

    Raises:
        ConfigError: Unknown name, split or option.
        DataError: Data missing or malformed.
    """
    loader = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} for dataset {name!r}; choose one of: {', '.join(SPLITS)}")
    allowed = [p for p in inspect.signature(loader).parameters if p not in ("root", "split", "download")]
    for key in opts:
        if key not in allowed:
            raise ConfigError(
                f"data.options.{key}: dataset {name!r} has no option {key!r}; "
                f"its options: {', '.join(allowed) or 'none'}"
            )
    base = resolve_root(root)
    try:
        ds = loader(base, split, bool(download), **opts)
    except OSError as err:  # the filesystem refuses a path (a name too long, no permission, a loop): one line
        where = err.filename if err.filename else base
        raise DataError(f"dataset {name!r}: cannot read {where} ({err.strerror or err}); give another "
                        "data.root or data.options.path") from None  # fmt: skip
    if len(ds) == 0:  # nothing downstream can train on or evaluate zero examples (torch.cat fails)
        where = f" ({opts['path']})" if opts.get("path") else ""
        raise DataError(f"dataset {name!r}{where}: the {split} split is empty (0 examples); give data with a "
                        f"non-empty {split} split")  # fmt: skip
    return ds


# --------------------------------------------------------------------------- npz files


_MAX_INFERRED_CLASSES = 100_000


def _read_npz(path: Path, split: str, default_classes: tuple[str, ...] | None) -> ArrayDataset:
    """Reads ``x_<split>``/``y_<split>`` (+ optional ``classes``) from a cifar10.npz-style file."""
    try:
        # Our own file handle: np.load leaves its own open when the archive turns out to be corrupt.
        with open(path, "rb") as fh:
            data = np.load(fh, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds a single array, not an .npz archive of x_train, y_train, x_test, "
                                "y_test (save it with numpy.savez)")  # fmt: skip
            keys = set(data.files)
            need = {f"x_{split}", f"y_{split}"}
            if not need <= keys:
                raise DataError(
                    f"{path} lacks arrays {sorted(need - keys)} (has {sorted(keys)}); expected the layout "
                    "of cifar10.npz (docs/getting-started.md#data): x_train, y_train, x_test, y_test, optional classes"
                )
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            if "classes" in keys:
                classes = tuple(str(c) for c in data["classes"])
            elif default_classes is not None:
                classes = default_classes
            else:
                # Infer from all labels present so train and test agree on the class count. Only integer
                # labels count (from_numpy rejects the others with its own message).
                tops = [int(a.max()) for a in (data[k] for k in ("y_train", "y_test") if k in keys)
                        if a.size and np.issubdtype(a.dtype, np.integer)]  # fmt: skip
                top = max(tops, default=0)
                if top >= _MAX_INFERRED_CLASSES:  # one name per class: 2**40 names would exhaust memory
                    raise DataError(
                        f"{path}: labels go up to {top}; with more than {_MAX_INFERRED_CLASSES:,} classes "
                        "give their names in a `classes` array (or check the labels)"
                    )
                classes = tuple(str(i) for i in range(max(top, 0) + 1))
    except (OSError, ValueError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"cannot read {path}: {err}") from err
    try:
        return from_numpy(x, y, classes)
    except DataError as err:
        raise DataError(f"{path} ({split}): {err}") from err


@DATASETS.register("npz")
def load_npz(root: Path, split: str, download: bool, *, path: str | None = None) -> ArrayDataset:
    """A ``.npz`` file with the layout of cifar10.npz (docs/getting-started.md#data) (option ``path``).

    A relative ``path`` is looked up in the current directory, then in the data root.
    """
    file = _find_path("npz", path, root)
    if not file.is_file():
        raise DataError(f"npz file {file} not found (or not a file); set --set data.options.path=FILE.npz")
    return _read_npz(file, split, None)


# --------------------------------------------------------------------------- built-ins


def _missing(name: str, root: Path, download: bool, err: BaseException) -> DataError:
    if download:
        why = " ".join(str(err).split())[:300]  # torchvision's download errors span several lines
        head = f"{name} not found in {root} and downloading it failed ({type(err).__name__}: {why})"
        tail = ", or retry the download where the internet can be reached"
    else:
        head = f"{name} not found in {root}"
        tail = ", or allow downloading with --set data.download=true"
    return DataError(
        f"{head}: put {name}.npz (the layout of cifar10.npz (docs/getting-started.md#data)) there, set ADVMEND_DATA "
        f"or --set data.root=DIR to a folder that has it{tail}"
    )


# Folders torchvision keeps its copy of each data set in, inside the data root.
_TV_DIRS: dict[str, tuple[str, ...]] = {
    "cifar10": ("cifar-10-batches-py",), "cifar100": ("cifar-100-python",), "mnist": ("MNIST",), "svhn": (),
}  # fmt: skip


def _cache_file(name: str, root: Path, split: str) -> Path:
    """The file (or folder) of torchvision's cached copy that `split` of `name` is read from."""
    if name == "mnist":
        legacy = root / "MNIST" / "processed" / ("training.pt" if split == "train" else "test.pt")
        return legacy if legacy.exists() else root / "MNIST" / "raw"
    if name == "svhn":
        return root / f"{split}_32x32.mat"
    return root / _TV_DIRS[name][0]


def _walk(folder: Path) -> set[Path]:
    return {Path(d) / f for d, dirs, files in os.walk(folder) for f in [*dirs, *files]}


class _UndoNewPaths:
    """Remembers what a download may touch (the missing ancestors of the data root, the root's entries,
    and the files in torchvision's folders for this data set) so that a failed attempt can remove what it
    created, and only that: an empty folder or a partial archive left behind looks like data later."""

    def __init__(self, name: str, root: Path) -> None:
        self.root = root
        self.missing = [p for p in [root, *root.parents] if not p.exists()]  # deepest first
        self.top = set(root.iterdir()) if root.is_dir() else set()
        self.deep = {root / d: _walk(root / d) for d in _TV_DIRS[name] if (root / d).is_dir()}

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def undo(self) -> None:
        try:
            if self.root.is_dir() and not self.missing:
                for entry in set(self.root.iterdir()) - self.top:
                    self._remove(entry)
                for folder, known in self.deep.items():
                    # Deepest first, so a new folder is removed whole before its parent is looked at.
                    for path in sorted(_walk(folder) - known, key=lambda p: len(p.parts), reverse=True):
                        if path.exists() or path.is_symlink():
                            self._remove(path)
            elif self.missing:
                shutil.rmtree(self.missing[-1], ignore_errors=True)  # the top folder the attempt created
        except OSError:  # best effort: never hide the download's own error behind a cleanup error
            pass


def _torchvision(name: str, root: Path, split: str, download: bool) -> ArrayDataset:
    import torchvision.datasets as tvd  # imported lazily: slow, and only needed without an npz

    train = split == "train"
    undo = _UndoNewPaths(name, root)
    try:
        with warnings.catch_warnings():  # torch.load's notes on a cached file are not the user's concern
            warnings.simplefilter("ignore")
            return _torchvision_read(tvd, name, root, split, train, download)
    except DataError as err:  # from_numpy: the cached arrays are not images and labels
        file = _cache_file(name, root, split)
        raise DataError(f"{name}: torchvision's cached copy {file} is malformed: {err}") from None
    except ImportError as err:  # torchvision's SVHN reader needs scipy
        raise DataError(
            f"{name} from torchvision needs {err.name or 'a missing package'} ({err}); install it "
            f"or put {name}.npz into {root}"
        ) from err
    except (RuntimeError, URLError, OSError) as err:
        undo.undo()
        if download or "not found" in str(err).lower() or isinstance(err, FileNotFoundError):
            raise _missing(name, root, download, err) from err
        raise _bad_cache(name, root, split, err) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        # A cached file that is not what torchvision wrote (a pickle with code is refused by
        # torch.load(weights_only=True), a truncated file, another object): name it, do not crash.
        raise _bad_cache(name, root, split, err) from None


def _torchvision_read(tvd: Any, name: str, root: Path, split: str, train: bool, download: bool) -> ArrayDataset:
    """torchvision's copy of `name` as an ArrayDataset (downloaded first when `download`)."""
    if name == "cifar10":
        tv = tvd.CIFAR10(str(root), train=train, download=download)
        return from_numpy(tv.data, np.asarray(tv.targets), CIFAR10_CLASSES)
    if name == "cifar100":
        tv = tvd.CIFAR100(str(root), train=train, download=download)
        return from_numpy(tv.data, np.asarray(tv.targets), tuple(tv.classes))
    if name == "svhn":
        tv = tvd.SVHN(str(root), split=split, download=download)
        # SVHN .data is NCHW; the transpose view turns it back into NHWC without a copy.
        return from_numpy(tv.data.transpose(0, 2, 3, 1), tv.labels, _DIGITS)
    tv = tvd.MNIST(str(root), train=train, download=download)
    return from_numpy(np.asarray(tv.data), np.asarray(tv.targets), _DIGITS)


def _bad_cache(name: str, root: Path, split: str, err: BaseException) -> DataError:
    if isinstance(err, pickle.UnpicklingError):  # torch.load(weights_only=True) refused it: nothing ran
        why = "not a plain tensor file: refused unread, nothing in it was run"
    else:
        first = str(err).splitlines()[0] if str(err) else ""
        why = f"{type(err).__name__}: {first[:200]}"
    return DataError(
        f"{name}: cannot read torchvision's cached copy {_cache_file(name, root, split)} ({why}); "
        f"delete it and download again, or put {name}.npz into {root}"
    )


_BUILTIN_CLASSES: dict[str, tuple[str, ...]] = {
    "cifar10": CIFAR10_CLASSES,
    "cifar100": tuple(str(i) for i in range(100)),
    "svhn": _DIGITS,
    "mnist": _DIGITS,
}


def _builtin(name: str) -> Callable[..., ArrayDataset]:
    def load(root: Path, split: str, download: bool) -> ArrayDataset:
        npz = root / f"{name}.npz"
        if npz.is_file():  # a local npz always wins: no torchvision, no network
            return _read_npz(npz, split, _BUILTIN_CLASSES[name])
        return _torchvision(name, root, split, download)

    load.__name__ = f"load_{name}"
    load.__doc__ = f"{name}: ``<root>/{name}.npz`` if present, else torchvision's copy in ``root``."
    return load


for _name in _BUILTIN_CLASSES:
    DATASETS.register(_name)(_builtin(_name))


# --------------------------------------------------------------------------- image folders


def _find_path(dataset: str, path: str | os.PathLike[str] | None, root: Path) -> Path:
    if path is None or str(path) == "":
        raise ConfigError(f"dataset {dataset!r} needs the option path (e.g. --set data.options.path=...)")
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    return p.resolve()


@DATASETS.register("folder")
def load_folder(
    root: Path,
    split: str,
    download: bool,
    *,
    path: str | None = None,
    image_size: int | None = None,
    grayscale: bool = False,
    workers: int | None = None,
) -> ImageFolder:
    """Images in ``<path>/<split>/<class>/*.png|jpg|jpeg|bmp`` (ImageNet's layout), streamed from disk.

    Classes are the sorted union of the class folders of the train and test splits, so both share
    labels. With ``image_size`` S, evaluation resizes the shorter side to S / 0.875 and crops the
    centre S x S, training takes a random-resized crop and flip (:mod:`advmend.data.folder`); without
    it all images must share one size. ``workers`` decoding processes (default: up to 4, one per CPU).
    A relative ``path`` is looked up in the current directory, then in the data root.
    """
    base = _find_path("folder", path, root)
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    if image_size is not None and bad_size:
        raise ConfigError(f"data.options.image_size must be a positive integer, got {image_size!r}")
    if not isinstance(grayscale, bool):
        raise ConfigError(f"data.options.grayscale must be true or false, got {grayscale!r}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"data.options.workers must be an integer >= 0, got {workers!r}")
    return ImageFolder.read(base, split, SPLITS, image_size=image_size, grayscale=grayscale, workers=workers)


# --------------------------------------------------------------------------- synthetic


_SYNTHETIC_MAX = 2**28  # values per split: 256 MiB of uint8 (CIFAR-10's train split is 150 M)


@DATASETS.register("synthetic")
def load_synthetic(
    root: Path,
    split: str,
    download: bool,
    *,
    num_classes: int = 10,
    image_size: int = 32,
    channels: int = 3,
    n_train: int = 512,
    n_test: int = 256,
    seed: int = 0,
    noise: float = 0.2,
) -> ArrayDataset:
    """A deterministic, learnable toy set for tests; needs no files.

    Each class has a smooth random prototype (a coarse random grid upsampled bilinearly);
    an example is ``clip(prototype + noise * N(0, 1), 0, 1)`` quantised to uint8. Train and
    test share the prototypes and draw examples from different streams. Labels are balanced.
    """
    for key, val, lo in (("num_classes", num_classes, 2), ("image_size", image_size, 1),
                         ("channels", channels, 1), ("n_train", n_train, 1), ("n_test", n_test, 1)):  # fmt: skip
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise ConfigError(f"data.options.{key} must be an integer >= {lo}, got {val!r}")
    noise = parse_number(noise, "data.options.noise")  # the config rule: finite, "1e-3" and "1/10" too
    if noise < 0:
        raise ConfigError(f"data.options.noise must be >= 0, got {noise!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"data.options.seed must be an integer, got {seed!r}")
    # A toy set for tests: bound its size (the float intermediates are 4x the uint8 images), so a typo
    # such as n_train=10**9 is an error and not an out-of-memory crash.
    for key, rows in (("n_train" if split == "train" else "n_test", n_train if split == "train" else n_test),
                      ("num_classes", num_classes)):  # fmt: skip
        if rows * channels * image_size * image_size > _SYNTHETIC_MAX:
            raise ConfigError(
                f"synthetic data of {rows} x {channels}x{image_size}x{image_size} values is too large "
                f"(at most {_SYNTHETIC_MAX:,} values); lower data.options.{key}, image_size or channels"
            )
    proto_gen = torch.Generator().manual_seed(derive_seed(seed, 0))
    grid = max(2, image_size // 4)  # coarse grid => smooth, spatially structured prototypes
    coarse = torch.rand(num_classes, channels, grid, grid, generator=proto_gen)
    protos = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    n = n_train if split == "train" else n_test
    gen = torch.Generator().manual_seed(derive_seed(seed, 1 if split == "train" else 2))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    eps = torch.randn(n, channels, image_size, image_size, generator=gen)
    x = protos[labels] + float(noise) * eps
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return ArrayDataset(images.contiguous(), labels, tuple(str(i) for i in range(num_classes)))
