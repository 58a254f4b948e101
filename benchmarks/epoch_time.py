"""Seconds per training epoch: the original script's DataLoader loop against vae_exp's trainer,
side by side in one process, on the same data, model and batch size.

    python benchmarks/epoch_time.py --device cpu --limit 10000 --epochs 2
    python benchmarks/epoch_time.py --device cuda                    # CUDA graph (auto)
    python benchmarks/epoch_time.py --device cuda --batch-size 1024
    python benchmarks/epoch_time.py --device cuda --cuda-graph false --compile reduce-overhead
    python benchmarks/epoch_time.py --device cpu --precision bf16 --channels-last --fused

The original script's loop is re-implemented from it: a Dataset of PIL images with transforms
Resize / ToTensor / Normalize, a shuffling DataLoader with min(8, CPU count) workers, and
`loss.item()` after every step. vae_exp's loop is `vae_exp.train.train_epoch` on the
experiment `vae_exp.build.build_experiment` makes of the composed config (device-resident
data), with the step `vae_exp.steps.make_step` builds for the options given (on CUDA: the step
captured in a CUDA graph unless --cuda-graph false).
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
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from vae_exp.build import build_experiment
from vae_exp.checkpoint import Position
from vae_exp.config import LoggerConfig
from vae_exp.data import load_idx_split
from vae_exp.distributed import Cluster
from vae_exp.losses import MSEKLD
from vae_exp.models import ConvVAE
from vae_exp.preemption import StopRequest
from vae_exp.steps import make_step
from vae_exp.tracking import Tracker
from vae_exp.train import train_epoch

CONF = Path(__file__).resolve().parent.parent / "conf"


class OriginalImages(Dataset):
    """The original script's dataset: PIL images through its transforms."""

    def __init__(self, images) -> None:
        self.images = images
        self.transform = transforms.Compose(
            [transforms.Resize(32), transforms.ToTensor(), transforms.Normalize([0.5], [0.5])]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i], mode="L")), 0


def original_epoch(model, optimizer, loss_fn, loader, device) -> float:
    """One epoch of the original script's loop; returns its mean batch loss."""
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
        help="vae_exp's loop (the original loop is always fp32)",
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
    parser.add_argument("--skip-original", action="store_true", help="time vae_exp's loop only")
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

    # The original script's loop.
    model, optimizer = fresh()
    loader = DataLoader(
        OriginalImages(images), batch_size=args.batch_size, shuffle=True, num_workers=workers
    )
    original_times = [
        timed(lambda: original_epoch(model, optimizer, loss_fn, loader, device), device)
        for _ in range(0 if args.skip_original else args.epochs)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # vae_exp's trainer on device-resident data: the experiment the CLI would build.
    overrides = [
        "data=fashion_mnist",
        f"data.root={Path(args.root).resolve()}",
        f"data.limit={args.limit or 'null'}",
        f"data.batch_size={args.batch_size}",
        f"trainer.device={args.device}",
        "trainer.progress=false",
        f"trainer.precision={args.precision}",
        f"trainer.channels_last={str(args.channels_last).lower()}",
        f"trainer.cuda_graph={args.cuda_graph}",
        f"trainer.compile={args.compile}",
        f"optim.optimizer.fused={'true' if args.fused else 'null'}",
        "logger=none",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    start = time.perf_counter()
    exp = build_experiment(cfg, Cluster(), device)
    prepare_seconds = time.perf_counter() - start
    step, description = make_step(
        exp.model,
        exp.loss_fn,
        exp.optimizer,
        trainer=exp.trainer,
        cluster=exp.cluster,
        batch_size=args.batch_size,
    )
    with tempfile.TemporaryDirectory() as tmp, StopRequest() as stop:
        tracker = Tracker(Path(tmp), {}, LoggerConfig(name="none"))
        pos = Position()

        def our_epoch() -> None:
            pos.batches_done = pos.epoch_steps = 0
            pos.sums = {}
            train_epoch(exp, step, pos, tracker, stop)

        ours_times = [timed(our_epoch, device) for _ in range(args.epochs)]
        final_loss = pos.sums["loss"] / pos.epoch_steps

    original_s = statistics.median(original_times) if original_times else float("nan")
    ours_s = statistics.median(ours_times)
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
        f"| original script's DataLoader loop ({workers} workers) | {original_s:.2f} | "
        f"{n / original_s:.0f} | "
        f"{', '.join(f'{t:.2f}' for t in original_times)} |"
    )
    print(
        f"| vae_exp train_epoch, device-resident, {description} | {ours_s:.2f} | "
        f"{n / ours_s:.0f} | {', '.join(f'{t:.2f}' for t in ours_times)} |"
    )
    print(f"vae_exp's last epoch: mean train loss {final_loss:.5f}")
    print(
        f"speed-up: {original_s / ours_s:.2f}x (one-off build of vae_exp's experiment, decode and "
        f"resize of both splits included: {prepare_seconds:.1f} s)"
    )
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"peak GPU memory (vae_exp's loop): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
