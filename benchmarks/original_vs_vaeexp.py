"""The original script's training loop on MNIST for N epochs, printed beside a vae_exp run of
the same experiment: per epoch, the mean training loss (as the script prints it) and the
validation loss on the 10,000 test images, computed as vae_exp's validation computes it.

    python -m vae_exp data.root=../shared/data trainer.epochs=2 logger=none \\
        hydra.run.dir=results/ref
    python benchmarks/original_vs_vaeexp.py --data-root ../shared/data --epochs 2 \\
        --vae-exp-run results/ref --out results/original    # --device cuda: on a GPU

The original side uses nothing of vae_exp: the script's VAE and loss as transcribed in
tests/seed_reference.py, torchvision's datasets.MNIST(train=True) with the script's transforms
(Resize 32, ToTensor, Normalize 0.5/0.5), a shuffling DataLoader with batch 64 and the
script's 8 workers (at most the CPU count), Adam 5e-4, `loss.item()` summed per step, and after
each epoch the script's 25 prior samples (saved to OUT/epN.png when --out is given). The script
sets no seed; this one calls torch.manual_seed(0) first. Its validation is vae_exp's: the model
in eval mode, the test split in file order in batches of 64, MSE + 0.00025 * KLD per batch
weighted by the batch's size (a mean per image), the posterior noise from a seed of its own (0)
so that validating does not move the training's random stream. torchvision's MNIST reads
unpacked IDX files, so DATA_ROOT/MNIST/raw/*.gz are unpacked into a temporary folder first.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.utils import save_image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/seed_reference.py: the script's model and loss

from tests.seed_reference import SeedVAE, seed_loss  # noqa: E402

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
FILES += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
LATENT_DIM = 128


def unpack_mnist(data_root: Path, into: Path) -> Path:
    """DATA_ROOT/MNIST/raw/*.gz unpacked as torchvision's MNIST wants them; returns `into`."""
    raw = into / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES:
        gz = data_root / "MNIST" / "raw" / f"{name}.gz"
        if not gz.is_file():
            sys.exit(f"original_vs_vaeexp: {gz} is missing; --data-root must hold MNIST/raw/*.gz")
        (raw / name).write_bytes(gzip.decompress(gz.read_bytes()))
    return into


def mnist(root: Path, train: bool) -> datasets.MNIST:
    """The script's dataset: torchvision's MNIST through its transforms, in [-1, 1] at 32 px."""
    transform = transforms.Compose(
        [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
    )
    return datasets.MNIST(root=str(root), train=train, transform=transform, download=False)


def first(dataset: Dataset, limit: int | None) -> Dataset:
    """The first `limit` items of `dataset` (all of them for None), as vae_exp's data.limit."""
    return dataset if limit is None else Subset(dataset, range(min(limit, len(dataset))))


def train_epoch(vae: SeedVAE, optimizer, loader: DataLoader, device: torch.device) -> float:
    """One epoch of the script's loop; returns what it prints (the mean batch loss)."""
    total_loss = 0.0
    for img, _ in loader:
        img = img.to(device)
        vae.train()
        optimizer.zero_grad()
        y, x, mu, log_var = vae(img)
        loss = seed_loss(y, x, mu, log_var)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    return total_loss / len(loader)


@torch.no_grad()
def validate(vae: SeedVAE, loader: DataLoader, device: torch.device, seed: int = 0) -> float:
    """The mean loss per test image, eval mode, the noise from `seed` (vae_exp's validation).
    vae_exp draws its validation noise once, [images, 1, latent] from a CPU generator seeded
    with `seed`; on a CPU the original model's per-batch draws from the global generator
    (batches of 64 x 128 numbers, a multiple of 16) are the same numbers in the same order."""
    vae.eval()
    total, seen = 0.0, 0
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for img, _ in loader:
            y, x, mu, log_var = vae(img.to(device))
            total += seed_loss(y, x, mu, log_var).item() * len(img)
            seen += len(img)
    return total / seen


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "a CPU")


def vae_exp_epochs(run_dir: Path) -> list[dict]:
    """The per-epoch lines of a vae_exp run's metrics.jsonl."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "epoch" in m]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, help="first N images of each split (quick checks)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--vae-exp-run", type=Path, help="a vae_exp run folder to print beside")
    parser.add_argument("--out", type=Path, help="folder for the sample grids and results.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    vae = SeedVAE((1, 32, 32), LATENT_DIM).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=5e-4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = unpack_mnist(args.data_root, Path(tmp))
        train_set, test_set = (first(mnist(root, split), args.limit) for split in (True, False))
        train = DataLoader(train_set, batch_size=64, num_workers=args.workers, shuffle=True)
        test = DataLoader(test_set, batch_size=64, num_workers=args.workers)
        for epoch in range(1, args.epochs + 1):
            start = time.perf_counter()
            train_loss = train_epoch(vae, optimizer, train, device)
            seconds = time.perf_counter() - start
            vae.eval()  # the script's 5x5 prior samples after every epoch (global RNG, as it)
            samples = vae.decode(torch.randn(25, LATENT_DIM).to(device)).detach()
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                save_image(samples, args.out / f"ep{epoch}.png", nrow=5, normalize=True)
            val_loss = validate(vae, test, device)
            rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            rows[-1]["train_seconds"] = seconds
            print(
                f"original epoch {epoch}/{args.epochs}: train loss {train_loss:.5f}, "
                f"val loss {val_loss:.5f} ({seconds:.0f} s, {len(train.dataset) / seconds:.0f} "
                "images/s)",
                flush=True,
            )

    where = f"{cpu_name()}, {os.cpu_count()} CPUs"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}; {where}"
    print(
        f"\n{datetime.date.today()}, torch {torch.__version__}, {where}, "
        f"{torch.get_num_threads()} threads, {args.workers} DataLoader workers"
    )
    print(
        "| epoch | original: train loss | vae_exp: train loss | original: val loss | "
        "vae_exp: val loss |"
    )
    print("|---|---|---|---|---|")
    ours = {m["epoch"]: m for m in vae_exp_epochs(args.vae_exp_run)} if args.vae_exp_run else {}
    for row in rows:
        m = ours.get(row["epoch"])
        t = f"{m['train/loss']:.5f}" if m else "—"
        v = f"{m['val/loss']:.5f}" if m else "—"
        print(f"| {row['epoch']} | {row['train_loss']:.5f} | {t} | {row['val_loss']:.5f} | {v} |")
    if args.out:
        (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
