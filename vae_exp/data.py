"""Datasets: IDX files (MNIST, Fashion-MNIST), CIFAR-10 batches, folders of images; batching.

MNIST-family and CIFAR-10 splits are decoded and resized once (with PIL, exactly as the original
script's `transforms.Resize`) into a uint8 tensor kept on the training device; folders are read
lazily through a DataLoader. Both paths yield float batches normalised to the loss's pixel range.

`data.binarize` (for likelihood benchmarks, e.g. Burda et al. 2015) turns each pixel p = value/255
into a Bernoulli(p) draw, 0 or 255, before normalising, so batches hold only the two ends of the
loss's pixel range (0/1, or -1/1). Binary data stays as it is; colour data is drawn per channel.

- `dynamic`: the training split gets fresh draws every pass. At the start of a pass, after its
  order, one int64 `pass seed` is drawn from the split's shuffle `generator`; batch b of the pass
  is then drawn on the training device with a generator seeded by `derived_seed(pass seed,
  rank, b)` (rank: the process's share of the pass under distributed training, else 0).
  The checkpoint saves that generator's state, so `iterate(start)` after restoring it replays
  the pass's bits exactly from any batch (mid-epoch resume).
  The bits depend on the device type (CPU and CUDA generators differ).
- `static`: the training split is drawn once at load, on the CPU: image i (its index in the
  split) with a generator seeded by `derived_seed(derived_seed("static", trainer.seed), i)`.
  The same bits every pass and every run with the same seed, whatever the device, data path
  (device-resident or DataLoader), batch size or data.limit.
- With either mode the validation split is a fixed draw made the same way with the seed
  `derived_seed("val")`: independent of trainer.seed and of the epoch, so validation numbers
  compare across epochs, runs and seeds.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import pickle
import shutil
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from vae_exp.config import ConfigError, one_line, val_batch_size

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

# data.root=null: look under ./data (where downloads go), then in the system folders. Runs
# made before null existed saved root: data, which meant the same and is read as null.
DEFAULT_ROOT = Path("data")
LEGACY_DEFAULT_ROOT = "data"

# Where IDX files may live, relative to data.root, and absolute system folders (searched only
# when data.root is null).
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
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ConfigError(
                f"{path} is truncated or corrupt: it does not decompress as gzip "
                f"({one_line(e)}). Fix: delete it and download it again (data.download=true), "
                "or replace it with a good copy."
            ) from e
    else:
        raw = path.read_bytes()
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
    name: str, root: Path | None, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of one split, from files found under root, or with
    root None under ./data, then in the system folders; downloads with torchvision (into root,
    or ./data) when missing and download is true. A split loads whenever its own two files
    exist, whatever the other split's state. Logs the files read."""
    layout = IDX_LAYOUT[name]
    base = (root or DEFAULT_ROOT).absolute()
    dirs = [base / s for s in layout["subdirs"]]
    if root is None:
        dirs += [Path(p) for p in layout["system"]]
    stems = [f"{IDX_PREFIX[split]}-images-idx3-ubyte", f"{IDX_PREFIX[split]}-labels-idx1-ubyte"]
    found = [_find_idx(dirs, s) for s in stems]
    download_error = downloaded = ""
    if None in found and download:
        cls = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
        download_error = download_with_torchvision(cls, root, train=True)
        downloaded = "" if download_error else f"downloaded by torchvision into {base}; "
        found = [_find_idx(dirs, s) for s in stems]
    if None in found:
        hint = ""
        if name == "fashion_mnist":
            hint = "apt-get install dataset-fashion-mnist" + (
                ", or " if root is None else " and leave data.root null, or "
            )
        raise DataNotFoundError(
            f"data={name}: the {split} split was not found. Looked for {stems[0]}[.gz] and "
            f"{stems[1]}[.gz] in: {', '.join(str(d) for d in dirs)}.{download_error} "
            f"Fix: {hint}set data.root to a folder holding these files"
            + ("" if download else ", or set data.download=true to fetch them")
            + ", or train / validate on another split (data.train_split, data.val_split)."
        )
    log.info("data=%s %s split: %sread %s and %s", name, split, downloaded, *found)
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


