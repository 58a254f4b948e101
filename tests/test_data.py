"""Reading the real IDX files, split handling, folders of images, and batching."""

import copy
import dataclasses
import gzip
import hashlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from tests.conftest import (
    DATA_ENV,
    MNIST_FILES,
    MNIST_TEST_FILES,
    MNIST_TRAIN_FILES,
    REPO,
    TINY,
    cli_env,
    compose_cfg,
    find_mnist,
    missing_mnist_reason,
    run_cli,
)
from vae_exp.checkpoint import config_differences
from vae_exp.config import ConfigError, read_data
from vae_exp.data import (
    DataNotFoundError,
    ImageFiles,
    TensorBatches,
    binarize,
    build_data,
    data_root,
    list_folder_split,
    load_cifar10_split,
    load_idx_split,
    prepare_images,
    read_idx,
)


def test_real_mnist_test_split(mnist_root):
    raw = mnist_root / "MNIST" / "raw"
    digest = hashlib.md5((raw / "t10k-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert digest == "9fb629c4189551a2d022fa330f9573f3"  # torchvision's MNIST resource md5
    images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert 20 < images.mean() < 50  # real digits: mostly black background


def test_real_mnist_train_split(mnist_root):
    """The canonical 60,000 training digits (the .gz files may be recompressed: the unpacked
    images' md5 and the label counts identify them)."""
    raw = mnist_root / "MNIST" / "raw"
    unpacked = gzip.decompress((raw / "train-images-idx3-ubyte.gz").read_bytes())
    assert hashlib.md5(unpacked).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
    images, labels = load_idx_split("mnist", mnist_root, "train", download=False)
    assert images.shape == (60_000, 28, 28) and images.dtype == np.uint8
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(labels).tolist() == counts


def copy_mnist(mnist_root: Path, root: Path, files: tuple[str, ...] = MNIST_FILES) -> Path:
    """A folder holding MNIST's `files` (default: both splits) in root/MNIST/raw; returns root."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in files:
        shutil.copy(mnist_root / "MNIST" / "raw" / name, raw / name)
    return root


def test_a_split_loads_without_the_other_and_a_missing_one_explains(mnist_root, tmp_path):
    # a folder with only the test split: it must load, and train must fail clearly
    root = copy_mnist(mnist_root, tmp_path, MNIST_TEST_FILES)
    assert len(load_idx_split("mnist", root, "test", download=False)[0]) == 10_000
    with pytest.raises(DataNotFoundError) as info:
        load_idx_split("mnist", root, "train", download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(root / "MNIST" / "raw") in message
    assert "data.root" in message and "data.download=true" in message
    assert "\n" not in message


def test_raw_and_gzipped_files_read_the_same(mnist_root, tmp_path):
    gz = mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress(gz.read_bytes()))
    assert np.array_equal(read_idx(gz), read_idx(raw))


def test_truncated_idx_file_is_named(mnist_root, tmp_path):
    data = gzip.decompress(
        (mnist_root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes()
    )
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte is truncated"):
        read_idx(bad)


def test_fashion_mnist_from_debian(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./data: data.root=null finds the system folder
    train, train_labels = load_idx_split("fashion_mnist", None, "train", download=False)
    test, _ = load_idx_split("fashion_mnist", None, "test", download=False)
    assert train.shape == (60_000, 28, 28) and test.shape == (10_000, 28, 28)
    assert sorted(set(train_labels.tolist())) == list(range(10))
    # a data.root that is given is the only place searched: no silent fallback to Debian's
    with pytest.raises(DataNotFoundError) as info:
        load_idx_split("fashion_mnist", tmp_path, "train", download=False)
    assert str(fashion_dir) not in str(info.value) and "leave data.root null" in str(info.value)


def write_pngs(folder, images, labels):
    for i, (a, y) in enumerate(zip(images, labels)):
        (folder / f"class_{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(folder / f"class_{y}" / f"{i:04d}.png")


def test_folder_of_real_images(mnist_root, tmp_path):
    images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    write_pngs(tmp_path, images[:40], labels[:40])
    train_files, train_labels = list_folder_split(tmp_path, "train", val_fraction=0.1)
    val_files, _ = list_folder_split(tmp_path, "test", val_fraction=0.1)
    assert len(train_files) == 36 and len(val_files) == 4
    assert not set(train_files) & set(val_files)
    files = ImageFiles(train_files, train_labels, size=32, channels=1)
    x, y = files[0]
    index = int(train_files[0].stem)
    assert torch.equal(x, prepare_images(images[index : index + 1], 32, 1)[0])
    assert y == sorted({f"class_{v}" for v in labels[:40]}).index(train_files[0].parent.name)
    with pytest.raises(ConfigError, match=r"has 1 channel\(s\) \(mode L\) but data.channels=3"):
        ImageFiles(train_files, train_labels, size=16, channels=3)[0]
    Image.fromarray(np.stack([images[0]] * 3, axis=-1)).save(tmp_path / "rgb.png")
    rgb, _ = ImageFiles([tmp_path / "rgb.png"], [0], size=16, channels=3)[0]
    assert rgb.shape == (3, 16, 16) and torch.equal(rgb[0], rgb[2])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png is not a readable image"):
        ImageFiles([tmp_path / "broken.png"], [0], size=16, channels=1)[0]


def test_folder_with_split_subfolders(mnist_root, tmp_path):
    images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    write_pngs(tmp_path / "train", images[:10], labels[:10])
    write_pngs(tmp_path / "val", images[10:13], labels[10:13])
    assert len(list_folder_split(tmp_path, "train", 0.1)[0]) == 10
    assert len(list_folder_split(tmp_path, "test", 0.1)[0]) == 3
    shutil.rmtree(tmp_path / "val")
    (tmp_path / "val").mkdir()
    with pytest.raises(DataNotFoundError, match="no images"):
        list_folder_split(tmp_path, "test", 0.1)


def test_batches_cover_every_image_once_reshuffled_each_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    labels = torch.arange(10)
    batches = TensorBatches(images, labels, 4, True, (0.0, 1.0), torch.Generator().manual_seed(0))
    assert len(batches) == 3
    epochs = [[y for _, ys in batches for y in ys.tolist()] for _ in range(2)]
    assert [sorted(e) for e in epochs] == [list(range(10))] * 2
    assert epochs[0] != epochs[1]
    sizes = [len(x) for x, _ in batches]
    assert sizes == [4, 4, 2]
    x, y = next(iter(batches))
    assert torch.allclose(x[:, 0, 0, 0], y.float() / 255)


def write_mnist_folder(mnist_root: Path, folder: Path) -> None:
    """60 real MNIST digits as PNGs in class subfolders of `folder`."""
    images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    write_pngs(folder, images[:60], labels[:60])


def folder_data(folder: Path, *overrides: str):
    """Both splits of data=folder at `folder` (32 px grey, batches of 8, no workers), in
    [-1, 1] on the CPU."""
    from vae_exp.data import build_data

    cfg = compose_cfg(
        [
            "data=folder",
            f"data.root={folder}",
            "data.channels=1",
            "data.image_size=32",
            "data.batch_size=8",
            "data.num_workers=0",
            *overrides,
        ]
    )
    return build_data(read_data(cfg.data), (-1.0, 1.0), torch.device("cpu"), seed=0)


def test_device_resident_and_dataloader_paths_give_the_same_batches(mnist_root, tmp_path):
    from vae_exp.data import LoaderBatches

    write_mnist_folder(mnist_root, tmp_path)
    batches = {}
    for resident in (True, False):
        data = folder_data(tmp_path, f"data.device_resident={resident}")
        assert isinstance(data.train, LoaderBatches) != resident
        assert data.train.num_examples == 57 and data.val.num_examples == 3  # every 20th
        batches[resident] = [x for x, _ in data.val]
    assert all(torch.equal(a, b) for a, b in zip(batches[True], batches[False], strict=True))


def test_cifar10_python_batches(mnist_root, tmp_path):
    """The CIFAR-10 reader on files in CIFAR-10's own format (pickled dicts of 3x32x32 rows),
    filled with real MNIST digits since CIFAR-10 itself cannot be fetched here."""
    digits, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    rgb = np.repeat(np.pad(digits[:60], ((0, 0), (2, 2), (2, 2)))[:, None], 3, axis=1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {
            "data": rgb[i * 10 : (i + 1) * 10].reshape(10, -1),
            "labels": labels[i * 10 : (i + 1) * 10].tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    train, train_labels = load_cifar10_split(tmp_path, "train", download=False)
    test, _ = load_cifar10_split(tmp_path, "test", download=False)
    assert train.shape == (50, 32, 32, 3) and test.shape == (10, 32, 32, 3)
    assert np.array_equal(train[7, 2:30, 2:30, 1], digits[7])
    assert train_labels.tolist() == labels[:50].tolist()
    with open(folder / "test_batch", "wb") as f:  # grey 28x28 rows: 784 values, not 3072
        pickle.dump({"data": digits[:10].reshape(10, -1), "labels": [0] * 10}, f)
    with pytest.raises(ConfigError, match=r"test_batch holds data of shape \(10, 784\)"):
        load_cifar10_split(tmp_path, "test", download=False)
    (folder / "test_batch").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="test_batch is not a CIFAR-10 batch"):
        load_cifar10_split(tmp_path, "test", download=False)
    (folder / "test_batch").unlink()
    with pytest.raises(DataNotFoundError, match="test_batch missing"):
        load_cifar10_split(tmp_path, "test", download=False)


def test_a_final_batch_of_one_is_skipped_in_training_only():
    from vae_exp.losses import MSEKLD
    from vae_exp.models import ConvVAE

    images = torch.randint(0, 256, (65, 1, 32, 32), dtype=torch.uint8)
    train = TensorBatches(images, torch.zeros(65), 64, True, (-1.0, 1.0), torch.Generator())
    val = TensorBatches(images, torch.zeros(65), 64, False, (-1.0, 1.0))
    assert len(train) == 1 and [len(x) for x, _ in train] == [64]
    assert len(val) == 2 and [len(x) for x, _ in val] == [64, 1]
    model = ConvVAE(1, 32)  # 1x1 feature maps: BatchNorm cannot train on a batch of one
    for x, _ in train:
        MSEKLD()(model(x), x)["loss"].backward()


def test_idx_files_with_wrong_headers_or_shapes(mnist_root, tmp_path):
    raw = mnist_root / "MNIST" / "raw"
    images = gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)

    (folder / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + images[4:])  # floats
    (folder / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(ConfigError, match="t10k-images-idx3-ubyte is not an IDX file"):
        load_idx_split("mnist", tmp_path, "test", download=False)

    (folder / "t10k-images-idx3-ubyte").write_bytes(labels)  # a 1-D array where images belong
    with pytest.raises(ConfigError, match=r"shape \(10000,\); mnist images must be N x H x W"):
        load_idx_split("mnist", tmp_path, "test", download=False)

    (folder / "t10k-images-idx3-ubyte").write_bytes(images)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(labels[:-10] + b"")  # header says 10000
    with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte is truncated"):
        load_idx_split("mnist", tmp_path, "test", download=False)


def test_replaying_a_pass_from_a_batch_resumes_its_order():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)
    gen = torch.Generator().manual_seed(3)
    batches = TensorBatches(images, torch.arange(20), 3, True, (0.0, 1.0), gen)
    state = gen.get_state()
    full = [y.tolist() for _, y in batches.iterate()]
    gen.set_state(state)
    assert [y.tolist() for _, y in batches.iterate(start=4)] == full[4:]


# --------------------------------------------------------------------------------------------
# data.binarize


def build_binarized(root, mode, seed=0, pixel_range=(0.0, 1.0), overrides=()):
    """Both splits of the real MNIST test split's first 512 images (train_split=test: the same
    images in both, so training batches can be checked against the validation images), with
    the training labels replaced by image indices so that a batch says which images it holds."""
    cfg = compose_cfg(
        [
            f"data.root={root}",
            "data.train_split=test",
            "data.limit=512",
            f"data.binarize={mode}",
            *overrides,
        ]
    )
    data = build_data(read_data(cfg.data), pixel_range, torch.device("cpu"), seed)
    if hasattr(data.train, "labels"):
        data.train.labels = torch.arange(data.train.num_examples)
    return data


def by_image(batches):
    """{image index: pixels} over one pass of batches whose labels are image indices."""
    return {int(i): x[j] for x, ys in batches for j, i in enumerate(ys)}


@pytest.mark.parametrize("pixel_range", [(0.0, 1.0), (-1.0, 1.0)])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_binarized_pixels_are_the_range_ends_with_the_grey_levels_mean(
    mnist_root, mode, pixel_range
):
    lo, hi = pixel_range
    grey = build_binarized(mnist_root, "none").val.images.float() / 255  # (512, 1, 32, 32)
    data = build_binarized(mnist_root, mode, pixel_range=pixel_range)
    for split in ("train", "val"):
        batches = list(getattr(data, split))
        x = torch.cat([b for b, _ in batches])
        # training labels are image indices (build_binarized); validation is in file order
        p = torch.cat([grey[y] for _, y in batches]) if split == "train" else grey
        assert set(x.unique().tolist()) == {lo, hi}, split
        ones = (x == hi).float()
        # Each pixel is Bernoulli(p): over M = 512 * 1024 pixels the mean's standard deviation
        # is sqrt(sum p(1-p)) / M <= 0.5 / sqrt(M) = 7e-4; 3e-3 is > 4 of them.
        assert abs(ones.mean().item() - p.mean().item()) < 3e-3, split
        # Calibration by grey level (thresholding would be off by > 0.1 in each bin): each bin
        # holds > 19,000 pixels, so its mean's standard deviation is < 0.5 / sqrt(19e3) = 3.6e-3
        # and 0.02 is > 5 of them.
        for a, b in ((1, 63), (64, 127), (128, 191), (192, 254)):
            in_bin = (p >= a / 255) & (p <= b / 255)
            assert in_bin.sum() > 19_000
            assert abs(ones[in_bin].mean().item() - p[in_bin].mean().item()) < 0.02, (split, a)


def test_binarize_keeps_binary_data_and_draws_each_channel():
    generator = torch.Generator().manual_seed(0)
    binary = torch.randint(0, 2, (64, 3, 8, 8), dtype=torch.uint8, generator=generator) * 255
    assert torch.equal(binarize(binary, generator), binary)
    rgb = torch.tensor([0, 64, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(256, 3, 16, 16)
    drawn = binarize(rgb, generator).float() / 255
    assert drawn.dtype == torch.float32 and set(drawn.unique().tolist()) == {0.0, 1.0}
    means = drawn.mean(dim=(0, 2, 3))  # 65,536 draws per channel: sd of the mean < 2e-3
    assert means[0] == 0 and means[2] == 1 and abs(means[1].item() - 64 / 255) < 0.01


def test_dynamic_binarization_is_new_each_pass_and_replays_from_any_batch(mnist_root):
    data = build_binarized(mnist_root, "dynamic")
    generator = data.train.generator
    state = generator.get_state()
    first = list(data.train)
    after_first = generator.get_state()
    second = by_image(data.train)
    # a new draw, not just a new order: the same image has other pixels in the next pass
    changed = [i for i, x in by_image(first).items() if not torch.equal(x, second[i])]
    assert len(changed) == len(second) == 512
    generator.set_state(state)  # as resuming mid-epoch from a checkpoint does
    replay = list(data.train.iterate(start=3))
    assert len(replay) == len(first) - 3
    for (x, y), (x0, y0) in zip(replay, first[3:], strict=True):
        assert torch.equal(y, y0) and torch.equal(x, x0)
    assert torch.equal(generator.get_state(), after_first)  # the next pass goes on the same


def test_dynamic_binarization_replays_on_the_dataloader_path(mnist_root, tmp_path):
    write_mnist_folder(mnist_root, tmp_path)
    passes = {}
    for resident in (True, False):
        data = folder_data(tmp_path, f"data.device_resident={resident}", "data.binarize=dynamic")
        state = data.train.generator.get_state()
        full = [x for x, _ in data.train]
        data.train.generator.set_state(state)
        replay = [x for x, _ in data.train.iterate(start=2)]
        assert all(torch.equal(a, b) for a, b in zip(replay, full[2:], strict=True))
        assert set(torch.cat(full).unique().tolist()) == {-1.0, 1.0}
        passes[resident] = full, [x for x, _ in data.val]
    # both paths draw the same bits: the same order, the same per-batch and per-image seeds
    for a, b in zip(passes[True], passes[False], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_static_binarization_is_one_draw_per_image_and_seed(mnist_root):
    data = build_binarized(mnist_root, "static", seed=3)
    first, second = by_image(data.train), by_image(data.train)
    assert len(first) == 512
    assert all(torch.equal(x, second[i]) for i, x in first.items())
    again = build_binarized(mnist_root, "static", seed=3)
    assert torch.equal(again.train.images, data.train.images)
    assert set(data.train.images.unique().tolist()) == {0, 255}
    other = build_binarized(mnist_root, "static", seed=4)
    assert not torch.equal(other.train.images, data.train.images)
    assert torch.equal(other.val.images, data.val.images)  # validation: one fixed draw


def test_validation_is_one_fixed_draw_in_dynamic_mode(mnist_root):
    data = build_binarized(mnist_root, "dynamic")
    before = [x for x, _ in data.val]
    list(data.train)  # a training pass in between draws anew for training only
    after = [x for x, _ in data.val]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert set(torch.cat(before).unique().tolist()) == {0.0, 1.0}
    static = build_binarized(mnist_root, "static", seed=7)  # another mode and seed: same draw
    assert all(torch.equal(a, b) for (a, _), b in zip(static.val, before, strict=True))


def test_a_bad_binarize_value_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as info:
        read_data(compose_cfg(["data.binarize=maybe"]).data)
    assert "data.binarize='maybe'" in str(info.value)
    assert "none | dynamic | static" in str(info.value)


def test_cli_trains_on_dynamically_binarized_mnist(mnist_root, tmp_path):
    result = run_cli([*TINY, "loss=bce_kld", "data.binarize=dynamic", "logger=none"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data.binarize=dynamic" in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# Where the data comes from; damaged and crafted files


def place_mnist(root: Path, files: tuple[str, ...] = MNIST_FILES) -> Path:
    """Stand-in MNIST files (their presence is all the search looks at)."""
    (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / "MNIST" / "raw" / name).write_bytes(b"")
    return root


def test_tests_find_mnist_in_vae_exp_data_then_shared_then_the_cache(tmp_path):
    repo, home = tmp_path / "checkout", tmp_path / "home"
    shared, cache = tmp_path / "shared" / "data", home / ".cache" / "vae_exp" / "data"
    mine = tmp_path / "mine"
    env = {"HOME": str(home)}
    assert find_mnist(env, repo) == cache  # nowhere: the cache, where a download goes
    reason = missing_mnist_reason(env, repo, "")
    assert str(shared) in reason and str(cache) in reason and DATA_ENV in reason
    place_mnist(cache)
    assert find_mnist(env, repo) == cache
    place_mnist(shared, MNIST_TEST_FILES)  # one split is not enough: the tests train on train
    assert find_mnist(env, repo) == cache
    place_mnist(shared, MNIST_TRAIN_FILES)
    assert find_mnist(env, repo) == shared
    assert find_mnist({**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, repo) == shared
    mine.mkdir()  # $VAE_EXP_DATA wins, and is the only place looked at when set
    assert find_mnist({**env, DATA_ENV: str(mine)}, repo) == mine
    assert str(shared) not in missing_mnist_reason({**env, DATA_ENV: str(mine)}, repo, "")
    place_mnist(mine)
    assert find_mnist({**env, DATA_ENV: str(mine)}, repo) == mine
    shutil.rmtree(shared)
    assert find_mnist({**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, repo) == (
        tmp_path / "xdg" / "vae_exp" / "data"
    )


def test_tests_read_mnist_from_vae_exp_data_and_skip_without_it(mnist_root, tmp_path):
    """A real pytest session (a data test) with $VAE_EXP_DATA set: it passes on a folder
    holding MNIST, and skips with the way to fix it on an empty one; never an error."""
    test = "tests/test_data.py::test_real_mnist_test_split"
    mine = copy_mnist(mnist_root, tmp_path / "mine")
    (tmp_path / "empty").mkdir()
    for folder, outcome in ((mine, "1 passed"), (tmp_path / "empty", "1 skipped")):
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", test],
            cwd=REPO,
            env=cli_env({DATA_ENV: str(folder)}),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert outcome in result.stdout, result.stdout[-3000:]
    assert f"{tmp_path / 'empty'}" in result.stdout and f"set {DATA_ENV}" in result.stdout


def test_data_root_null_means_the_default_places_and_a_given_one_must_exist(tmp_path):
    cfg = read_data(compose_cfg([]).data)
    assert cfg.root is None and data_root(cfg) is None
    assert data_root(dataclasses.replace(cfg, root="data")) is None  # runs saved before null
    assert data_root(dataclasses.replace(cfg, root=str(tmp_path))) == tmp_path
    missing = tmp_path / "nowhere"
    for name in ("mnist", "fashion_mnist", "cifar10", "folder"):
        given = dataclasses.replace(cfg, name=name, root=str(missing), download=False)
        with pytest.raises(ConfigError, match=f"data.root={missing} is not a directory"):
            data_root(given)
    # download=true creates it for the download
    assert data_root(dataclasses.replace(cfg, root=str(missing), download=True)) == missing
    with pytest.raises(ConfigError, match=r"data.root=None; allowed: a folder path"):
        read_data(compose_cfg(["data=folder", "data.root=null"]).data)
    # runs saved with root: data (the old default) resume under today's default
    current = OmegaConf.to_container(compose_cfg([]), resolve=True)
    old = copy.deepcopy(current)
    old["data"]["root"] = "data"
    assert config_differences(old, current) == []


def test_a_failed_download_names_data_root_and_leaves_no_folder(tmp_path):
    root = tmp_path / "new" / "dir"
    try:
        images, _ = load_idx_split("mnist", root, "test", download=True)
    except DataNotFoundError as e:  # no network (as on the machines this was written on)
        assert f"Download with torchvision into data.root={root} failed" in str(e)
        assert not (tmp_path / "new").exists()
    else:  # the network allowed it: the files arrived where data.root says
        assert len(images) == 10_000 and (root / "MNIST" / "raw").is_dir()


def test_each_split_logs_the_files_it_was_read_from(mnist_root, caplog):
    caplog.set_level(logging.INFO, logger="vae_exp.data")
    cfg = compose_cfg([f"data.root={mnist_root}", "data.limit=8"])
    build_data(read_data(cfg.data), (0.0, 1.0), torch.device("cpu"), seed=0)
    lines = [r.getMessage() for r in caplog.records if " split: " in r.getMessage()]
    raw = mnist_root / "MNIST" / "raw"
    assert len(lines) == 2  # one per split: train trains, test validates
    assert lines[0].startswith("data=mnist train split: read ")
    assert lines[1].startswith("data=mnist test split: read ")
    for line, split in zip(lines, ("train", "t10k"), strict=True):
        assert str(raw / f"{split}-images-idx3-ubyte.gz") in line
        assert str(raw / f"{split}-labels-idx1-ubyte.gz") in line


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_a_truncated_or_corrupt_gz_file_is_named(mnist_root, tmp_path, damage):
    root = copy_mnist(mnist_root, tmp_path / "data")  # the test split (validation) damaged
    bad = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2] if damage == "truncated" else gzip.decompress(good))
    with pytest.raises(ConfigError) as info:
        read_idx(bad)
    message = str(info.value)
    assert f"{bad} is truncated or corrupt" in message and "download it again" in message
    run_dir = tmp_path / "run"
    result = run_cli(
        [*TINY, f"data.root={root}", "data.download=false", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env={"WANDB_MODE": "disabled"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert f"{bad} is truncated or corrupt" in output and "Traceback" not in output
    assert not (run_dir / "checkpoints").exists()


CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class RunsCode:
    """A pickle payload: unpickling it calls os.system (creating `marker`)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, 4, 5])  # Python 2's format (the real files) .. today's
