"""In-memory image data sets: a pair of CPU tensors (uint8 images, int64 labels) plus class names.

Everything advmend trains or evaluates on fits in memory, so a data set is just two tensors;
batches are index slices made by :class:`advmend.data.batches.BatchLoader`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, overload

import numpy as np
import torch

from advmend.errors import ConfigError, DataError

__all__ = ["ArrayDataset", "from_numpy", "take", "subset", "split_train_val", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """Mixes several integers (e.g. seed, epoch, rank) into one well-spread 63-bit seed.

    ``seed + epoch`` would make (seed=0, epoch=1) and (seed=1, epoch=0) collide; a SeedSequence
    hash keeps every tuple its own stream.

    Args:
        *parts: Integers; negative values are taken modulo 2**64.

    Returns:
        A non-negative int usable with ``torch.Generator.manual_seed``.
    """
    entropy = [int(p) & 0xFFFF_FFFF_FFFF_FFFF for p in parts]
    lo, hi = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(hi) << 32 | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF


class ImageDataset(Protocol):
    """What evaluation reads from a data set: an in-memory `ArrayDataset` or a streamed `folder.ImageFolder`."""

    @property
    def images(self) -> Any: ...  # (N, C, H, W) uint8: a tensor, or folder.FolderImages, which decodes on indexing

    @property
    def labels(self) -> torch.Tensor: ...

    @property
    def classes(self) -> tuple[str, ...]: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def __len__(self) -> int: ...

    def select(self, idx: torch.Tensor) -> ImageDataset: ...


@dataclass(frozen=True)
class ArrayDataset:
    """An image classification data set held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W), contiguous, on the CPU, values 0..255.
        labels: int64 tensor (N,), values in ``[0, len(classes))``.
        classes: Class names; label ``k`` means ``classes[k]``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise DataError(
                f"images and labels must be torch tensors, got {type(images).__name__} and "
                f"{type(labels).__name__}; use advmend.data.from_numpy for numpy arrays"
            )
        if images.dtype != torch.uint8:
            raise DataError(f"images must be uint8 (0..255), got {images.dtype}")
        if images.ndim != 4:
            raise DataError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if images.device.type != "cpu":
            raise DataError(f"images must live on the CPU, got device {images.device}")
        if labels.dtype != torch.int64:
            raise DataError(f"labels must be int64, got {labels.dtype}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"labels must be ({images.shape[0]},) to match images, got shape {tuple(labels.shape)}")
        if labels.device.type != "cpu":
            raise DataError(f"labels must live on the CPU, got device {labels.device}")
        classes = tuple(str(c) for c in self.classes)
        if not classes:
            raise DataError("a data set needs at least one class name, got none")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= len(classes):
                raise DataError(
                    f"labels must lie in [0, {len(classes) - 1}] for {len(classes)} classes, got range [{lo}, {hi}]"
                )
        # Frozen dataclass: normalise in place with object.__setattr__ (cheap no-ops when already fine).
        object.__setattr__(self, "images", images.contiguous())
        object.__setattr__(self, "labels", labels.contiguous())
        object.__setattr__(self, "classes", classes)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape of one image, (C, H, W)."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, idx: torch.Tensor) -> ArrayDataset:
        """The examples at `idx` (a copy, in that order), as `take` gives them."""
        return take(self, idx)

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes})"