def download_with_torchvision(dataset: str, root: Path | None, train: bool) -> str:
    """Download torchvision's `dataset` (a class of torchvision.datasets) into root (None:
    ./data), creating it; returns "" or, when the download fails, a sentence saying so, and
    removes the folders it created if they stayed empty."""
    from torchvision import datasets

    target = (root or DEFAULT_ROOT).absolute()
    created = outermost_missing(target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        getattr(datasets, dataset)(str(target), train=train, download=True)
    except Exception as e:  # network errors come in many types; report, don't crash
        if created is not None and not any(p.is_file() for p in created.rglob("*")):
            shutil.rmtree(created, ignore_errors=True)
        key = f"data.root={root}" if root is not None else f"{target} (data.root=null)"
        typo = (
            f" data.root={root} did not exist before (a typo?)."
            if root is not None and created is not None
            else ""
        )
        return f"{typo} Download with torchvision into {key} failed: {one_line(e)}."
    return ""


def outermost_missing(path: Path) -> Path | None:
    """The outermost folder on `path` that does not exist yet; None when path exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


class CifarUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10's python batches hold: dicts, lists, strings, numbers and
    numpy arrays. Any other global (a crafted file could name os.system) is refused before it
    is looked up, so no code from the file runs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # numpy arrays, as numpy 1.x pickles them
        ("numpy._core.multiarray", "_reconstruct"),  # ... and numpy 2.x
        ("numpy.core.numeric", "_frombuffer"),  # arrays in pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which a CIFAR-10 batch never holds (only numpy "
                "arrays, lists and strings), so it was not loaded (a crafted pickle can run "
                "code this way)"
            )
        return super().find_class(module, name)


def load_cifar10_split(
    root: Path | None, split: str, download: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels of a CIFAR-10 split from root/cifar-10-batches-py
    (root None: ./data), read with `CifarUnpickler`. Logs the files read."""
    base = (root or DEFAULT_ROOT).absolute()
    folder = base / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    download_error = downloaded = ""
    if missing and download:
        download_error = download_with_torchvision("CIFAR10", root, train=split == "train")
        downloaded = "" if download_error else f"downloaded by torchvision into {base}; "
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"data=cifar10: the {split} split was not found: {', '.join(missing)} missing in "
            f"{folder}.{download_error} Fix: set data.root to the folder that holds "
            "cifar-10-batches-py/"
            + ("." if download else ", or set data.download=true to fetch it.")
        )
    log.info("data=cifar10 %s split: %sread %s in %s", split, downloaded, ", ".join(names), folder)
    images, labels = [], []
    for n in names:
        try:
            with open(folder / n, "rb") as f:
                batch = CifarUnpickler(f, encoding="latin1").load()
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
    log.info("data=folder %s split: %d images under %s", split, len(files), base)
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
    """Resize the shorter side to size (the original script's `transforms.Resize(size)`),
    then centre-crop."""
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
    """Resize uint8 images once, as the original script's per-sample transform would:
    (N, C, S, S)."""
    return torch.stack([pil_to_uint8(resize_pil(to_pil(a, channels), size)) for a in images])