def test_cifar10_batches_load_and_a_crafted_one_runs_no_code(tmp_path, protocol):
    rows = np.random.default_rng(0).integers(0, 256, (60, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate(CIFAR_NAMES):  # the keys of the real files
        batch = {
            "batch_label": f"batch {i + 1} of 6",
            "labels": [(i + j) % 10 for j in range(10)],
            "data": rows[i * 10 : (i + 1) * 10],
            "filenames": [f"image_{i}_{j}.png" for j in range(10)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    train, labels = load_cifar10_split(tmp_path, "train", download=False)
    assert train.shape == (50, 32, 32, 3) and labels[:12].tolist() == [*range(10), 1, 2]
    assert np.array_equal(train[17], rows[17].reshape(3, 32, 32).transpose(1, 2, 0))

    marker = tmp_path / "code_ran"
    crafted = pickle.dumps({"data": RunsCode(marker), "labels": [0]}, protocol=protocol)
    (folder / "test_batch").write_bytes(crafted)
    with pytest.raises(ConfigError) as info:
        load_cifar10_split(tmp_path, "test", download=False)
    message = str(info.value)
    assert f"{folder / 'test_batch'} is not a CIFAR-10 batch" in message and "system" in message
    assert not marker.exists()
    pickle.loads(crafted)  # the payload is real: plain pickle runs it
    assert marker.exists()
