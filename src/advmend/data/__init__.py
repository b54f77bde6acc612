"""Data: in-memory uint8 data sets, their sources, and device-side batching/augmentation.

Typical use::

    from advmend.data import load_dataset, dataset_info, BatchLoader

    train = load_dataset("cifar10", "train", root=None)       # <root>/cifar10.npz or torchvision
    info = dataset_info("cifar10")                           # mean, std, eps, augment, ...
    loader = BatchLoader(train, 128, shuffle=True, device="cuda", augment=info["augment"])
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader: ...                              # x float in [0, 1] on the device
"""

from advmend.data.arrays import ArrayDataset, derive_seed, from_numpy, split_train_val, subset, take
from advmend.data.batches import BatchLoader, augment_batch
from advmend.data.folder import ImageFolder
from advmend.data.sources import (
    DATASET_INFO,
    DATASETS,
    SPLITS,
    dataset_info,
    dataset_radii,
    load_dataset,
    resolve_root,
)

__all__ = [
    "ArrayDataset",
    "BatchLoader",
    "DATASETS",
    "DATASET_INFO",
    "ImageFolder",
    "SPLITS",
    "augment_batch",
    "dataset_info",
    "dataset_radii",
    "derive_seed",
    "from_numpy",
    "load_dataset",
    "resolve_root",
    "split_train_val",
    "subset",
    "take",
]
