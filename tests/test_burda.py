"""Burda et al. 2015's Table 1: the MLP with several hidden layers, the IWAE loss's `elbo` bound,
the staged learning-rate schedule, experiment=burda_vae / burda_iwae (their bad values are in
tests/test_errors.py's table), and benchmarks/burda_table.py end to end on a tiny budget."""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import REPO, SHARED_DATA, cli_env, compose_cfg
from vae_exp.build import build_model, build_optimizer
from vae_exp.likelihood import log_normal_diag, log_px_given_z, log_standard_normal
from vae_exp.losses import IWAELoss
from vae_exp.models import MLPVAE
from vae_exp.schedules import StagedLR

# Burda et al. 2015, Table 1, MNIST, one stochastic layer: test -log p(x) in nats (k = 5000).
PAPER = {"VAE (k=1)": 86.76, "VAE (k=50)": 86.35, "IWAE (k=50)": 84.78}

# --------------------------------------------------------------------------------------------
# The model: MLPVAE with hidden_dims


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    return [
        (m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)
    ]


def test_mlp_with_two_hidden_layers_is_burdas_architecture():
    model = MLPVAE(1, 28, 50, hidden_dim=None, hidden_dims=[200, 200], decoder_output="logits")
    assert linear_shapes(model.encoder) == [(784, 200), (200, 200), (200, 100)]  # mu, log_var
    assert linear_shapes(model.decoder) == [(50, 200), (200, 200), (200, 784)]
    layer_types = [type(m) for m in model.encoder]
    assert layer_types == [torch.nn.Linear, torch.nn.Tanh] * 2 + [torch.nn.Linear]
    assert [type(m) for m in model.decoder] == layer_types  # logits: no output activation
    x = (torch.rand(3, 1, 28, 28) < 0.5).float()
    out = model(x, samples=4)
    assert out.recon.shape == (4, 3, 1, 28, 28) and out.z.shape == (4, 3, 50)
    assert out.mu.shape == out.log_var.shape == (3, 50)


def test_mlp_hidden_dims_are_mirrored_in_the_decoder():
    model = MLPVAE(1, 28, 10, hidden_dim=None, hidden_dims=[300, 100], activation="relu")
    assert linear_shapes(model.encoder) == [(784, 300), (300, 100), (100, 20)]
    assert linear_shapes(model.decoder) == [(10, 100), (100, 300), (300, 784)]
    assert isinstance(model.decoder[-1], torch.nn.Tanh)  # decoder_output="tanh"


def test_one_hidden_layer_keeps_its_parameter_names():
    """Checkpoints of the one-layer model (hidden_dim) load into the same model, however its
    layer is given."""
    old = MLPVAE(1, 28, latent_dim=20, hidden_dim=500)
    names = ["encoder.0", "encoder.2", "decoder.0", "decoder.2"]
    assert list(old.state_dict()) == [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    new = MLPVAE(1, 28, latent_dim=20, hidden_dim=None, hidden_dims=[500])
    new.load_state_dict(old.state_dict())  # strict: same names and shapes
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(new.encode(x).mu, old.encode(x).mu)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_dims": [200, 200]}, "are both set"),
        ({"hidden_dim": None}, "model.hidden_dim=None; allowed: an integer >= 1"),
        ({"hidden_dim": None, "hidden_dims": []}, "model.hidden_dims=[]"),
        ({"hidden_dim": None, "hidden_dims": [200, 0]}, "model.hidden_dims=[200, 0]"),
        ({"hidden_dim": None, "hidden_dims": 200}, "model.hidden_dims=200"),
        ({"hidden_dim": None, "hidden_dims": "200"}, "model.hidden_dims='200'"),
    ],
)
def test_mlp_bad_hidden_layers(kwargs, message):
    with pytest.raises(ValueError) as error:
        MLPVAE(1, 28, **kwargs)
    assert message in str(error.value)


# --------------------------------------------------------------------------------------------
# The loss: bound="elbo" (VAE with k samples) against bound="iwae"


def test_elbo_bound_is_the_mean_log_weight_and_below_the_iwae_bound():
    torch.manual_seed(0)
    model = MLPVAE(1, 28, 4, hidden_dim=None, hidden_dims=[16, 16], decoder_output="logits")
    x = (torch.rand(5, 1, 28, 28) < 0.3).float()
    out = model(x, samples=8)
    log_w = (
        log_px_given_z(out.recon, x, "bernoulli")
        + log_standard_normal(out.z)
        - log_normal_diag(out.z, out.mu, out.log_var)
    )  # [8, 5]
    elbo = IWAELoss(k=8, bound="elbo")(out, x)["loss"]
    iwae = IWAELoss(k=8, bound="iwae")(out, x)["loss"]
    assert torch.allclose(elbo, -log_w.mean(), atol=1e-4)
    assert torch.allclose(iwae, -(torch.logsumexp(log_w, 0) - math.log(8)).mean(), atol=1e-4)
    assert iwae < elbo  # Jensen, image by image
    one = model(x)
    assert torch.equal(IWAELoss(k=1, bound="elbo")(one, x)["loss"], IWAELoss(k=1)(one, x)["loss"])


