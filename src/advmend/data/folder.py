"""Image folders (ImageNet's layout, ``<path>/<split>/<class>/<image>``) streamed from disk.

An :class:`ImageFolder` holds only the file names (one numpy byte-string array: worker processes
read it without touching Python reference counts, so copy-on-write pages stay shared) and the
labels; images are decoded when a batch asks for them, by DataLoader worker processes. Peak memory
therefore depends on the batch size, not on the number of images.

It offers what the rest of advmend reads from an :class:`~advmend.data.arrays.ArrayDataset`:
``labels``, ``classes``, ``image_shape``, ``len()`` and ``images[...]`` (a view that decodes the
selected images: ``images[idx]``, ``images[a:b]``, ``images.index_select(0, idx)``), and
``select(idx)`` (what :func:`~advmend.data.arrays.take`, ``subset`` and ``split_train_val`` use:
a smaller folder, nothing decoded). :class:`~advmend.data.batches.BatchLoader` streams it.

Transforms, at ``image_size`` S:

- evaluation: resize the shorter side to round(S / 0.875) (256 for 224), then the central S x S crop;
- training (``BatchLoader(augment=True)``): random-resized-crop (scale 0.08..1, aspect 3/4..4/3,
  torchvision's algorithm) to S x S, then a horizontal flip with probability 1/2, drawn from
  (seed, epoch, rank, image index), so a batch is the same whichever worker decodes it.

Without ``image_size`` every image must already have one size (checked when the folder is read).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from advmend.data.arrays import derive_seed
from advmend.errors import ConfigError, DataError

__all__ = ["ImageFolder", "FolderImages", "scan_folder", "eval_transform", "random_resized_crop_box"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CROP_FRACTION = 0.875  # the evaluation crop's share of the resized shorter side (224 of 256)
_TRAIN_STREAM = 2  # derive_seed tag of the random-resized-crop draws (BatchLoader uses 0 and 1)


def _pil():
    from PIL import Image  # lazy: only image folders need PIL

    return Image


def _read_error(file: str | Path, err: BaseException) -> DataError:
    Image = _pil()
    if isinstance(err, Image.DecompressionBombError):
        # PIL refuses images above Image.MAX_IMAGE_PIXELS: decoding one could exhaust memory.
        return DataError(f"image {file} is too large to decode safely ({err})")
    return DataError(f"cannot read image {file}: {type(err).__name__}: {err}")


def _read_errors() -> tuple[type[BaseException], ...]:
    """PIL's ways to say "corrupt" (and "too large to decode safely")."""
    return (OSError, SyntaxError, ValueError, EOFError, _pil().DecompressionBombError)


def scan_folder(
    base: Path, split: str, splits: Sequence[str], *, native: bool, grayscale: bool
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], tuple[int, int, int] | None]:
    """The files of ``base/split``, their labels, the class names and (with ``native``) the one image shape.

    Classes are the sorted union of the class folders of every split, so that train and test share
    labels. Every file's header is opened (cheap: PIL reads no pixels) so that a file that is not an
    image is named now, not in the middle of an evaluation.

    Raises:
        DataError: No split folder, no class folder, no image, an unreadable file (named), or (with
            ``native``) images of different sizes.
    """
    Image = _pil()
    split_dir = base / split
    # A path the filesystem refuses (permission, a name too long) raises OSError: load_dataset makes it one line.
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found; expected {base}/{{train,test}}/<class>/<image>")
    classes = sorted({d.name for s in splits if (base / s).is_dir() for d in os.scandir(base / s) if d.is_dir()})
    if not classes:
        raise DataError(f"image folder {split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    files: list[bytes] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cls_dir = split_dir / cls
        if not cls_dir.is_dir():
            continue
        names = sorted(e.name for e in os.scandir(cls_dir) if e.name.lower().endswith(IMAGE_SUFFIXES))
        files += [os.fsencode(cls_dir / n) for n in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(f"no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)}) under {split_dir}/<class>/")
    first: tuple[bytes, tuple[int, int]] | None = None
    for file in files:
        try:
            with Image.open(os.fsdecode(file)) as img:
                size = img.size
        except _read_errors() as err:
            raise _read_error(os.fsdecode(file), err) from None
        if not native:
            continue
        if first is None:
            first = (file, size)
        elif size != first[1]:
            raise DataError(
                f"image {os.fsdecode(file)} is {size[0]}x{size[1]} but {os.fsdecode(first[0])} is "
                f"{first[1][0]}x{first[1][1]}; set the folder option image_size=N to resize and crop all"
            )
    shape = None
    if first is not None:
        shape = (1 if grayscale else 3, first[1][1], first[1][0])
    return np.array(files), np.asarray(labels, dtype=np.int64), tuple(classes), shape


def eval_transform(img: Any, size: int) -> Any:
    """Resize the shorter side to round(size / 0.875) (bilinear, antialiased), then the central crop."""
    Image = _pil()
    w, h = img.size
    short = round(size / CROP_FRACTION)
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))  # torchvision's rounding
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop covering `scale` of the area at an aspect ratio in
    `ratio` (log-uniform); after 10 misses the central crop at the nearest allowed ratio (torchvision's
    RandomResizedCrop.get_params, drawn from `rng`)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


