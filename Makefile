# vae_exp: common tasks. `make help` lists them.
PYTHON ?= python
ARGS ?=

.PHONY: help install data train sweep evaluate benchmark results burda test test-all lint format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install:  ## install vae_exp in editable mode with the dev tools (pytest, ruff)
	$(PYTHON) -m pip install -e ".[dev]"

data:  ## install Fashion-MNIST from Debian (root; needed by some tests)
	apt-get update && apt-get install -y dataset-fashion-mnist

train:  ## train the reference experiment (extra overrides: make train ARGS="loss.w=1e-3")
	$(PYTHON) -m vae_exp $(ARGS)

sweep:  ## example sweep: latent_dim x w, 4 jobs under multirun/
	$(PYTHON) -m vae_exp --multirun model.latent_dim=16,32 loss.w=1e-4,1e-3 $(ARGS)

evaluate:  ## evaluate a run on the test split (make evaluate RUN=outputs/<date>/<time>-<id> ARGS="--k 5000")
	$(PYTHON) -m vae_exp.evaluate $(RUN) $(ARGS)

benchmark:  ## seconds per epoch: the original loop vs vae_exp's (ARGS="--device cuda")
	$(PYTHON) benchmarks/epoch_time.py $(ARGS)

results:  ## the README's results table: the model zoo on Fashion-MNIST (CPU, ~25 min)
	bash benchmarks/zoo_fashion_cpu.sh

burda:  ## Burda et al. 2015's Table 1 on MNIST (ARGS="--schedule short --device cuda")
	$(PYTHON) benchmarks/burda_table.py $(ARGS)

test:  ## the default test suite, slow-marked tests excluded (~13 min on 2 CPU cores)
	$(PYTHON) -m pytest

test-all:  ## every test, slow ones included
	$(PYTHON) -m pytest -m ""

lint:  ## ruff lint and format check
	ruff check . && ruff format --check .

format:  ## apply ruff's fixes and formatting
	ruff check --fix . && ruff format .

clean:  ## remove caches, outputs/ and the contents of multirun/ (keeps its README)
	rm -rf .pytest_cache .ruff_cache outputs
	find multirun -mindepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