# --------------------------------------------------------------------------------------------
# The schedule and the experiments


def learning_rates(overrides: list[str]) -> tuple[list[float], int]:
    """The learning rate of every epoch of the composed experiment, and trainer.epochs."""
    cfg = compose_cfg(overrides)
    model = build_model(cfg, instantiate(cfg.loss))
    epochs = cfg.trainer.epochs
    optimizer, scheduler = build_optimizer(cfg, model, epochs)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates, epochs


def stages(rates: list[float]) -> list[tuple[int, float]]:
    """(first epoch, 1-based; rate) of every run of equal rates."""
    return [(i + 1, r) for i, r in enumerate(rates) if i == 0 or r != rates[i - 1]]


def test_burda_schedule_stage_boundaries_and_rates():
    rates, epochs = learning_rates(["experiment=burda_vae"])
    assert epochs == len(rates) == 3280
    found = stages(rates)
    assert [first for first, _ in found] == [1, 2, 5, 14, 41, 122, 365, 1094]  # 3^i passes
    for i, (_, rate) in enumerate(found):
        assert rate == pytest.approx(0.001 * 10 ** (-i / 7), rel=1e-12)


def test_short_schedule_has_the_same_stages_and_sets_the_epochs():
    rates, epochs = learning_rates(["experiment=burda_iwae", "optim/scheduler=burda_short"])
    assert epochs == 124
    found = stages(rates)
    assert [first for first, _ in found] == [1, 2, 3, 4, 5, 8, 17, 44]  # 3^i / 27, at least 1
    for i, (_, rate) in enumerate(found):
        assert rate == pytest.approx(0.001 * 10 ** (-i / 7), rel=1e-12)


def test_schedule_resumes_mid_stage(tmp_path):
    def fresh():
        optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
        return optimizer, StagedLR(optimizer, [1, 3, 9], epochs=13)

    optimizer, scheduler = fresh()
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    torch.save(scheduler.state_dict(), tmp_path / "s.pt")
    optimizer2, scheduler2 = fresh()
    scheduler2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    optimizer.step(), scheduler.step(), optimizer2.step(), scheduler2.step()
    assert (
        optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 1e-3 * 10 ** (-2 / 7)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage_epochs": []}, "stage_epochs=[]; allowed: a non-empty list of integers >= 1"),
        ({"stage_epochs": "1,3"}, "stage_epochs='1,3'"),
        ({"stage_epochs": [1, 2.5], "epochs": 3}, "stage_epochs=[1, 2.5]"),
        ({"epochs": 5}, "optim.scheduler.epochs=5; allowed: the sum of stage_epochs, 4"),
        ({"stages_per_decade": 0}, "stages_per_decade=0; allowed: a number > 0"),
        ({"stages_per_decade": True}, "stages_per_decade=True"),
        ({"stages_per_decade": math.inf}, "stages_per_decade=inf"),
    ],
)
def test_schedule_bad_arguments(kwargs, message):
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    with pytest.raises(ValueError) as error:
        StagedLR(optimizer, **({"stage_epochs": [1, 3], "epochs": 4} | kwargs))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "k", "bound"),
    [
        (["experiment=burda_vae"], 1, "elbo"),
        (["experiment=burda_vae", "loss.k=50"], 50, "elbo"),
        (["experiment=burda_iwae"], 50, "iwae"),
    ],
)
def test_burda_experiments_are_the_papers_settings(overrides, k, bound):
    cfg = compose_cfg(overrides)
    loss_fn = instantiate(cfg.loss)
    assert (loss_fn.samples, loss_fn.bound, loss_fn.likelihood) == (k, bound, "bernoulli")
    model = build_model(cfg, loss_fn)
    assert linear_shapes(model) == [
        (784, 200),
        (200, 200),
        (200, 100),
        (50, 200),
        (200, 200),
        (200, 784),
    ]
    assert sum(isinstance(m, torch.nn.Tanh) for m in model.modules()) == 4
    data = cfg.data
    assert (data.image_size, data.binarize, data.batch_size) == (28, "dynamic", 20)
    optimizer, _ = build_optimizer(cfg, model, 1)
    group = optimizer.param_groups[0]
    assert (type(optimizer), group["lr"], group["betas"], group["eps"]) == (
        torch.optim.Adam,
        1e-3,
        (0.9, 0.999),
        1e-4,
    )
    assert cfg.trainer.checkpoint.save_best is False  # the final model is evaluated