def normalize(batch: Tensor, pixel_range: tuple[float, float]) -> Tensor:
    """uint8 images to floats: ToTensor (/255), then to [-1, 1] as Normalize(0.5, 0.5) does."""
    x = batch.float().div(255)
    if pixel_range == (-1.0, 1.0):
        x = x.sub(0.5).div(0.5)
    return x


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from `parts` (a hash, the same in every process), so that each use of one
    seed (a pass's batches, each image of a split) gets its own unrelated random stream."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def binarize(images: Tensor, generator: torch.Generator) -> Tensor:
    """Bernoulli draws of uint8 images, on their device: each pixel (each channel) becomes 255
    with probability value/255, else 0 (uint8). Exact: a uniform integer r in [0, 255) is below
    the value with probability value/255, so 0 and 255 stay as they are (binary data is
    unchanged)."""
    draws = torch.randint(
        0, 255, images.shape, dtype=torch.uint8, device=images.device, generator=generator
    )
    return (draws < images).to(torch.uint8).mul_(255)


def binarize_each(images: Tensor, seed: int) -> Tensor:
    """A fixed draw of each image of a split (uint8, N x C x H x W, on the CPU): image i with a
    generator seeded by `derived_seed(seed, i)`, so its bits depend on nothing else."""
    out = torch.empty_like(images)
    generator = torch.Generator()
    for i, image in enumerate(images):
        out[i] = binarize(image, generator.manual_seed(derived_seed(seed, i)))
    return out


def static_seed(role: str, seed: int) -> int:
    """The seed of a split's fixed draw: the training split's follows trainer.seed, the
    validation split's is the same for every run."""
    return derived_seed("static", seed) if role == "train" else derived_seed("val")


class BinarizedImages(Dataset):
    """A dataset of uint8 images with each image replaced by its fixed draw (`binarize_each`),
    made lazily in the DataLoader workers."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def labels(self) -> Tensor:
        if isinstance(self.dataset, TensorDataset):
            return self.dataset.tensors[1]
        return torch.as_tensor(self.dataset.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        image, label = self.dataset[i]
        generator = torch.Generator().manual_seed(derived_seed(self.seed, i))
        return binarize(image, generator), label


# --------------------------------------------------------------------------------------------
# Batching


def usable_examples(n: int, batch_size: int, shuffle: bool) -> int:
    """How many of n examples a pass uses: all (the last batch may be smaller, as the original
    script's DataLoader with drop_last=False), except that a training pass (shuffled) skips a final
    batch of one image, on which BatchNorm cannot train; shuffling varies the skipped one."""
    return n - 1 if shuffle and n > 1 and n % batch_size == 1 else n


class Batches:
    """The batches of one split. A shuffled (training) split draws a new order from
    `generator` at the start of every pass, so saving the generator's state before a pass
    lets `iterate(start)` replay that pass from any batch (resuming mid-epoch). With
    `dynamic_binarize` the pass then draws its pass seed from `generator` too, and binarizes
    batch b with a generator seeded by `derived_seed(pass seed, rank, b)` (module notes)."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        shuffle: bool,
        pixel_range: tuple[float, float],
        generator: torch.Generator | None,
        dynamic_binarize: bool = False,
    ) -> None:
        if dynamic_binarize and generator is None:
            raise ValueError("dynamic binarization draws from the split's generator: pass one")
        self.num_examples, self.batch_size, self.shuffle = num_examples, batch_size, shuffle
        self.pixel_range, self.generator = pixel_range, generator
        self.dynamic_binarize = dynamic_binarize

    rank, world_size = 0, 1  # this process's share of every pass (distributed training)

    def shard(self, rank: int, world_size: int) -> None:
        """Make every pass yield only this process's share: every pass's order (the same in
        all processes: they seed `generator` alike, like DistributedSampler's set_epoch)
        is cut into `world_size` interleaved parts; a shuffled split drops the remainder so
        that all processes take the same number of steps."""
        self.rank, self.world_size = rank, world_size

    def _shard_size(self) -> int:
        n, w = self.num_examples, self.world_size
        return n // w if self.shuffle else len(range(self.rank, n, w))

    def __len__(self) -> int:
        usable = usable_examples(self._shard_size(), self.batch_size, self.shuffle)
        return math.ceil(usable / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """One pass, skipping its first `start` batches."""
        n, w = self.num_examples, self.world_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if w > 1:
            order = order[: n - n % w] if self.shuffle else order
            order = order[self.rank :: w]
        order = order[: usable_examples(len(order), self.batch_size, self.shuffle)]
        pass_seed = None
        if self.dynamic_binarize:  # drawn now, after the order, like the order replayable
            pass_seed = int(torch.randint(2**63 - 1, (), generator=self.generator))
        return self.batches(order[start * self.batch_size :], start, pass_seed)

    def batches(
        self, order: Tensor, first_batch: int = 0, pass_seed: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised images and labels, on the device, for `order` in batches; the first is
        batch `first_batch` of its pass (`pass_seed`: see `prepare`)."""
        raise NotImplementedError

    def all_labels(self) -> Tensor:
        """The labels of every image of the split (for checks before training)."""
        raise NotImplementedError

    def prepare(self, images: Tensor, pass_seed: int | None, batch_index: int) -> Tensor:
        """A batch of uint8 images on the device, binarized when `pass_seed` is given (batch
        `batch_index` of a dynamically binarized pass), normalised to the pixel range."""
        if pass_seed is not None:  # the rank: each process's share of a pass draws its own
            generator = torch.Generator(device=images.device)
            generator.manual_seed(derived_seed(pass_seed, self.rank, batch_index))
            images = binarize(images, generator)
        return normalize(images, self.pixel_range)


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
        dynamic_binarize: bool = False,
    ) -> None:
        super().__init__(len(images), batch_size, shuffle, pixel_range, generator, dynamic_binarize)
        self.images, self.labels = images, labels

    def all_labels(self) -> Tensor:
        return self.labels

    def batches(
        self, order: Tensor, first_batch: int = 0, pass_seed: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        order = order.to(self.images.device)
        for b, i in enumerate(range(0, len(order), self.batch_size), start=first_batch):
            idx = order[i : i + self.batch_size]
            yield self.prepare(self.images[idx], pass_seed, b), self.labels[idx]


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
        dynamic_binarize: bool = False,
    ) -> None:
        super().__init__(
            len(dataset), batch_size, shuffle, pixel_range, generator, dynamic_binarize
        )
        self.dataset, self.num_workers, self.device = dataset, num_workers, device
        self.worker_seeds = torch.Generator().manual_seed(0)

    def all_labels(self) -> Tensor:
        if isinstance(self.dataset, TensorDataset):
            return self.dataset.tensors[1]
        return torch.as_tensor(self.dataset.labels)  # ImageFiles or BinarizedImages

    def batches(
        self, order: Tensor, first_batch: int = 0, pass_seed: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=order.tolist(),
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=self.worker_seeds,  # not torch's global RNG, which training draws from
        )
        try:
            for b, (images, labels) in enumerate(loader, start=first_batch):
                images = self.prepare(images.to(self.device, non_blocking=True), pass_seed, b)
                yield images, labels.to(self.device, non_blocking=True)
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
    reads it.

    `cfg.binarize` (see the module's notes): `static` draws the training split once here, from
    `seed`; `dynamic` draws it anew each pass from the shuffle generator (seeded by `seed`);
    with either, the validation split is drawn once here with a fixed seed."""
    if is_resident(cfg) and cfg.num_workers > 0:
        log.info("data.num_workers=%d is unused: the data is device-resident", cfg.num_workers)
    shuffle_gen = torch.Generator().manual_seed(seed)
    train = split_batches(cfg, "train", cfg.train_split, pixel_range, device, seed, shuffle_gen)
    val = split_batches(cfg, "val", cfg.val_split, pixel_range, device, seed, shuffle_gen)
    if cfg.binarize != "none":
        log.info(
            "data.binarize=%s: training images are drawn %s; validation images once, with a "
            "fixed seed",
            cfg.binarize,
            "anew each epoch" if cfg.binarize == "dynamic" else f"once (trainer.seed={seed})",
        )
    return Data(train=train, val=val)


def is_resident(cfg) -> bool:
    """Whether splits are held on the device (data.device_resident; auto: all but folder)."""
    return cfg.device_resident if cfg.device_resident != "auto" else cfg.name != "folder"


def split_batches(
    cfg,
    role: str,
    split: str,
    pixel_range: tuple[float, float],
    device: torch.device,
    seed: int,
    generator: torch.Generator | None = None,
) -> Batches:
    """The batches of one split in a `role`: "train" (shuffled by `generator`; binarized as
    data.binarize says; batches of data.batch_size) or "val" (in order; a binarized split is
    one fixed draw; batches of data.val_batch_size)."""
    dataset = load_split(cfg, split)
    shuffle = role == "train"
    mode = cfg.binarize if role == "train" or cfg.binarize == "none" else "static"
    if role == "train":
        batch_size = cfg.batch_size
    else:
        batch_size = val_batch_size(cfg.val_batch_size, device.type)
    if mode == "static":
        split_seed = static_seed(role, seed)
        if isinstance(dataset, TensorDataset):
            images, labels = dataset.tensors
            dataset = TensorDataset(binarize_each(images, split_seed), labels)
        else:
            dataset = BinarizedImages(dataset, split_seed)
    if is_resident(cfg):
        if not isinstance(dataset, TensorDataset):
            dataset = TensorDataset(*default_collate(list(dataset)))
        images, labels = dataset.tensors
        return TensorBatches(
            images.to(device),
            labels.to(device),
            batch_size,
            shuffle,
            pixel_range,
            generator,
            dynamic_binarize=mode == "dynamic",
        )
    return LoaderBatches(
        dataset,
        batch_size,
        shuffle,
        cfg.num_workers,
        device,
        pixel_range,
        generator,
        dynamic_binarize=mode == "dynamic",
    )


def data_root(cfg) -> Path | None:
    """The folder data.root names, or None for the default places (data.root null: ./data,
    then the system folders). A folder that is named must exist, unless data.download is true:
    the download then creates it."""
    if cfg.root is None or cfg.root == LEGACY_DEFAULT_ROOT:
        return None
    root = Path(cfg.root).expanduser()
    if not root.is_dir() and not cfg.download:
        default = "" if cfg.name == "folder" else ", or null (./data, then the system folders)"
        fetch = "" if cfg.name == "folder" else ", or set data.download=true to download there"
        raise DataNotFoundError(
            f"Invalid config: data.root={root} is not a directory; allowed: an existing "
            f"folder{default}. Fix: point data.root at the folder that holds the data{fetch}."
        )
    return root


def load_split(cfg, split: str) -> TensorDataset | ImageFiles:
    """One split, limited to its first `cfg.limit` images: decoded and resized (in memory)
    for IDX and CIFAR-10 files, a lazy list of files for folders."""
    root = data_root(cfg)
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
