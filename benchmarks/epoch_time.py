"""Seconds per training epoch: the seed's DataLoader loop against vae_exp's trainer, side by side
in one process, on the same data, model and batch size.

    python benchmarks/epoch_time.py --device cpu --limit 10000 --epochs 2
    python benchmarks/epoch_time.py --device cuda                    # CUDA graph (auto)
    python benchmarks/epoch_time.py --device cuda --batch-size 1024
    python benchmarks/epoch_time.py --device cuda --cuda-graph false --compile reduce-overhead
    python benchmarks/epoch_time.py --device cpu --precision bf16 --channels-last --fused

The seed loop is re-implemented from the seed's script: a Dataset of PIL images with
transforms Resize / ToTensor / Normalize, a shuffling DataLoader with min(8, CPU count)
workers, and `loss.item()` after every step. vae_exp's loop is `vae_exp.train.train_epoch` on
device-resident data, with the step `vae_exp.train.make_step` builds for the options given
(on CUDA: the step captured in a CUDA graph unless --cuda-graph false).
Both train the reference ConvVAE with Adam 5e-4 and MSE + 0.00025 KLD.
Data: Fashion-MNIST's 60,000 training images from Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm import tqdm

from vae_exp.config import CheckpointConfig, LoggerConfig, TrainerConfig
from vae_exp.data import TensorBatches, load_idx_split, prepare_images
from vae_exp.distributed import Cluster
from vae_exp.losses import MSEKLD
from vae_exp.models import ConvVAE
from vae_exp.preemption import StopRequest
from vae_exp.steps import use_cuda_graph
from vae_exp.tracking import Tracker
from vae_exp.train import Position, make_step, train_epoch


class SeedImages(Dataset):
    """The seed's torchvision MNIST-style dataset: PIL images through the seed's transforms."""

    def __init__(self, images) -> None:
        self.images = images
        self.transform = transforms.Compose(
            [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


def seed_epoch(model, optimizer, loss_fn, loader, device) -> float:
    """One epoch of the seed's loop; returns its mean batch loss."""
    total = 0.0
    for img, _ in loader:
        img = img.to(device)
        model.train()
        optimizer.zero_grad()
        loss = loss_fn(model(img), img)["loss"]
        loss.backward()
        optimizer.step()
        total += loss.item()
    return total / len(loader)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="first N training images")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop")
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="vae_exp's loop (the seed loop is always fp32)",
    )
    parser.add_argument("--channels-last", action="store_true", help="vae_exp's loop")
    parser.add_argument(
        "--cuda-graph", default="auto", choices=["auto", "true", "false"], help="vae_exp's loop"
    )
    parser.add_argument(
        "--compile",
        default="false",
        choices=["false", "default", "reduce-overhead", "max-autotune"],
        help="vae_exp's loop",
    )
    parser.add_argument(
        "--fused", action="store_true", help="vae_exp's loop: fused Adam (optim.optimizer.fused)"
    )
    parser.add_argument("--skip-seed", action="store_true", help="time vae_exp's loop only")
    args = parser.parse_args()
    device = torch.device(args.device)

    images, labels = load_idx_split("fashion_mnist", Path(args.root), "train", download=False)
    images, labels = images[: args.limit], labels[: args.limit]
    n = len(images)
    workers = min(8, os.cpu_count() or 1)
    loss_fn = MSEKLD()

    def fresh(fused: bool | None = None):
        torch.manual_seed(0)
        model = ConvVAE(1, 32).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=5e-4, fused=fused)

    # The seed's loop.
    model, optimizer = fresh()
    loader = DataLoader(
        SeedImages(images), batch_size=args.batch_size, shuffle=True, num_workers=workers
    )
    seed_times = [
        timed(lambda: seed_epoch(model, optimizer, loss_fn, loader, device), device)
        for _ in range(0 if args.skip_seed else args.epochs)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # vae_exp's trainer on device-resident data.
    model, optimizer = fresh(fused=True if args.fused else None)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    resident = prepare_images(images, 32, 1).to(device)
    prepare_seconds = time.perf_counter() - start
    batches = TensorBatches(
        resident,
        torch.as_tensor(labels.copy()).to(device),
        args.batch_size,
        True,
        (-1.0, 1.0),
        torch.Generator().manual_seed(0),
    )
    trainer = TrainerConfig(
        epochs=args.epochs,
        device=args.device,
        seed=0,
        log_every=50,
        progress=False,
        sample_grid=5,
        num_reconstructions=8,
        resume=None,
        skip_nonfinite=0,
        precision=args.precision,
        channels_last=args.channels_last,
        cuda_graph={"auto": "auto", "true": True, "false": False}[args.cuda_graph],
        compile=False if args.compile == "false" else args.compile,
        checkpoint=CheckpointConfig(save_last=False, save_best=False),
    )
    captured = use_cuda_graph(trainer, device, optimizer, distributed=False)
    loss_fn.to(device)
    step = make_step(
        model, loss_fn, optimizer, trainer, device, captured, Cluster(), args.batch_size
    )
    with tempfile.TemporaryDirectory() as tmp, StopRequest() as stop:
        tracker = Tracker(Path(tmp), {}, LoggerConfig(name="none"))
        pos = Position()
        bar = tqdm(disable=True)

        def our_epoch() -> None:
            pos.batches_done = pos.epoch_steps = 0
            pos.sums = {}
            train_epoch(step, model, loss_fn, optimizer, batches, tracker, pos, trainer, bar, stop)

        ours_times = [timed(our_epoch, device) for _ in range(args.epochs)]
        final_loss = pos.sums["loss"] / pos.epoch_steps

    seed_s = statistics.median(seed_times) if seed_times else float("nan")
    ours_s = statistics.median(ours_times)
    how = [args.precision, "CUDA graph" if captured else "eager"]
    how += [f"compile {args.compile}"] if args.compile != "false" else []
    how += ["channels_last"] if args.channels_last else []
    how += ["fused Adam"] if args.fused else []
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "unknown CPU")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    print(
        f"device: {args.device} ({where}); {os.cpu_count()} CPUs ({cpu}); torch "
        f"{torch.__version__}; {n} images, batch {args.batch_size}, {args.epochs} epochs each"
    )
    print("| loop | s/epoch (median) | images/s | epochs timed |")
    print("|---|---|---|---|")
    print(
        f"| seed DataLoader loop ({workers} workers) | {seed_s:.2f} | {n / seed_s:.0f} | "
        f"{', '.join(f'{t:.2f}' for t in seed_times)} |"
    )
    print(
        f"| vae_exp train_epoch, device-resident, {', '.join(how)} | {ours_s:.2f} | "
        f"{n / ours_s:.0f} | {', '.join(f'{t:.2f}' for t in ours_times)} |"
    )
    print(f"vae_exp's last epoch: mean train loss {final_loss:.5f}")
    print(
        f"speed-up: {seed_s / ours_s:.2f}x (one-off decode+resize for vae_exp: "
        f"{prepare_seconds:.1f} s)"
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"peak GPU memory (vae_exp's loop): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