# --------------------------------------------------------------------------------------------
# benchmarks/burda_table.py, end to end


def burda_table(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "burda_table.py"), *args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tiny_table_args(out) -> list[str]:
    # 3 passes of 20 batches of 20 (60 steps a row, 180 in all), evaluated with k = 20 on 400
    # test images, one CPU thread per job (the fastest for this small MLP on a shared CPU)
    return [
        "--schedule=short",
        "--epochs=3",
        "--limit=400",
        "--k=20",
        "--device=cpu",
        "--threads=1",
        f"--out={out}",
        f"--data-root={SHARED_DATA}",
    ]


def test_burda_table_end_to_end(tmp_path, mnist_root):
    out = tmp_path / "burda"
    result = burda_table(tiny_table_args(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for label in PAPER:  # one progress line per LR stage reached: 3 passes = stages 1-3
        for stage in (1, 2, 3):
            assert f"{label}: stage {stage}/8 (pass {stage}, lr" in result.stdout
    rows = json.loads((out / "results.json").read_text())
    assert [r["row"] for r in rows] == list(PAPER)
    for r in rows:
        assert r["paper_nll"] == PAPER[r["row"]]
        numbers = [r[k] for k in ("nll", "neg_elbo", "trained_bound_test", "trained_bound_train")]
        assert all(math.isfinite(v) and v > 0 for v in numbers), r
        assert r["nll"] <= r["neg_elbo"]  # the k-sample estimate is the tighter bound
        assert (r["eval_k"], r["eval_images"], r["epochs"], r["steps"]) == (20, 400, 3, 60)
        assert (r["latent_dim"], r["device"][:3]) == (50, "cpu")
        assert r["nll"] > 100  # 60 steps: far from the paper's numbers, never copied from them
        assert (Path(r["run_dir"]) / "checkpoints" / "last.pt").is_file()
    table = (out / "table.md").read_text()
    assert table in result.stdout
    for r in rows:
        assert (
            f"| {r['row']} | {r['paper_nll']:.2f} | {r['nll']:.2f} | {r['neg_elbo']:.2f} |" in table
        )

    again = burda_table(tiny_table_args(out))  # finished rows are kept, not trained again
    assert again.returncode == 0 and again.stdout.count("already trained and evaluated") == 3
    assert json.loads((out / "results.json").read_text())[0]["nll"] == rows[0]["nll"]
    other = burda_table([*tiny_table_args(out), "--epochs=4"])
    assert other.returncode == 2 and "holds a run made with other settings" in other.stderr


def test_burda_table_stops_cleanly_on_ctrl_c(tmp_path, mnist_root):
    out = tmp_path / "burda"
    args = [*tiny_table_args(out), "--epochs=500"]
    script = [sys.executable, str(REPO / "benchmarks" / "burda_table.py"), *args]
    job = subprocess.Popen(script, env=cli_env(), stdout=subprocess.PIPE, text=True)
    lines = []
    for line in job.stdout:  # wait until the first row has finished a stage (a checkpoint)
        lines.append(line)
        if "stage 1/8" in line:
            break
    job.send_signal(signal.SIGINT)
    lines += job.stdout.readlines()
    assert job.wait(timeout=120) == 130, "".join(lines)
    run_dir = out / "runs" / "vae_k1"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert not (run_dir / "eval.json").exists() and not (out / "table.md").exists()
    assert "Stopped by SIGINT" in (run_dir / "console.log").read_text()
    assert "stopping the running job" in "".join(lines)


def test_iwae_and_mlp_runs_resume_with_the_new_keys():
    """A run of the IWAE loss resumes (its config has no loss.capacity); checkpoints made
    before model.hidden_dims and loss.bound existed match today's defaults, not other values."""
    from omegaconf import OmegaConf

    from vae_exp.checkpoint import config_differences

    def config(overrides):
        return OmegaConf.to_container(compose_cfg(overrides), resolve=True)

    burda = config(["experiment=burda_iwae"])
    assert config_differences(burda, config(["experiment=burda_iwae"])) == []
    old = config(["experiment=kingma_welling", "loss=iwae"])
    del old["model"]["hidden_dims"], old["loss"]["bound"]
    assert config_differences(old, config(["experiment=kingma_welling", "loss=iwae"])) == []
    elbo = config(["experiment=kingma_welling", "loss=iwae", "loss.bound=elbo"])
    assert config_differences(old, elbo) == ["loss.bound: '<absent>' -> 'elbo'"]
