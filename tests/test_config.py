"""Every option of every config group composes with Hydra and builds."""

import os
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF, cli_env, compose_cfg
from vae_exp.build import build_model, build_optimizer
from vae_exp.config import (
    ConfigError,
    check_optimizer,
    check_top_level_keys,
    read_data,
    read_eval,
    read_logger,
    read_trainer,
)

GROUPS = ["model", "data", "optim", "loss", "trainer", "logger"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_its_options():
    assert options("model") == ["conditional_conv_vae", "conv_vae", "mlp_vae"]
    assert options("data") == ["cifar10", "fashion_mnist", "folder", "mnist"]
    assert options("optim") == ["adam", "adamw", "sgd"]
    assert options("loss") == ["bce_kld", "beta_vae", "beta_vae_capacity", "iwae", "mse_kld"]
    assert options("loss/kl_schedule") == ["constant", "cyclical", "linear"]
    assert options("experiment") == ["burda_iwae", "burda_vae", "kingma_welling"]
    assert options("logger") == ["none", "wandb"]
    assert sorted(p.stem for p in (CONF / "optim" / "scheduler").glob("*.yaml")) == [
        "burda",
        "burda_short",
        "cosine",
        "step",
    ]


CASES = [(g, o) for g in GROUPS for o in options(g)] + [
    ("optim/scheduler", "cosine"),
    ("optim/scheduler", "step"),
    ("optim/scheduler", "burda"),
    ("optim/scheduler", "burda_short"),
    ("launcher", "joblib"),
    ("launcher", "submitit_local"),
    ("launcher", "slurm"),
    ("hparams_search", "optuna"),
    ("loss/kl_schedule", "linear"),
    ("loss/kl_schedule", "cyclical"),
    ("experiment", "kingma_welling"),
    ("experiment", "burda_vae"),
    ("experiment", "burda_iwae"),
]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_builds(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "folder":
        overrides.append(f"data.root={tmp_path}")
    cfg = compose_cfg(overrides)
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert OmegaConf.missing_keys(cfg) == set()
    data = read_data(cfg.data)
    read_trainer(cfg.trainer)
    read_logger(cfg.logger)
    loss_fn = instantiate(cfg.loss)
    model = build_model(cfg, loss_fn)
    optimizer, scheduler = build_optimizer(cfg, model, epochs=3)
    x = torch.zeros(2, data.channels, data.image_size, data.image_size)
    y = torch.zeros(2, dtype=torch.long) if model.num_classes else None  # conditional models
    out = model(x, y, samples=loss_fn.samples)
    assert out.recon.shape == (x.shape if loss_fn.samples == 1 else (loss_fn.samples, *x.shape))
    assert {"loss", "recon", "kld", "weighted_kld", "kl_weight"} <= set(loss_fn(out, x))
    assert (scheduler is not None) == (group == "optim/scheduler" or option.startswith("burda"))
    requeued = group == "launcher" and option != "joblib"  # submitit requeues preempted jobs
    assert (cfg.trainer.resume == "auto") == requeued
    assert optimizer.param_groups[0]["lr"] > 0


def test_overrides_change_just_those_keys():
    base = OmegaConf.to_container(compose_cfg(), resolve=True)
    changed = OmegaConf.to_container(
        compose_cfg(["model.latent_dim=64", "loss.w=1e-3"]), resolve=True
    )
    assert changed["model"]["latent_dim"] == 64 and changed["loss"]["w"] == 1e-3
    changed["model"]["latent_dim"], changed["loss"]["w"] = 128, 0.00025
    assert changed == base


def test_model_follows_the_data_config():
    cfg = compose_cfg(["data=cifar10"])
    assert cfg.model.in_channels == 3 and cfg.model.image_size == 32
    cfg = compose_cfg(["data.image_size=64"])
    assert cfg.model.image_size == 64


def test_bce_loss_gets_a_logit_decoder_and_unit_range():
    cfg = compose_cfg(["loss=bce_kld"])
    loss_fn = instantiate(cfg.loss)
    model = build_model(cfg, loss_fn)
    assert model.decoder_output == "logits" and loss_fn.pixel_range == (0.0, 1.0)
    assert not isinstance(model.decoder[-1], torch.nn.Tanh)


@pytest.mark.parametrize(
    ("section", "override", "message"),
    [
        ("data", "+data.colour=red", "unknown key data.colour"),
        ("data", "data.channels=2", "data.channels=2"),
        ("data", "data.train_split=val", "data.train_split='val'"),
        ("data", "data.limit=0", "data.limit=0"),
        ("trainer", "trainer.epochs=0", "trainer.epochs=0"),
        ("trainer", "trainer.device=gpu", "trainer.device='gpu'"),
        ("trainer", "+trainer.checkpoint.every=3", "unknown key trainer.checkpoint.every"),
        ("logger", "logger.mode=sometimes", "logger.mode='sometimes'"),
        ("logger", "logger.init_timeout=inf", "logger.init_timeout=inf"),
        ("trainer", "trainer.seed=-1", "trainer.seed=-1"),
        ("trainer", f"trainer.seed={2**63}", f"trainer.seed={2**63}"),
        ("eval", "eval.seed=99999999999999999999", "eval.seed=99999999999999999999"),
        ("eval", "eval.sigma=nan", "eval.sigma=nan"),
    ],
)
def test_bad_values_name_the_key(section, override, message):
    cfg = compose_cfg([override])
    readers = {"data": read_data, "trainer": read_trainer, "logger": read_logger}
    reader = {**readers, "eval": read_eval}[section]
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace(".", r"\.")):
        reader(cfg[section])


def test_folder_cannot_download(tmp_path: Path):
    cfg = compose_cfg(["data=folder", f"data.root={tmp_path}", "data.download=true"])
    with pytest.raises(ConfigError, match="data.download"):
        read_data(cfg.data)


def test_seeds_span_torchs_range():
    for seed in (0, 2**63 - 1):
        trainer = read_trainer(compose_cfg([f"trainer.seed={seed}"]).trainer)
        torch.manual_seed(trainer.seed + 10**6)  # + steps: still a seed torch accepts
        assert read_eval(compose_cfg([f"eval.seed={seed}"]).eval).seed == seed


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "true"])
@pytest.mark.parametrize("key", ["lr", "weight_decay"])
def test_optimizer_numbers_must_be_finite(key, value):
    cfg = compose_cfg([f"optim.optimizer.{key}={value}"])
    with pytest.raises(ConfigError, match=rf"optim\.optimizer\.{key}=.*finite number"):
        check_optimizer(cfg.optim)


