"""Datasets: IDX files (MNIST, Fashion-MNIST), CIFAR-10 batches, folders of images; batching.

MNIST-family and CIFAR-10 splits are decoded and resized once (with PIL, exactly as the seed's
`transforms.Resize`) into a uint8 tensor kept on the training device; folders are read lazily
through a DataLoader. Both paths yield float batches normalised to the loss's pixel range.
"""

from __future__ import annotations

import gzip
import logging
import math
import pickle
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from vae_exp.config import ConfigError, one_line

DATASETS = ("mnist", "fashion_mnist", "cifar10", "folder")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# Where IDX files may live, relative to data.root, and absolute system folders.
IDX_LAYOUT = {
    "mnist": {"subdirs": ["MNIST/raw", "MNIST", "mnist", "."], "system": []},
    "fashion_mnist": {
        "subdirs": ["FashionMNIST/raw", "FashionMNIST", "fashion-mnist", "fashion_mnist", "."],
        "system": ["/usr/share/datasets/fashion-mnist"],
    },
}
IDX_PREFIX = {"train": "train", "test": "t10k"}

log = logging.getLogger(__name__)


class DataNotFoundError(ConfigError):
    """No files for a requested split, with the paths searched and how to fix it."""


# --------------------------------------------------------------------------------------------
# Reading files


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into an array of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ConfigError(f"{path} is truncated: its header promises {ndim} dimensions")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ConfigError(
            f"{path} is truncated or corrupt: header says shape {shape} "
            f"({math.prod(shape)} bytes) but it holds {data.size} bytes"
        )
    return data.reshape(shape)


