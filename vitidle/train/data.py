"""Training and validation data through timm.data: datasets, transforms from the model's data config, mixup.

Built in: Fashion-MNIST read from Debian's `dataset-fashion-mnist` files (idx format, gzipped), the
one labelled image set these machines install offline.
"""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset

from ..errors import UsageError, first_line
from .recipe import DataSection

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
TRAIN_SPLITS = ("train", "training")


class FashionMNIST(Dataset):
    """Fashion-MNIST (60k train / 10k test, 28×28 grey, 10 classes) from the idx files, as PIL images.

    `split`: train, or validation / val / test (the 10k test set). Images come in `mode` ('L', or
    'RGB' for a 3-channel model).
    """

    num_classes = 10

    def __init__(self, root: str | os.PathLike = FASHION_MNIST_ROOT, split: str = "train", mode: str = "L"):
        prefix = FASHION_MNIST_FILES["train" if split in TRAIN_SPLITS else "test"]
        root = Path(root)
        images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        if not images.is_file() or not labels.is_file():
            raise UsageError(f"Fashion-MNIST not found in {root} ({images.name}): install it with "
                             "`apt-get install dataset-fashion-mnist`, or set data.root")
        self.images = read_idx(images)  # n, 28, 28 uint8
        self.labels = read_idx(labels).astype(np.int64)  # n
        if self.images.ndim != 3 or len(self.images) != len(self.labels):
            raise UsageError(f"{images} and {labels} do not hold the same number of 2-D images and labels")
        self.mode = mode
        self.transform = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        image = Image.fromarray(self.images[i], mode="L")
        if self.mode != "L":
            image = image.convert(self.mode)
        return (image if self.transform is None else self.transform(image)), int(self.labels[i])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not): magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:
        raise UsageError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated: {data.size} bytes for shape {tuple(dims)}")
    return data.reshape(tuple(dims))


class Transformed(Dataset):
    """A dataset of (PIL image, label) with the image converted to `mode` and then `transform`ed.

    Each image's random augmentation is seeded by (seed, epoch, index), with the process's random
    state put back afterwards: the same image gets the same crop in the same epoch whatever the
    loader workers or a resume did before it, which makes a resumed run bit-identical.
    """

    def __init__(self, dataset: Dataset, transform, mode: str, seed: int = 0):
        self.dataset, self.transform, self.mode = dataset, transform, mode
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        if hasattr(image, "convert") and image.mode != self.mode:
            image = image.convert(self.mode)
        key = hash((self.seed, self.epoch, int(i))) % 2**32  # ints hash the same in every process
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(key)
        np.random.seed(key)
        torch.default_generator.manual_seed(key)  # the CPU generator only: CUDA's drives dropout on GPU
        try:
            return self.transform(image), label
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class EpochSampler(Sampler):
    """A shuffle drawn from (seed, epoch) alone, that can start part way (a resume); under torchrun each
    process takes every `world`-th index from `rank` on, so the processes' batches together are the
    batch one process would take.

    >>> s = EpochSampler(6, seed=0); s.set_epoch(1); full = list(s)
    >>> s.set_epoch(1, start=4); list(s) == full[4:]
    True
    >>> halves = [EpochSampler(6, 0, rank, 2) for rank in (0, 1)]
    >>> sorted(i for h in halves for i in (h.set_epoch(1), list(h))[1]) == sorted(full)
    True
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch)) % 2**63)
        return iter(torch.randperm(self.size, generator=generator)[self.rank :: self.world][self.start :].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world)) - self.start


def normalisation(data: DataSection, input_config: dict, in_chans: int) -> tuple[tuple, tuple]:
    """(mean, std) with one value per input channel: the recipe's, else the model's (averaged to 1 channel)."""
    out = []
    for name in ("mean", "std"):
        values = list(getattr(data, name) or input_config.get(name) or [0.5])
        if len(values) != in_chans:
            if len(values) != 1 and in_chans != 1:
                raise UsageError(f"data.{name} has {len(values)} values for a model with {in_chans} input channels")
            values = [sum(values) / len(values)] * in_chans
        out.append(tuple(float(v) for v in values))
    return out[0], out[1]


def transforms(data: DataSection, input_config: dict):
    """(train, eval) transforms from timm's create_transform, for the model's input size and the recipe's aug."""
    from timm.data import create_transform

    size = tuple(input_config["input_size"])
    mean, std = normalisation(data, input_config, size[0])
    common = dict(input_size=size, interpolation=input_config.get("interpolation", "bicubic"), mean=mean, std=std)
    train = create_transform(**common, is_training=True, scale=tuple(data.scale), hflip=data.hflip,
                             color_jitter=data.color_jitter or None, auto_augment=data.auto_augment or None,
                             re_prob=data.reprob, re_mode="pixel", re_count=1)
    evaluate = create_transform(**common, is_training=False, crop_pct=input_config.get("crop_pct", 1.0),
                                crop_mode=input_config.get("crop_mode", "center"))
    return train, evaluate