class ImageFolder(Dataset):
    """An image folder read lazily; ``folder[i]`` is (uint8 tensor (C, H, W), int label).

    Build it with ``load_dataset("folder", split, path=..., image_size=224)``.

    Attributes:
        labels: int64 tensor (N,).
        classes: Class names; label ``k`` means ``classes[k]``.
        image_size: Side of the square images it yields, or None for the files' own size.
        workers: Decoding worker processes (0: decode in this process).
    """

    def __init__(self, files: np.ndarray, labels: torch.Tensor, classes: tuple[str, ...],
                 image_shape: tuple[int, int, int], *, image_size: int | None, grayscale: bool,
                 workers: int) -> None:  # fmt: skip
        self.files = files
        self.labels = labels
        self.classes = classes
        self.image_size = image_size
        self.grayscale = grayscale
        self.workers = workers
        self._shape = image_shape
        # Set by BatchLoader for a training epoch: (seed, epoch, rank) of the random-resized-crop draws.
        self.train_draws: tuple[int, int, int] | None = None

    @classmethod
    def read(cls, base: Path, split: str, splits: Sequence[str], *, image_size: int | None, grayscale: bool,
             workers: int) -> ImageFolder:  # fmt: skip
        """Scans ``base/split`` (see :func:`scan_folder`)."""
        files, labels, classes, shape = scan_folder(base, split, splits, native=image_size is None,
                                                    grayscale=grayscale)  # fmt: skip
        if shape is None:
            shape = (1 if grayscale else 3, int(image_size or 0), int(image_size or 0))
        return cls(files, torch.from_numpy(labels), classes, shape, image_size=image_size, grayscale=grayscale,
                   workers=workers)  # fmt: skip

    # --- what an ArrayDataset offers
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self._shape

    @property
    def images(self) -> FolderImages:
        """A view that decodes the images it is indexed with (evaluation transform)."""
        return FolderImages(self)

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def __repr__(self) -> str:
        return f"ImageFolder(n={len(self)}, image_shape={self.image_shape}, num_classes={self.num_classes})"

    def select(self, idx: torch.Tensor) -> ImageFolder:
        """The folder restricted to the (checked, in-range) indices `idx`, in that order; nothing decoded."""
        order = idx.numpy()
        return ImageFolder(self.files[order], self.labels[idx], self.classes, self._shape,
                           image_size=self.image_size, grayscale=self.grayscale, workers=self.workers)  # fmt: skip

    def with_train_draws(self, seed: int, epoch: int, rank: int) -> ImageFolder:
        """The same files, decoded with the training transform drawn from (seed, epoch, rank)."""
        out = ImageFolder(self.files, self.labels, self.classes, self._shape, image_size=self.image_size,
                          grayscale=self.grayscale, workers=self.workers)  # fmt: skip
        out.train_draws = (int(seed), int(epoch), int(rank))
        return out

    # --- decoding
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        file = os.fsdecode(self.files[index])
        Image = _pil()
        try:
            with Image.open(file) as img:
                img = img.convert("L" if self.grayscale else "RGB")
                if self.train_draws is not None:
                    img = self._train_transform(img, int(index))
                elif self.image_size is not None:
                    img = eval_transform(img, self.image_size)
                arr = np.asarray(img, dtype=np.uint8)
        except _read_errors() as err:
            raise _read_error(file, err) from None
        if arr.ndim == 2:
            arr = arr[..., None]
        x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        if tuple(x.shape) != self._shape:  # a file replaced after the folder was read
            raise DataError(f"image {file} decodes to {tuple(x.shape)} (CxHxW) but the folder's images are "
                            f"{self._shape}; set the folder option image_size=N")  # fmt: skip
        return x, int(self.labels[index])

    def _train_transform(self, img: Any, index: int) -> Any:
        Image = _pil()
        assert self.train_draws is not None
        seed, epoch, rank = self.train_draws
        # Drawn per (seed, epoch, rank, index): independent of which worker decodes the image.
        rng = np.random.default_rng(derive_seed(seed, epoch, rank, _TRAIN_STREAM, index))
        out_w, out_h = (self.image_size, self.image_size) if self.image_size else img.size
        box = random_resized_crop_box(img.size[0], img.size[1], rng)
        img = img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def batches(self, order: torch.Tensor, batch_size: int, *, pin_memory: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """(uint8 images, labels) batches of the examples `order`, in order, decoded by the worker processes."""
        keep_large_blocks_mapped()
        chunks = [c.tolist() for c in torch.split(order, batch_size)] if order.numel() else []
        if not chunks:
            return
        workers = min(self.workers, len(chunks))
        loader = DataLoader(self, batch_sampler=chunks, num_workers=workers, pin_memory=pin_memory)
        try:
            yield from loader
        except DataError as err:  # a worker's DataError comes back with its traceback as the message
            raise _from_worker(err) from None

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 images (k, C, H, W) of `indices` (evaluation transform), split among the workers."""
        k = int(indices.numel())
        if k == 0:
            return torch.empty((0, *self._shape), dtype=torch.uint8)
        per_worker = math.ceil(k / max(1, self.workers))
        return torch.cat([x for x, _ in self.batches(indices, per_worker)])


MMAP_THRESHOLD = 4 << 20  # bytes: a batch of 224-pixel images and everything the size of one is above it
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_mapped = False


def keep_large_blocks_mapped() -> None:
    """Serve allocations of 4 MiB and more (image batches, their gradients) by mmap, so each is returned to
    the system when freed. glibc otherwise raises its mmap threshold to the size of the first such block
    freed and serves later ones from the heap, where a stream of freed and reallocated batches fragments
    memory: the peak then grows with the number of batches streamed, not with the batch size (measured:
    +60 % from 200 to 2,000 images at 224 pixels, +0.1 % with this). Process-wide, once; a no-op where
    the C library is not glibc."""
    global _mapped
    if _mapped:
        return
    _mapped = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): its allocator is left alone
        pass


def _from_worker(err: DataError) -> DataError:
    """A DataLoader worker's DataError, back as one line (the last line of the traceback it sends)."""
    text = str(err).strip().splitlines()
    last = text[-1] if text else ""
    marker = "DataError: "
    if len(text) > 1 and marker in last:
        return DataError(last.split(marker, 1)[1])
    return err


class FolderImages:
    """``folder.images``: indexing along the first axis decodes those images (uint8, N x C x H x W).

    Supports what evaluation code does with an in-memory image tensor: an int, a slice, an index
    tensor or sequence, optionally followed by indices of the other axes (``images[0, 0, 0, 0]``);
    ``index_select(0, idx)``; ``float()`` (every image: only for what needs them all at once).
    """

    def __init__(self, folder: ImageFolder) -> None:
        self._folder = folder

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._folder), *self._folder.image_shape))

    dtype = torch.uint8

    def __len__(self) -> int:
        return len(self._folder)

    def __getitem__(self, key: Any) -> torch.Tensor:
        rest: tuple = ()
        if isinstance(key, tuple):
            key, rest = key[0], tuple(key[1:])
        n = len(self._folder)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of range for {n} images")
            one = self._folder.decode(torch.tensor([i % n]))[0]
            return one[rest] if rest else one
        if isinstance(key, slice):
            idx = torch.arange(n)[key]
        else:
            idx = torch.as_tensor(np.asarray(key) if not isinstance(key, torch.Tensor) else key).reshape(-1)
            if idx.dtype == torch.bool:
                idx = idx.nonzero().squeeze(1)
            idx = idx.long().cpu()
            if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
                raise IndexError(f"indices out of range for {n} images")
            idx = idx % max(n, 1)
        out = self._folder.decode(idx)
        key = (slice(None), *rest)  # out[(slice(None), *rest)], spelt so that mypy parses it as Python 3.10
        return out[key] if rest else out

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ConfigError("an image folder's images can only be selected along the first axis")
        return self[index]

    def float(self) -> torch.Tensor:
        return self[:].float()
