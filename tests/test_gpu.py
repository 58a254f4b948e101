"""The CUDA paths: the training step captured in a CUDA graph trains the same model as the
eager step (same seed: losses within 2% after an epoch), in fp32 and bf16, with fused Adam,
with torch.compile inside the graph, across a learning rate change (re-capture) and a partial
last batch; replays draw fresh noise. Skipped without CUDA; run on a GPU with
benchmarks/gpu_check.sh. Data: Fashion-MNIST from VAE_EXP_FASHION_DIR (default: Debian's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from vae_exp.data import TensorBatches, load_idx_split, prepare_images
from vae_exp.losses import MSEKLD
from vae_exp.models import ConvVAE
from vae_exp.steps import (
    CapturedStep,
    CompiledTerms,
    eager_step,
    set_capturable,
    terms_function,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FASHION = Path(os.environ.get("VAE_EXP_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.fixture(scope="module")
def images():
    raw, labels = load_idx_split("fashion_mnist", FASHION, "train", download=False)
    n = 10_000 + 37  # a partial last batch
    return prepare_images(raw[:n], 32, 1).cuda(), torch.as_tensor(labels[:n].copy()).cuda()


def one_run(
    images,
    captured: bool,
    precision: str = "fp32",
    epochs: int = 1,
    gamma=None,
    fused: bool | None = None,
    compile: str | None = None,
):
    torch.manual_seed(0)
    model = ConvVAE(1, 32).cuda()
    loss_fn = MSEKLD().to(torch.device("cuda"))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, fused=fused)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma) if gamma else None
    batches = TensorBatches(*images, 64, True, (-1.0, 1.0), torch.Generator().manual_seed(0))
    terms = terms_function(model, loss_fn, precision, False)
    if compile:
        terms = CompiledTerms(terms, compile)
    if captured:
        step = CapturedStep(terms, model, optimizer, 64, required=True)
    else:
        set_capturable(optimizer, False)
        step = eager_step(terms, model, optimizer)
    means = []
    for _ in range(epochs):
        model.train()
        total = torch.zeros((), device="cuda")
        for x, y in batches:
            total += step(x, y)["loss"]
        means.append(total.item() / len(batches))
        if scheduler is not None:
            scheduler.step()
    return means, model, optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_step_trains_the_same_model(images, precision):
    eager, _, _ = one_run(images, captured=False, precision=precision)
    graph, model, optimizer = one_run(images, captured=True, precision=precision)
    assert graph[0] == pytest.approx(eager[0], rel=0.02)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.param_groups[0]["capturable"] is True


def test_captured_step_follows_a_learning_rate_change(images):
    eager, _, _ = one_run(images, captured=False, epochs=2, gamma=0.1)
    graph, _, optimizer = one_run(images, captured=True, epochs=2, gamma=0.1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-6)
    assert graph == pytest.approx(eager, rel=0.02)


def test_capturable_state_loads_into_an_eager_run(images, tmp_path):
    _, model, optimizer = one_run(images, captured=True)
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    fresh = torch.optim.Adam(model.parameters(), lr=5e-4)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    set_capturable(fresh, False)
    terms = terms_function(model, MSEKLD().to(torch.device("cuda")), "fp32", False)
    step = eager_step(terms, model, fresh)
    x = images[0][:64].float() / 127.5 - 1
    assert torch.isfinite(step(x, images[1][:64])["loss"])


@pytest.mark.parametrize(
    "options",
    [{"fused": True}, {"compile": "default"}, {"fused": True, "compile": "default"}],
    ids=["fused-adam", "compile", "fused-adam-compile"],
)
def test_faster_captured_steps_train_the_same_model(images, options):
    """Fused Adam in its capturable form, and torch.compile'd forward + loss, inside vae_exp's
    CUDA graph: the same losses as the plain eager step (within 2%) over two epochs."""
    eager, _, _ = one_run(images, captured=False, epochs=2)
    fast, model, optimizer = one_run(images, captured=True, epochs=2, **options)
    assert fast == pytest.approx(eager, rel=0.02)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.param_groups[0]["capturable"] is True


@pytest.mark.parametrize("compile", [None, "default"], ids=["plain", "compile"])
def test_graph_replays_draw_fresh_noise(images, compile):
    """With lr=0 the weights never change, so a replayed step on one batch differs from the
    last only by its posterior noise: the losses must not repeat."""
    torch.manual_seed(0)
    model = ConvVAE(1, 32).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    terms = terms_function(model, MSEKLD().to(torch.device("cuda")), "fp32", False)
    if compile:
        terms = CompiledTerms(terms, compile)
    step = CapturedStep(terms, model, optimizer, 64, required=True)
    x = images[0][:64].float() / 127.5 - 1
    model.train()
    losses = [step(x, images[1][:64])["recon"].item() for _ in range(8)]  # 3 warm-up, 5 replays
    assert step.graph is not None
    assert len(set(losses[3:])) == 5, losses
    if compile:
        assert terms.works is True  # compiled, not the eager fallback
