"""The final evaluation and `python -m vae_exp.evaluate`: they say what they do, stop cleanly on
a signal (losing nothing), and keep every evaluation."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import wandb_records
from tests.conftest import TINY, cli_env, run_cli
from vae_exp.checkpoint import load_checkpoint
from vae_exp.config import ConfigError, read_eval
from vae_exp.evaluate import AUTO_K, more_thorough, resolve_k

# Minutes of evaluation for the tiny model, checked for signals every 10 samples (< 1 s).
LONG_EVAL = ["eval.k=1000", "eval.chunk=10"]


def start(args: list[str], log: Path, module: str = "vae_exp", env: dict | None = None):
    """`python -m MODULE ARGS` in the background, stdout and stderr into `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(env),
        )


def wait_for(text: str, log: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)


def stop(proc: subprocess.Popen, signals: list[signal.Signals]) -> tuple[int, float]:
    """Send `signals` 0.3 s apart; the exit code and the seconds from the last to exit."""
    for n, sig in enumerate(signals):
        if n:
            time.sleep(0.3)
        proc.send_signal(sig)
        sent = time.time()
    code = proc.wait(timeout=120)
    return code, time.time() - sent


def evaluate_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, module="vae_exp.evaluate")


def eval_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "eval").glob("*.json"))


def eval_lines(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if "eval/nll" in m]


def test_k_auto_and_its_errors():
    assert read_eval({"k": "auto"}).k == "auto" and read_eval({}).k == "auto"
    assert resolve_k("auto", torch.device("cuda")) == AUTO_K["cuda"] == 1000
    assert resolve_k("auto", torch.device("cpu")) == AUTO_K["other"] == 10
    assert resolve_k(7, torch.device("cuda")) == 7
    for bad in ("many", 0, 2.5, True):
        with pytest.raises(ConfigError, match=r"eval\.k=.*allowed: auto .*\| an integer >= 1"):
            read_eval({"k": bad})


def test_the_most_thorough_evaluation_is_eval_json(tmp_path):
    """Test split first, then more images, then more samples; a tie goes to the newer one."""

    def result(k, images, split="test"):
        return {"k": k, "images": images, "split": split}

    assert more_thorough(result(10, 100), tmp_path)  # no eval.json yet
    (tmp_path / "eval.json").write_text(json.dumps(result(1000, 512)))
    assert not more_thorough(result(50, 512), tmp_path)
    assert more_thorough(result(1000, 512), tmp_path)
    assert more_thorough(result(5000, 512), tmp_path)
    assert more_thorough(result(10, 10000), tmp_path)
    assert not more_thorough(result(5000, 10000, "train"), tmp_path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mnist_root):
    """A tiny run with its final evaluation (k=20 on 256 images, in batches of 64 so that the
    first batch's estimate is logged), progress bars on."""
    tmp = tmp_path_factory.mktemp("trained")
    run_dir = tmp / "run"
    args = [
        *TINY,
        "trainer.progress=true",
        "logger=none",
        "eval.batch_size=64",
        f"hydra.run.dir={run_dir}",
    ]
    result = run_cli(args, cwd=tmp)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return run_dir, result.stdout + result.stderr


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained_run[0], copy)
    return copy


def test_final_evaluation_says_what_it_does_and_records_it(trained_run):
    run_dir, output = trained_run
    assert (
        "evaluating the final model (epoch 2) on 256 test images: -ELBO, and -log p(x) with "
        "k=20 importance samples per image, on cpu" in output
    )
    assert "evaluation: the first 64 images took" in output and "for all 256" in output
    assert "Evaluating: 100%" in output  # the bar (trainer.progress=true)
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["k"] == 20 and results["images"] == 256 and results["split"] == "test"
    assert results["device"] == "cpu" and results["seconds"] > 0 and results["epoch"] == 2
    assert results["likelihood"] == "gaussian" and results["sigma"] == pytest.approx(0.35777, 1e-4)
    assert "sigma=0.357771" in results["decoder"]
    assert eval_files(run_dir) == ["test-k20-n256-epoch2.json"]
    kept = json.loads((run_dir / "eval" / "test-k20-n256-epoch2.json").read_text())
    assert kept == results
    [line] = eval_lines(run_dir)
    assert line["eval/nll"] == results["nll"] and line["eval/sigma"] == results["sigma"]


def test_a_cheaper_evaluation_keeps_the_dearer_one(run_copy):
    """`--k 5` after the k=20 final evaluation: kept beside it, eval.json and metrics.jsonl
    untouched, the summary printed once; `--k 40` is more thorough and becomes eval.json."""
    final = json.loads((run_copy / "eval.json").read_text())
    metrics = (run_copy / "metrics.jsonl").read_text()
    cheap = evaluate_cli([str(run_copy), "--k", "5", "--no-progress"], run_copy)
    assert cheap.returncode == 0, cheap.stderr[-3000:]
    assert cheap.stdout.count("-log p(x) (IS, k=5)") == 1 and "-log p(x)" not in cheap.stderr
    assert "eval.json keeps a more thorough evaluation" in cheap.stdout
    assert "Evaluating" not in cheap.stderr  # --no-progress
    assert json.loads((run_copy / "eval.json").read_text()) == final
    assert (run_copy / "metrics.jsonl").read_text() == metrics  # never appended to
    assert eval_files(run_copy) == ["test-k20-n256-epoch2.json", "test-k5-n256-epoch2.json"]
    five = json.loads((run_copy / "eval" / "test-k5-n256-epoch2.json").read_text())
    assert five["k"] == 5 and five["weights"].endswith("best.pt")
    assert five["kl"] == pytest.approx(final["kl"], rel=1e-9)  # analytic: the same weights

    dear = evaluate_cli([str(run_copy), "--k", "40"], run_copy)
    assert dear.returncode == 0, dear.stderr[-3000:]
    assert "Evaluating: 100%" in dear.stderr  # a bar by default
    assert dear.stdout.count("-log p(x) (IS, k=40)") == 1
    assert json.loads((run_copy / "eval.json").read_text())["k"] == 40
    assert len(eval_files(run_copy)) == 3 and (run_copy / "metrics.jsonl").read_text() == metrics


def test_a_signal_during_the_final_evaluation_stops_it_cleanly(mnist_root, tmp_path):
    """SIGTERM while the final evaluation runs: it stops within seconds, exits 143, keeps the
    checkpoints as they were, marks the W&B run preempted and says how to evaluate later."""
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    args = [*TINY, *LONG_EVAL, f"hydra.run.dir={run_dir}"]
    proc = start(args, log, env={"WANDB_MODE": "offline"})
    wait_for("evaluating the final model", log, proc)
    last = (run_dir / "checkpoints" / "last.pt").read_bytes()
    code, seconds = stop(proc, [signal.SIGTERM])
    output = log.read_text()
    assert code == 143, output[-3000:]
    assert seconds < 10, seconds
    assert "Traceback" not in output
    assert "Stopped by SIGTERM during the evaluation" in output
    assert f"Evaluate later with: python -m vae_exp.evaluate {run_dir}" in output
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == last
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 2
    assert not (run_dir / "eval.json").exists() and not eval_lines(run_dir)
    [run_file] = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records.read_records(run_file)
    assert wandb_records.exit_code(records) == 143
    assert "preempting" in [r.WhichOneof("record_type") for r in records]


@pytest.mark.parametrize(
    ("signals", "chunk", "after"),
    [
        ([signal.SIGTERM], "10", "evaluating "),
        ([signal.SIGUSR2], "10", "evaluating "),
        # in the second batch, whose one chunk takes seconds: the second Ctrl-C comes before
        # the first is acted on, and stops it at once
        ([signal.SIGINT, signal.SIGINT], "1000", "evaluation: the first 8 images took"),
    ],
    ids=["SIGTERM", "SIGUSR2", "two Ctrl-C"],
)
def test_a_signal_stops_the_evaluate_tool_cleanly(signals, chunk, after, run_copy):
    log = run_copy.parent / "evaluate.log"
    args = [str(run_copy), "--k", "1000", "--chunk", chunk, "--batch-size", "8"]
    proc = start(args, log, module="vae_exp.evaluate")
    wait_for(after, log, proc)
    files = eval_files(run_copy)
    code, seconds = stop(proc, signals)
    output = log.read_text()
    assert code == 128 + signals[-1], output[-3000:]
    assert seconds < 10, seconds
    assert "Traceback" not in output
    assert f"vae_exp.evaluate: Stopped by {signals[0].name} during the evaluation" in output
    assert eval_files(run_copy) == files  # nothing written
    assert load_checkpoint(run_copy / "checkpoints" / "best.pt")["epoch"] >= 1
