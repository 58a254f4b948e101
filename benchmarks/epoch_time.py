"""Seconds per training epoch: the original script's DataLoader loop against vae_exp, side by
side in one process, on the same data, model and batch size; and what one step costs (kernels
and GPU time on CUDA, operator calls on a CPU).

    python benchmarks/epoch_time.py --device cpu --limit 10000 --epochs 2
    python benchmarks/epoch_time.py --device cuda                    # CUDA graph (auto)
    python benchmarks/epoch_time.py --device cuda --batch-size 1024 --precision bf16 --channels-last
    python benchmarks/epoch_time.py --device cuda --compile default  # compiled, inside the graph
    python benchmarks/epoch_time.py --device cpu --precision bf16 --channels-last --fused true
    python benchmarks/epoch_time.py --device cuda --cli 100          # the real CLI, 100 epochs

Two ways to time vae_exp:
- default: `vae_exp.train.train_epoch` on the experiment `vae_exp.build.build_experiment` makes
  of the composed config (device-resident data), with the step `vae_exp.steps.make_step` builds
  for the options given (on CUDA: captured in a CUDA graph unless --cuda-graph false); then one
  step is profiled (torch.profiler): kernels per step and GPU time per step on CUDA, operator
  calls (top-level aten ops, forward + backward + optimizer) per step on a CPU.
- --cli N: the whole program as a user runs it, `python -m vae_exp data=fashion_mnist ...
  trainer.epochs=N logger=none eval.enabled=false`, timed from process start to exit (start-up,
  data loading, validation, pictures and checkpoints included), with the seconds per epoch
  the run itself logged.

The original script's loop is re-implemented from it: a Dataset of PIL images with transforms
Resize / ToTensor / Normalize, a shuffling DataLoader with min(8, CPU count) workers, and
`loss.item()` after every step. Both train the reference ConvVAE with Adam 5e-4 and
MSE + 0.00025 KLD. Data: Fashion-MNIST's 60,000 training images (Debian's
dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
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

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


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


def time_original(args, device: torch.device) -> list[float]:
    """Seconds of each of args.epochs epochs of the original script's loop."""
    images, _ = load_idx_split("fashion_mnist", Path(args.root), "train", download=False)
    images = images[: args.limit]
    torch.manual_seed(0)
    model = ConvVAE(1, 32).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    loader = DataLoader(
        OriginalImages(images),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=min(8, os.cpu_count() or 1),
    )
    loss_fn = MSEKLD().to(device)
    return [
        timed(lambda: original_epoch(model, optimizer, loss_fn, loader, device), device)
        for _ in range(args.epochs)
    ]


def overrides(args) -> list[str]:
    """The CLI overrides of the options given (both ways of timing vae_exp use them)."""
    return [
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
        f"optim.optimizer.fused={ {'auto': 'auto', 'true': 'true', 'false': 'null'}[args.fused] }",
        "logger=none",
    ]