def from_numpy(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ArrayDataset:
    """Builds an :class:`ArrayDataset` from numpy arrays in the usual on-disk layout.

    Args:
        images: uint8 array, NHWC (colour) or NHW (grayscale).
        labels: Integer array (N,).
        classes: Class names.

    Returns:
        The data set, images converted to NCHW.

    Raises:
        DataError: Wrong dtype, rank or length.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]  # NHW grayscale -> NHW1
    if images.ndim != 4:
        raise DataError(f"images must be NHWC or NHW, got shape {images.shape}")
    if images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3):
        raise DataError(f"images must be NHWC or NHW, got shape {images.shape}, which looks like NCHW")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    # transpose is a view; ascontiguousarray makes the one copy into NCHW order.
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return ArrayDataset(
        torch.from_numpy(nchw),
        torch.from_numpy(labels.astype(np.int64, copy=False)),
        tuple(classes),
    )


@overload
def take(ds: ArrayDataset, indices: torch.Tensor | np.ndarray | Sequence[int]) -> ArrayDataset: ...
@overload
def take(ds: ImageDataset, indices: torch.Tensor | np.ndarray | Sequence[int]) -> ImageDataset: ...
def take(ds: ImageDataset, indices: torch.Tensor | np.ndarray | Sequence[int]) -> ImageDataset:
    """Selects examples by integer index (a copy, in the given order).

    Args:
        ds: Source data set.
        indices: 1-D integer indices into ``ds``.

    Returns:
        A new data set with the same classes (an image folder: the folder of those files).

    Raises:
        DataError: Non-integer or out-of-range indices.
    """
    idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
    if idx.numel() == 0:
        idx = idx.reshape(0).long()
    if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex() or idx.ndim != 1:
        raise DataError(f"indices must be a 1-D integer sequence, got dtype {idx.dtype} shape {tuple(idx.shape)}")
    idx = idx.to(device="cpu", dtype=torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(ds)):
        raise DataError(f"indices must lie in [0, {len(ds) - 1}], got range [{int(idx.min())}, {int(idx.max())}]")
    if not isinstance(ds, ArrayDataset):  # an image folder streamed from disk selects files, decodes nothing
        return ds.select(idx)
    return ArrayDataset(ds.images[idx], ds.labels[idx], ds.classes)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    return int(value)


@overload
def subset(ds: ArrayDataset, n: int, seed: int) -> ArrayDataset: ...
@overload
def subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset: ...
def subset(ds: ImageDataset, n: int, seed: int) -> ImageDataset:
    """A seeded random subset of ``n`` examples (in random order).

    The subset for ``n`` is a prefix of the one for a larger ``n`` with the same seed, so
    growing an evaluation subset keeps the examples already evaluated.

    Args:
        ds: Source data set.
        n: Number of examples; ``n >= len(ds)`` returns ``ds`` itself.
        seed: Seed of the selection.

    Returns:
        The subset.

    Raises:
        DataError: ``n <= 0``.
    """
    n = _check_int("n", n)
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}")
    if n >= len(ds):
        return ds
    gen = torch.Generator().manual_seed(derive_seed(_check_int("seed", seed)))
    return take(ds, torch.randperm(len(ds), generator=gen)[:n])


@overload
def split_train_val(ds: ArrayDataset, val_size: int, seed: int) -> tuple[ArrayDataset, ArrayDataset | None]: ...
@overload
def split_train_val(ds: ImageDataset, val_size: int, seed: int) -> tuple[ImageDataset, ImageDataset | None]: ...
def split_train_val(ds: ImageDataset, val_size: int, seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """Splits off a seeded, disjoint, held-out validation set.

    Args:
        ds: Source data set (usually the training split).
        val_size: Number of validation examples; 0 means no validation set.
        seed: Seed of the split.

    Returns:
        ``(train, val)``; ``(ds, None)`` when ``val_size == 0``.

    Raises:
        DataError: ``val_size < 0`` or ``val_size >= len(ds)``.
    """
    val_size = _check_int("val_size", val_size)
    if val_size == 0:
        return ds, None
    if val_size < 0 or val_size >= len(ds):
        raise DataError(f"val_size must lie in [0, {len(ds) - 1}] for a data set of {len(ds)} examples, got {val_size}")
    gen = torch.Generator().manual_seed(derive_seed(_check_int("seed", seed), 1))
    perm = torch.randperm(len(ds), generator=gen)
    # Keep the training part in its original order (memory locality; loaders shuffle anyway).
    train_idx, _ = torch.sort(perm[val_size:])
    return take(ds, train_idx), take(ds, perm[:val_size])
