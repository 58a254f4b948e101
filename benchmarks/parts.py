"""What each of the epoch's parts outside the training step costs, old way against new, side by
side on the reference ConvVAE (3.3M parameters, a 40 MB checkpoint):

- validation of `--val-images` test images at the training batch size (64) and at
  data.val_batch_size (1024);
- the checkpoint: written in the training thread (`save_checkpoint`, as before) against the
  training thread's share now (`snapshot` + `CheckpointWriter.submit`; the write overlaps the
  next epoch), and best.pt as a second write against a hard link;
- the gradient norm: one norm per parameter tensor against one `torch._foreach_norm`.

    python benchmarks/parts.py --device cpu
    python benchmarks/parts.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from epoch_time import timed  # beside this file (run as python benchmarks/parts.py)
from hydra import compose, initialize_config_dir

from vae_exp.build import build_experiment
from vae_exp.checkpoint import (
    CheckpointWriter,
    Position,
    checkpoint_state,
    link_or_copy,
    save_checkpoint,
    snapshot,
)
from vae_exp.distributed import Cluster
from vae_exp.steps import grad_norm
from vae_exp.train import validate

CONF = Path(__file__).resolve().parent.parent / "conf"


def seconds(fn, device: torch.device, repeat: int = 3) -> float:
    """The median wall time of `repeat` calls of fn (epoch_time.timed: device synchronised)."""
    return statistics.median(timed(fn, device) for _ in range(repeat))


def per_tensor_norm(model: torch.nn.Module) -> torch.Tensor:
    """The gradient norm as it was computed before: one norm kernel per parameter tensor."""
    norms = [torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda"
    )
    parser.add_argument(
        "--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's IDX files"
    )
    parser.add_argument(
        "--val-images", type=int, default=10_000, help="validation images (and train images)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []

    def experiment(val_batch_size: int):
        overrides = [
            "data=fashion_mnist",
            f"data.root={Path(args.root).resolve()}",
            f"data.limit={args.val_images}",
            f"data.val_batch_size={val_batch_size}",
            f"trainer.device={args.device}",
            "logger=none",
        ]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        return build_experiment(cfg, Cluster(), device)

    small, large = experiment(64), experiment(1024)
    large.model.load_state_dict(small.model.state_dict())
    for exp in (small, large):
        validate(exp)  # warm-up (and the noise, drawn once per run)
    at_64 = seconds(lambda: validate(small), device)
    at_1024 = seconds(lambda: validate(large), device)
    same = validate(small)["loss"], validate(large)["loss"]
    rows.append(
        (
            f"validation, {args.val_images} images",
            f"batch 64: {at_64:.3f} s",
            f"batch 1024: {at_1024:.3f} s ({at_64 / at_1024:.1f}x)",
            f"val loss {same[0]:.6f} vs {same[1]:.6f}",
        )
    )

    exp = small
    x, _ = next(iter(exp.data.train))
    exp.model.train()
    exp.loss_fn(exp.model(x), x)["loss"].backward()
    old = seconds(lambda: [per_tensor_norm(exp.model) for _ in range(100)], device) / 100
    new = seconds(lambda: [grad_norm(exp.model) for _ in range(100)], device) / 100
    agree = float(per_tensor_norm(exp.model)), float(grad_norm(exp.model))
    rows.append(
        (
            f"gradient norm ({len(list(exp.model.parameters()))} tensors)",
            f"per tensor: {old * 1e6:.0f} us",
            f"torch._foreach_norm: {new * 1e6:.0f} us ({old / new:.1f}x)",
            f"norm {agree[0]:.6g} vs {agree[1]:.6g}",
        )
    )

    exp.optimizer.step()  # Adam's state exists: the checkpoint is full size

    state = checkpoint_state(exp, Position(), None, None)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        last, best = Path(tmp) / "last.pt", Path(tmp) / "best.pt"
        writer = CheckpointWriter()

        def hand_off() -> None:
            writer.submit(snapshot(state), last, best)

        def old_way() -> None:
            save_checkpoint(last, state)
            save_checkpoint(best, state)

        old = seconds(old_way, device)
        size = last.stat().st_size / 2**20
        hand_offs = []
        for _ in range(3):  # each with no write in flight before it, as at an epoch's end
            hand_offs.append(seconds(hand_off, device, repeat=1))
            writer.wait()
        new = statistics.median(hand_offs)
        background = seconds(lambda: (hand_off(), writer.wait()), device)
        link = seconds(lambda: link_or_copy(last, best), device)
        rows.append(
            (
                f"checkpoint last.pt + best.pt ({size:.0f} MB each: weights and Adam's state)",
                f"two writes in the training thread: {old:.3f} s",
                f"hand-off (CPU snapshot, thread start): {new:.3f} s ({old / new:.0f}x)",
                f"the writer's own time {background:.3f} s, overlapping training; "
                f"best.pt link {link * 1000:.1f} ms",
            )
        )

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {args.device} ({where}); torch {torch.__version__}")
    print("| part | before | now | check |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