def time_train_epoch(args, device: torch.device) -> dict:
    """vae_exp's train_epoch: seconds of each epoch, the step's description, its cost."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # after the original loop's
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides(args))
    start = time.perf_counter()
    exp = build_experiment(cfg, Cluster(), device)
    prepare = time.perf_counter() - start
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

        def one_epoch() -> None:
            pos.batches_done = pos.epoch_steps = 0
            pos.sums = {}
            train_epoch(exp, step, pos, tracker, stop)

        times = [timed(one_epoch, device) for _ in range(args.epochs)]
        loss = pos.sums["loss"] / pos.epoch_steps
    x, y = next(iter(exp.data.train))
    return {
        "times": times,
        "description": description,
        "prepare": prepare,
        "loss": loss,
        "cost": step_cost(step, x, y, device),
    }


def step_cost(step, x, y, device: torch.device, steps: int = 20) -> str:
    """What one training step (as train_epoch calls it) costs, from torch.profiler over
    `steps` steps after 3 more of warm-up: on CUDA the kernels launched (memory copies and
    sets included) and their GPU time per step; on a CPU the operator calls per step (aten ops
    called from outside another aten op, the backward's and the optimizer's included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step(x, y)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device.type == "cuda":
        kernels = [  # kernels, copies and sets; not the annotations kineto also puts on the GPU
            e
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        gpu_us = sum(e.device_time for e in kernels)
        return f"{len(kernels) / steps:.0f} kernels, {gpu_us / steps / 1000:.3f} ms GPU per step"

    def top_level(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return False
            parent = parent.cpu_parent
        return True

    ops = [e for e in events if e.name.startswith("aten::") and top_level(e)]
    common = ", ".join(f"{n} {c // steps}" for n, c in Counter(e.name for e in ops).most_common(3))
    return f"{len(ops) / steps:.0f} aten ops per step (most: {common})"


def time_cli(args) -> dict:
    """The real program for args.cli epochs: wall seconds from process start to exit, and
    the seconds per epoch it logged (metrics.jsonl)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable,
            "-m",
            "vae_exp",
            *overrides(args),
            f"trainer.epochs={args.cli}",
            "eval.enabled=false",
            f"hydra.run.dir={run_dir}",
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(
                command, cwd=REPO, capture_output=True, text=True, timeout=args.cli_timeout
            )
            finished = True
        except subprocess.TimeoutExpired as stopped:  # killed: report the epochs it did
            done = subprocess.CompletedProcess(command, 0, stopped.stdout, stopped.stderr)
            finished = False
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"the CLI run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        epochs = [m for m in map(json.loads, lines) if "epoch" in m]
        if not epochs:
            sys.exit(f"the CLI run finished no epoch in {wall:.0f} s")
        output = _text(done.stdout) + _text(done.stderr)
        step_line = next((ln for ln in output.splitlines() if "; step: " in ln), "")
    return {
        "wall": wall,
        "finished": finished,
        "logged": [m["seconds"] for m in epochs],
        "last": epochs[-1],
        "description": step_line.split("; step: ", 1)[-1].split("; outputs", 1)[0],
    }


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def machine(device: torch.device) -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "unknown CPU")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{where}; {os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="training batch size")
    parser.add_argument("--limit", type=int, default=None, help="first N training images")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop")
    parser.add_argument(
        "--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files"
    )
    parser.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16"], help="vae_exp (the original: fp32)"
    )
    parser.add_argument("--channels-last", action="store_true", help="vae_exp's loop")
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "true", "false"])
    parser.add_argument(
        "--compile",
        default="false",
        choices=["false", "default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="trainer.compile for vae_exp",
    )
    parser.add_argument(
        "--fused",
        default="auto",
        choices=["auto", "true", "false"],
        help="optim.optimizer.fused for vae_exp (auto: fused on CUDA)",
    )
    parser.add_argument("--skip-original", action="store_true", help="time vae_exp only")
    parser.add_argument(
        "--cli", type=int, metavar="N", help="time the real CLI for N epochs instead of train_epoch"
    )
    parser.add_argument(
        "--cli-timeout", type=float, help="stop the CLI run after this many s (report its epochs)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    original = [] if args.skip_original else time_original(args, device)
    n = args.limit or 60_000
    print(f"device: {args.device} ({machine(device)}); {n} images, batch {args.batch_size}")
    print("| loop | s/epoch | images/s | epochs (s) | notes |")
    print("|---|---|---|---|---|")
    if original:
        s = statistics.median(original)
        times = ", ".join(f"{t:.2f}" for t in original)
        print(f"| the original script's DataLoader loop | {s:.2f} | {n / s:.0f} | {times} | fp32 |")
    if args.cli:
        run = time_cli(args)
        logged = run["logged"]
        per_epoch = run["wall"] / len(logged)
        later = statistics.median(logged[1:]) if len(logged) > 1 else logged[0]
        whole = (
            f"whole run {run['wall']:.1f} s"
            if run["finished"]
            else f"STOPPED after {run['wall']:.0f} s (--cli-timeout) with {len(logged)} of "
            f"{args.cli} epochs done: about {run['wall'] / len(logged) * args.cli:.0f} s for all"
        )
        print(
            f"| `python -m vae_exp`, {args.cli} epochs, wall clock / epochs | {per_epoch:.2f} | "
            f"{n / per_epoch:.0f} | {whole} | {run['description']}; "
            f"logged seconds: epoch 1 {logged[0]:.2f}, median of the rest {later:.2f}; "
            f"final val loss {run['last']['val/loss']:.5f} |"
        )
        ours = per_epoch
    else:
        run = time_train_epoch(args, device)
        ours = statistics.median(run["times"])
        times = ", ".join(f"{t:.2f}" for t in run["times"])
        print(
            f"| vae_exp train_epoch, device-resident | {ours:.2f} | {n / ours:.0f} | {times} | "
            f"{run['description']}; {run['cost']}; mean train loss of the last epoch "
            f"{run['loss']:.5f}; build (both splits decoded) {run['prepare']:.1f} s |"
        )
    if original:
        print(f"speed-up: {statistics.median(original) / ours:.2f}x")
    if device.type == "cuda" and not args.cli:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"peak GPU memory of vae_exp's loop: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
