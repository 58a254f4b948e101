"""`python -m vae_exp.compare` on a real (small) sweep."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


@pytest.fixture
def sweep(sweep_2x2, tmp_path):
    """A copy of the shared 2x2 sweep, so each test writes its own comparison files."""
    copy = tmp_path / "sweep"
    shutil.copytree(sweep_2x2, copy)
    return copy


def compare(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "vae_exp.compare", *args],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_compare_a_sweep(sweep):
    result = compare(str(sweep), "--sort", "final val/loss")
    assert result.returncode == 0, result.stderr
    with open(sweep / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    assert {(r["model.latent_dim"], r["loss.w"]) for r in table} == {
        ("4", "0.0001"),
        ("4", "0.001"),
        ("8", "0.0001"),
        ("8", "0.001"),
    }
    for row in table:
        lines = [json.loads(line) for line in (sweep / row["run"] / "metrics.jsonl").open()]
        metrics = [m for m in lines if "epoch" in m]
        [evaluation] = [m for m in lines if "eval/nll" in m]  # the final evaluation's line
        assert float(row["test NLL (IS)"]) == pytest.approx(evaluation["eval/nll"])
        assert float(row["sigma"]) == pytest.approx(evaluation["eval/sigma"])
        assert row["decoder"] == "gaussian" and row["IS k"] == "20"
        assert float(row["final val/loss"]) == pytest.approx(metrics[-1]["val/loss"])
        assert float(row["best val/loss"]) == pytest.approx(min(m["val/loss"] for m in metrics))
        assert float(row["final val/kld"]) == pytest.approx(metrics[-1]["val/kld"])
        assert row["state"] == "finished" and row["epochs"] == "2"
        assert float(row["s/epoch"]) == pytest.approx(np.mean([m["seconds"] for m in metrics]))
    losses = [float(r["final val/loss"]) for r in table]
    assert losses == sorted(losses)
    assert "wandb sync" in result.stdout and result.stdout.count("offline-run-") == 4
    md = (sweep / "comparison.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and rows[0].startswith("| run | state |")  # a header and 4 runs
    png = np.asarray(Image.open(sweep / "comparison.png").convert("L"), dtype=float)
    assert png.shape[1] > 1000 and png.std() > 10  # three panels with curves and points
    page = (sweep / "comparison.html").read_text()
    assert page.count("<tr>") == 5 and page.count("data:image/png;base64,") == 1 + 4 * 2
    assert "http://" not in page and "https://" not in page  # self-contained


def test_runs_with_different_decoders_are_flagged(sweep):
    """mse_kld with w = 1e-4 and 1e-3: Gaussian decoders with sigma = sqrt(w * 1024 / 2), whose
    nats are not comparable: the sigma column shows it and a note under the table says so,
    in the printout, comparison.md and comparison.html; runs of one sigma get no note."""
    result = compare(str(sweep))
    assert result.returncode == 0, result.stderr
    with open(sweep / "comparison.csv") as f:
        table = list(csv.DictReader(f))
    for row in table:
        w = float(row["loss.w"])
        assert float(row["sigma"]) == pytest.approx((w * 1024 / 2) ** 0.5, rel=1e-6)
    note = "Test -ELBO and NLL are NOT comparable between these runs"
    assert "gaussian sigma=0.2263; gaussian sigma=0.7155" in result.stdout
    assert note in result.stdout and note in (sweep / "comparison.md").read_text()
    assert "| test -ELBO * | test NLL (IS) * |" in result.stdout
    page = (sweep / "comparison.html").read_text()
    assert f'<p class="note">* {note}' in page and "<th>test -ELBO *</th>" in page

    same_sigma = [sweep / r["run"] for r in table if r["loss.w"] == "0.001"]
    out = sweep / "same_sigma"
    result = compare(*map(str, same_sigma), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "NOT comparable" not in result.stdout and "test -ELBO *" not in result.stdout
    assert 'class="note"' not in (out / "comparison.html").read_text()


def test_broken_and_unfinished_runs_are_listed(sweep):
    copy = sweep
    (copy / "1" / "metrics.jsonl").write_text("")  # no epoch finished
    lines = (copy / "2" / "metrics.jsonl").read_text().splitlines()
    (copy / "2" / "metrics.jsonl").write_text(lines[0] + "\n")  # 1 of 2 epochs
    with open(copy / "3" / "vae_exp.log", "a") as f:
        f.write("[2026-01-01 00:00:00,000][vae_exp][ERROR] - Non-finite loss\n")
    with open(copy / "0" / "vae_exp.log", "a") as f:  # preempted in its final evaluation
        f.write("[2026-01-01 00:00:00,000][vae_exp][ERROR] - Stopped by SIGTERM during the ...\n")
    result = compare(str(copy))
    assert result.returncode == 0, result.stderr
    with open(copy / "comparison.csv") as f:
        states = {r["run"]: r["state"] for r in csv.DictReader(f)}
    assert states == {"0": "finished", "1": "incomplete", "2": "incomplete", "3": "failed"}


def test_bad_arguments(tmp_path):
    result = compare(str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "not a directory" in result.stderr
    result = compare(str(tmp_path))
    assert result.returncode != 0 and "no run directories" in result.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here")
def test_html_report_renders_in_headless_chromium(sweep, tmp_path):
    assert CHROMIUM, "CI installs Debian's chromium for this test"
    if not (sweep / "comparison.html").is_file():
        assert compare(str(sweep)).returncode == 0
    url = (sweep / "comparison.html").as_uri()
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert page.count("<tr>") == 5 and 'id="runs"' in page
    assert 'data-images-shown="9"' in page and 'data-images-total="9"' in page  # all decoded
    shot = tmp_path / "page.png"
    result = subprocess.run(
        [*base, "--window-size=1400,1200", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 20  # text, a table and pictures: not a blank page