def test_folder_val_fraction_must_be_finite(tmp_path: Path):
    cfg = compose_cfg(["data=folder", f"data.root={tmp_path}", "data.val_fraction=nan"])
    with pytest.raises(ConfigError, match="data.val_fraction=nan"):
        read_data(cfg.data)


def test_unknown_top_level_key_names_it_and_the_keys():
    check_top_level_keys(compose_cfg())  # the default config passes
    with pytest.raises(ConfigError, match="top-level key lr .*optim.optimizer.lr.* logger, eval"):
        check_top_level_keys(compose_cfg(["+lr=0.1"]))
    with pytest.raises(ConfigError, match=r"top-level key colour; the top-level keys are model"):
        check_top_level_keys(compose_cfg(["+colour=red"]))


def test_tab_completion_of_the_console_script(tmp_path: Path):
    # What bash does: install the completion, then Tab after `vae_exp model.lat`.
    scripts = sysconfig.get_path("scripts")
    if not (Path(scripts) / "vae_exp").is_file():
        pytest.fail(f"no vae_exp console script in {scripts}: pip install -e .")
    tab = (
        'eval "$(vae_exp -sc install=bash)"; COMP_LINE="vae_exp model.lat"; '
        "COMP_POINT=${#COMP_LINE}; COMP_WORDS=($COMP_LINE); COMP_CWORD=1; "
        'hydra_bash_completion; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    result = subprocess.run(
        ["bash", "-c", tab],
        cwd=tmp_path,
        env=cli_env({"PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}"}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == ["model.latent_dim="], result.stdout + result.stderr