def _find_idx(dirs: Sequence[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def load_idx_split(
    name: str, root: Path, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of one split, from files found under root or the
    system folders; downloads with torchvision when missing and download is true. A split loads
    whenever its own two files exist, whatever the other split's state."""
    layout = IDX_LAYOUT[name]
    dirs = [root / s for s in layout["subdirs"]] + [Path(p) for p in layout["system"]]
    stems = [f"{IDX_PREFIX[split]}-images-idx3-ubyte", f"{IDX_PREFIX[split]}-labels-idx1-ubyte"]
    found = [_find_idx(dirs, s) for s in stems]
    download_error = ""
    if None in found and download:
        try:
            _torchvision_download(name, root)
        except Exception as e:  # network errors come in many types; report, don't crash
            download_error = f" Download with torchvision failed: {one_line(e)}."
        found = [_find_idx(dirs, s) for s in stems]
    if None in found:
        hint = "apt-get install dataset-fashion-mnist, or " if name == "fashion_mnist" else ""
        raise DataNotFoundError(
            f"data={name}: the {split} split was not found. Looked for {stems[0]}[.gz] and "
            f"{stems[1]}[.gz] in: {', '.join(str(d) for d in dirs)}.{download_error} "
            f"Fix: {hint}set data.root to a folder holding these files"
            + ("" if download else ", or set data.download=true to fetch them")
            + ", or train / validate on another split (data.train_split, data.val_split)."
        )
    images, labels = (read_idx(p) for p in found)
    if images.ndim != 3:
        raise ConfigError(
            f"{found[0]} holds an array of shape {images.shape}; {name} images must be "
            "N x H x W (one grey channel)"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ConfigError(
            f"{found[1]} holds labels of shape {labels.shape} for {len(images)} images in "
            f"{found[0]}; expected ({len(images)},)"
        )
    return images, labels


def _torchvision_download(name: str, root: Path) -> None:
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[name]
    root.mkdir(parents=True, exist_ok=True)
    cls(str(root), train=True, download=True)


def load_cifar10_split(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels of a CIFAR-10 split from root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    download_error = ""
    if missing and download:
        try:
            from torchvision import datasets

            root.mkdir(parents=True, exist_ok=True)
            datasets.CIFAR10(str(root), train=split == "train", download=True)
        except Exception as e:
            download_error = f" Download with torchvision failed: {one_line(e)}."
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"data=cifar10: the {split} split was not found: {', '.join(missing)} missing in "
            f"{folder}.{download_error} Fix: set data.root to the folder that holds "
            "cifar-10-batches-py/"
            + ("." if download else ", or set data.download=true to fetch it.")
        )
    images, labels = [], []
    for n in names:
        try:
            with open(folder / n, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            rows = np.asarray(batch["data"], dtype=np.uint8)
            batch_labels = np.asarray(batch["labels"], dtype=np.int64)
        except Exception as e:
            raise ConfigError(f"{folder / n} is not a CIFAR-10 batch: {one_line(e)}") from e
        if rows.ndim != 2 or rows.shape[1] != 3 * 32 * 32 or len(batch_labels) != len(rows):
            raise ConfigError(
                f"{folder / n} holds data of shape {rows.shape} and {len(batch_labels)} labels; "
                "CIFAR-10 rows are 3072 values (3 channels x 32 x 32), one label each"
            )
        images.append(rows.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels)


def list_folder_split(root: Path, split: str, val_fraction: float) -> tuple[list[Path], list[int]]:
    """Image files of one split of a folder, and labels from their class subfolder (sorted)."""
    if not root.is_dir():
        raise DataNotFoundError(f"data=folder: data.root={root} is not a directory.")
    split_dirs = {"train": ["train"], "test": ["test", "val"]}[split]
    split_root = next((root / d for d in split_dirs if (root / d).is_dir()), None)
    base = split_root or root
    files = sorted(p for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if split_root is None:  # no split folders: every k-th file validates
        k = max(2, round(1 / val_fraction))
        files = [p for i, p in enumerate(files) if (i % k == k - 1) == (split == "test")]
    if not files:
        raise DataNotFoundError(
            f"data=folder: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) for the {split} split "
            f"under {base}. Fix: point data.root at a folder of images."
        )
    parts = [p.relative_to(base).parts for p in files]
    classes = sorted({q[0] for q in parts if len(q) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index.get(q[0], 0) if len(q) > 1 else 0 for q in parts]
    return files, labels


# --------------------------------------------------------------------------------------------
# Preparing images


def to_pil(array: np.ndarray, channels: int) -> Image.Image:
    """A PIL image in mode L (1 channel) or RGB (3 channels) from an HxW or HxWx3 uint8 array."""
    return Image.fromarray(array).convert("L" if channels == 1 else "RGB")


def resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to size (the seed's `transforms.Resize(size)`), then centre-crop."""
    if image.size != (size, size):
        image = TF.center_crop(TF.resize(image, size), size)
    return image


def pil_to_uint8(image: Image.Image) -> Tensor:
    """(C, H, W) uint8 tensor of a PIL image."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def prepare_images(images: np.ndarray, size: int, channels: int) -> Tensor:
    """Resize uint8 images once, as the seed's per-sample transform would: (N, C, S, S)."""
    return torch.stack([pil_to_uint8(resize_pil(to_pil(a, channels), size)) for a in images])


def normalize(batch: Tensor, pixel_range: tuple[float, float]) -> Tensor:
    """uint8 images to floats: ToTensor (/255), then to [-1, 1] as Normalize(0.5, 0.5) does."""
    x = batch.float().div(255)
    if pixel_range == (-1.0, 1.0):
        x = x.sub(0.5).div(0.5)
    return x


# --------------------------------------------------------------------------------------------
# Batching


def usable_examples(n: int, batch_size: int, shuffle: bool) -> int:
    """How many of n examples a pass uses: all (the last batch may be smaller, as the seed's
    DataLoader with drop_last=False), except that a training pass (shuffled) skips a final
    batch of one image, on which BatchNorm cannot train; shuffling varies the skipped one."""
    return n - 1 if shuffle and n > 1 and n % batch_size == 1 else n


class Batches:
    """The batches of one split. A shuffled (training) split draws a new order from
    `generator` at the start of every pass, so saving the generator's state before a pass
    lets `iterate(start)` replay that pass from any batch (resuming mid-epoch)."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        shuffle: bool,
        pixel_range: tuple[float, float],
        generator: torch.Generator | None,
    ) -> None:
        self.num_examples, self.batch_size, self.shuffle = num_examples, batch_size, shuffle
        self.pixel_range, self.generator = pixel_range, generator

    def __len__(self) -> int:
        usable = usable_examples(self.num_examples, self.batch_size, self.shuffle)
        return math.ceil(usable / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass, skipping its first `start` batches."""
        n = self.num_examples
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order[: usable_examples(n, self.batch_size, self.shuffle)]
        return self.batches(order[start * self.batch_size :])

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised images and labels, on the device, for `order` in batches."""
        raise NotImplementedError


class TensorBatches(Batches):
    """Batches of a uint8 image tensor held on the training device."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        shuffle: bool,
        pixel_range: tuple[float, float],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(len(images), batch_size, shuffle, pixel_range, generator)
        self.images, self.labels = images, labels

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        order = order.to(self.images.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            yield normalize(self.images[idx], self.pixel_range), self.labels[idx]


class ImageFiles(Dataset):
    """Lazily read image files as (C, S, S) uint8 tensors."""

    def __init__(self, files: list[Path], labels: list[int], size: int, channels: int) -> None:
        self.files, self.labels, self.size, self.channels = files, labels, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                channels = 3 if img.mode == "P" else len(img.getbands())
                if channels != self.channels:
                    raise ConfigError(
                        f"{path} has {channels} channel(s) (mode {img.mode}) but "
                        f"data.channels={self.channels}; set data.channels to match, or convert "
                        "the folder's images"
                    )
                image = resize_pil(img.convert("L" if self.channels == 1 else "RGB"), self.size)
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{path} is not a readable image: {one_line(e)}") from e
        return pil_to_uint8(image), self.labels[i]


class LoaderBatches(Batches):
    """Batches read by DataLoader workers (uint8), moved to the device and normalised there."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        num_workers: int,
        device: torch.device,
        pixel_range: tuple[float, float],
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(len(dataset), batch_size, shuffle, pixel_range, generator)
        self.dataset, self.num_workers, self.device = dataset, num_workers, device
        self.worker_seeds = torch.Generator().manual_seed(0)

    def batches(self, order: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.worker_seeds,  # not torch's global RNG, which training draws from
        )
        try:
            for images, labels in loader:
                images = images.to(self.device, non_blocking=True)
                yield normalize(images, self.pixel_range), labels.to(self.device, non_blocking=True)
        except ConfigError as e:  # from a worker: its message carries the worker's traceback
            raise ConfigError(
                str(e).strip().splitlines()[-1].split("ConfigError: ", 1)[-1]
            ) from None


@dataclass
class Data:
    """The training and validation batches of one run."""

    train: Batches
    val: Batches


def build_data(cfg, pixel_range: tuple[float, float], device: torch.device, seed: int) -> Data:
    """Load both splits named by `cfg` (a `DataConfig`) for training on `device`.

    With `device_resident` (auto: every dataset but `folder`) a split is decoded and resized
    once and batched from a tensor on `device`; otherwise a DataLoader with `num_workers`
    reads it."""
    root = Path(str(cfg.root)).expanduser()
    resident = cfg.device_resident if cfg.device_resident != "auto" else cfg.name != "folder"
    if resident and cfg.num_workers > 0:
        log.info("data.num_workers=%d is unused: the data is device-resident", cfg.num_workers)
    shuffle_gen = torch.Generator().manual_seed(seed)
    splits: dict[str, Batches] = {}
    for role, split in (("train", cfg.train_split), ("val", cfg.val_split)):
        dataset = load_split(cfg, root, split)
        shuffle = role == "train"
        if resident:
            if isinstance(dataset, ImageFiles):
                dataset = TensorDataset(*default_collate(list(dataset)))
            images, labels = dataset.tensors
            splits[role] = TensorBatches(
                images.to(device),
                labels.to(device),
                cfg.batch_size,
                shuffle,
                pixel_range,
                shuffle_gen,
            )
        else:
            splits[role] = LoaderBatches(
                dataset,
                cfg.batch_size,
                shuffle,
                cfg.num_workers,
                device,
                pixel_range,
                shuffle_gen,
            )
    return Data(train=splits["train"], val=splits["val"])


def load_split(cfg, root: Path, split: str) -> TensorDataset | ImageFiles:
    """One split, limited to its first `cfg.limit` images: decoded and resized (in memory)
    for IDX and CIFAR-10 files, a lazy list of files for folders."""
    if cfg.name == "folder":
        files, labels = list_folder_split(root, split, cfg.val_fraction)
        limit = cfg.limit or len(files)
        return ImageFiles(files[:limit], labels[:limit], cfg.image_size, cfg.channels)
    if cfg.name == "cifar10":
        images, labels = load_cifar10_split(root, split, cfg.download)
    else:
        images, labels = load_idx_split(cfg.name, root, split, cfg.download)
    limit = cfg.limit or len(images)
    tensor = prepare_images(images[:limit], cfg.image_size, cfg.channels)
    return TensorDataset(tensor, torch.as_tensor(np.asarray(labels[:limit], dtype=np.int64)))