def raw_dataset(data: DataSection, split: str, mode: str) -> Dataset:
    """The dataset of one split, with PIL images and int labels, no transform."""
    if data.dataset == "fashion_mnist":
        return FashionMNIST(data.root or FASHION_MNIST_ROOT, split, mode)
    from timm.data import create_dataset

    name = "" if data.dataset == "folder" else data.dataset
    if data.root and not Path(data.root).exists() and not data.download:
        raise UsageError(f"data.root {data.root} does not exist")
    try:
        ds = create_dataset(name, root=data.root, split=split, download=data.download, input_img_mode=mode,
                            is_training=split in TRAIN_SPLITS)
    except Exception as e:  # timm raises many kinds (RuntimeError for an empty folder, ImportError, ...)
        raise UsageError(f"cannot open dataset {data.dataset or 'folder'} ({split}) at {data.root}: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    if len(ds) == 0:
        raise UsageError(f"dataset {data.dataset} ({split}) at {data.root} holds no images")
    ds.transform = None
    return ds


def num_classes_of(dataset: Dataset) -> int | None:
    """Classes the dataset declares, where it says (image folders, Fashion-MNIST)."""
    if isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(getattr(dataset, "num_classes", None), int):
        return dataset.num_classes
    mapping = getattr(getattr(dataset, "reader", None), "class_to_idx", None)
    return len(mapping) if mapping else None


def build_datasets(data: DataSection, input_config: dict, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, val) datasets with the transforms applied; limited to `train_limit` / `val_limit` images.

    Set `dataset.transformed.epoch` at each epoch: it seeds the augmentations with the seed.
    """
    train_tf, eval_tf = transforms(data, input_config)
    return (split_dataset(data, data.train_split, train_tf, data.train_limit, input_config, seed),
            split_dataset(data, data.val_split, eval_tf, data.val_limit, input_config, seed))


def eval_dataset(data: DataSection, input_config: dict) -> Dataset:
    """The eval split (`data.val_split`) with the model's eval transform, limited to `data.val_limit` images."""
    return split_dataset(data, data.val_split, transforms(data, input_config)[1], data.val_limit, input_config)


def split_dataset(data: DataSection, split: str, transform, limit: int | None, input_config: dict,
                  seed: int = 0) -> Dataset:
    """One split, transformed, cut to `limit` images; `.num_classes` and `.transformed` (the epoch knob) set."""
    mode = "L" if input_config["input_size"][0] == 1 else "RGB"
    transformed = ds = Transformed(raw_dataset(data, split, mode), transform, mode, seed)
    if limit is not None and limit < len(ds):
        ds = Subset(ds, range(limit))
    ds.num_classes, ds.transformed = num_classes_of(transformed.dataset), transformed
    return ds


def mixup_fn(data: DataSection, num_classes: int):
    """timm's Mixup / CutMix (soft targets, label smoothing included), or None when off."""
    if not data.mixing:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=data.mixup, cutmix_alpha=data.cutmix, prob=data.mixup_prob,
                 switch_prob=data.mixup_switch_prob, mode="batch", label_smoothing=data.label_smoothing,
                 num_classes=num_classes)
