"""Batches on the model's device: index slice -> uint8 to device -> float in [0, 1] -> augment.

No DataLoader workers for an in-memory data set: augmentation is a few vectorised tensor ops on the
whole batch, so it runs on the GPU when the model does. An image folder streamed from disk
(:class:`~advmend.data.folder.ImageFolder`) is decoded, and augmented, by its worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from advmend.data.arrays import ImageDataset, derive_seed
from advmend.data.folder import ImageFolder
from advmend.errors import ConfigError, InputError

__all__ = ["augment_batch", "BatchLoader"]

# Stream tags keep the shuffle and augmentation generators independent for the same (seed, epoch).
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def augment_batch(
    x: torch.Tensor,
    *,
    pad: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random pad-and-crop plus random horizontal flip, independently per example.

    Each example is zero-padded by ``pad`` pixels on every side and cropped back to (H, W) at a
    uniformly random offset in ``[0, 2 * pad]`` per axis, then mirrored left-right with
    probability 1/2. Done with one gather on the whole batch; no loop over examples.

    Random draws are made on the generator's device: pass a CPU generator (what
    :class:`BatchLoader` does) to get the same augmentation on any device, or one on
    ``x.device``. The few per-example numbers drawn are then moved to ``x.device``.
    Without a generator the global RNG of ``x.device`` is used. Draw order: row offsets,
    column offsets (only when ``pad > 0``), then the flip mask (only when ``flip``).

    Args:
        x: Images (N, C, H, W), any dtype, any device.
        pad: Padding in pixels (0 disables the crop).
        flip: Whether to apply random horizontal flips.
        generator: Optional RNG for reproducible draws.

    Returns:
        A new tensor shaped and typed like ``x``; ``x`` is never modified.

    Raises:
        InputError: ``x`` is not 4-D or ``pad`` is negative.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(getattr(x, "shape", ()))
        raise InputError(f"augment_batch expects (N, C, H, W) images, got shape {shape}")
    if pad < 0:
        raise InputError(f"pad must be >= 0, got {pad}")
    n, c, h, w = x.shape
    if n == 0 or (pad == 0 and not flip):
        return x.clone()
    draw_device = generator.device if generator is not None else x.device
    out = x
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=draw_device).to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))  # zeros
        rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
        cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
        # Gather rows then columns: two cheap index ops instead of one 4-D advanced index.
        out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
        out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flip:
        mirror = torch.rand(n, generator=generator, device=draw_device).to(x.device) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()


class BatchLoader:
    """Iterates an :class:`ArrayDataset` in batches of float images on a device.

    Yields ``(x, y)``: ``x`` float32 (B, C, H, W) in [0, 1], ``y`` int64 (B,), both on
    ``device``. The order is a permutation drawn from ``(seed, epoch)``; call
    :meth:`set_epoch` before each epoch (like ``DistributedSampler``) to get a new order and to
    resume exactly at an epoch boundary. Iterating the same epoch twice gives the same batches,
    augmentation included (its RNG is seeded from ``(seed, epoch, rank)``, on the CPU, so it
    is also the same on every device).

    With ``world_size > 1`` the permutation (identical on all ranks) is padded by wrapping
    around to a multiple of ``world_size`` and rank ``r`` takes positions ``r, r + W, ...``:
    the shares are disjoint and together cover the data set, as in ``DistributedSampler``.

    An :class:`~advmend.data.folder.ImageFolder` is streamed: its worker processes decode each batch
    (and, with ``augment``, take its random-resized crop and flip instead of the pad-and-crop).

    Args:
        ds: The data set.
        batch_size: Examples per batch.
        shuffle: Shuffle every epoch (False: data set order).
        device: Where batches are made.
        augment: Apply :func:`augment_batch` (pad 4, crop, flip); an image folder's own training
            transform for an :class:`~advmend.data.folder.ImageFolder`.
        drop_last: Drop the final incomplete batch.
        seed: Base seed for shuffling and augmentation.
        rank: This process's rank.
        world_size: Number of processes sharing the data.
    """

    def __init__(
        self,
        ds: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool,
        device: torch.device | str = "cpu",
        augment: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.dataset = ds
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.device = torch.device(device)
        self.augment = bool(augment)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order (and augmentation) the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def num_samples(self) -> int:
        """Examples this rank sees per epoch (before ``drop_last``)."""
        return math.ceil(len(self.dataset) / self.world_size)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's example indices for the current epoch, in iteration order (CPU int64)."""
        n = len(self.dataset)
        if self.shuffle:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1 and n > 0:
            total = self.num_samples * self.world_size
            # Wrap around (repeating if the data set is tiny) so every rank gets the same count.
            order = order.repeat(math.ceil(total / n))[:total]
            order = order[self.rank : total : self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices()
        if isinstance(self.dataset, ImageFolder):
            yield from self._stream(self.dataset, order)
            return
        aug_gen = None
        if self.augment:
            aug_gen = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, _AUGMENT_STREAM))
        cuda = self.device.type == "cuda"
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.dataset.images.index_select(0, idx)  # uint8 copy: 4x less to transfer than float
            yb = self.dataset.labels.index_select(0, idx)
            if cuda:  # pinned host memory makes the copy truly asynchronous
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb = xb.to(self.device, non_blocking=cuda)
            yb = yb.to(self.device, non_blocking=cuda)
            x = xb.float().div_(255.0)
            if aug_gen is not None:
                x = augment_batch(x, generator=aug_gen)
            yield x, yb

    def _stream(self, folder: ImageFolder, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of an image folder, decoded (and augmented) by its worker processes."""
        if self.augment:
            folder = folder.with_train_draws(self.seed, self.epoch, self.rank)
        if self.drop_last:
            order = order[: len(self) * self.batch_size]
        cuda = self.device.type == "cuda"
        for xb, yb in folder.batches(order, self.batch_size, pin_memory=cuda):
            xb = xb.to(self.device, non_blocking=cuda)
            yield xb.float().div_(255.0), yb.to(self.device, non_blocking=cuda)
