"""Reading the real IDX files, split handling, folders of images, and batching."""

import gzip
import hashlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from vae_exp.config import ConfigError
from vae_exp.data import (
    DataNotFoundError,
    ImageFiles,
    TensorBatches,
    list_folder_split,
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


def test_a_split_loads_without_the_other_and_a_missing_one_explains(mnist_root):
    # ../shared/data has only the test split: it must load, and train must fail clearly
    assert len(load_idx_split("mnist", mnist_root, "test", download=False)[0]) == 10_000
    with pytest.raises(DataNotFoundError) as info:
        load_idx_split("mnist", mnist_root, "train", download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(mnist_root / "MNIST" / "raw") in message
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


def test_fashion_mnist_from_debian(fashion_dir, tmp_path):
    # nothing under root: the system folder is found
    train, train_labels = load_idx_split("fashion_mnist", tmp_path, "train", download=False)
    test, _ = load_idx_split("fashion_mnist", tmp_path, "test", download=False)
    assert train.shape == (60_000, 28, 28) and test.shape == (10_000, 28, 28)
    assert sorted(set(train_labels.tolist())) == list(range(10))


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


def test_device_resident_and_dataloader_paths_give_the_same_batches(mnist_root, tmp_path):
    from tests.conftest import compose_cfg
    from vae_exp.config import read_data
    from vae_exp.data import LoaderBatches, build_data

    images, labels = load_idx_split("mnist", mnist_root, "test", download=False)
    write_pngs(tmp_path, images[:60], labels[:60])
    batches = {}
    for resident in (True, False):
        cfg = compose_cfg(
            [
                "data=folder",
                f"data.root={tmp_path}",
                "data.channels=1",
                "data.image_size=32",
                "data.batch_size=8",
                "data.num_workers=0",
                f"data.device_resident={resident}",
            ]
        )
        data = build_data(read_data(cfg.data), (-1.0, 1.0), torch.device("cpu"), seed=0)
        assert isinstance(data.train, LoaderBatches) != resident
        assert data.train.num_examples == 57 and data.val.num_examples == 3  # every 20th
        batches[resident] = [x for x, _ in data.val]
    assert all(torch.equal(a, b) for a, b in zip(batches[True], batches[False], strict=True))


def test_cifar10_python_batches(mnist_root, tmp_path):
    """The CIFAR-10 reader on files in CIFAR-10's own format (pickled dicts of 3x32x32 rows),
    filled with real MNIST digits since CIFAR-10 itself cannot be fetched here."""
    import pickle

    from vae_exp.data import load_cifar10_split

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
