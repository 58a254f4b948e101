"""Burda, Grosse & Salakhutdinov 2015 (arXiv:1509.00519), Table 1, one stochastic layer on
dynamically binarized MNIST: trains the rows VAE (k=1), VAE (k=50) and IWAE (k=50) through
vae_exp's command line (`python -m vae_exp experiment=burda_vae|burda_iwae ...`, one run
directory each), evaluates each final model with k importance samples per test image (5000,
as the paper), and writes a markdown table of ours beside the paper's numbers.

    python benchmarks/burda_table.py                         # the paper's 3,280 passes
    python benchmarks/burda_table.py --schedule short        # the same 8 stages in 124 passes
    python benchmarks/burda_table.py --epochs 3 --limit 400 --k 20   # a pipeline check
    python benchmarks/burda_table.py --device cuda -- trainer.cuda_graph=false logger=wandb

Arguments after `--` are vae_exp overrides for every run. Runs go to OUT/runs/<row>/, the
table to OUT/table.md (and OUT/results.json); one line per stage of the LR schedule shows
progress. Ctrl-C stops the running job at its next step with a checkpoint; the same command
run again keeps the finished rows and resumes the interrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = REPO.parent / "shared" / "data"  # this project's offline copy of MNIST
SCHEDULES = {"full": "burda", "short": "burda_short"}  # --schedule -> optim/scheduler=...


@dataclass(frozen=True)
class Row:
    name: str  # the run directory's name
    label: str  # as in the paper's table
    overrides: tuple[str, ...]
    paper_nll: float  # Burda et al.'s test -log p(x), nats (k = 5000), Table 1, MNIST, 1 layer


ROWS = (
    Row("vae_k1", "VAE (k=1)", ("experiment=burda_vae", "loss.k=1"), 86.76),
    Row("vae_k50", "VAE (k=50)", ("experiment=burda_vae", "loss.k=50"), 86.35),
    Row("iwae_k50", "IWAE (k=50)", ("experiment=burda_iwae", "loss.k=50"), 84.78),
)


class Interrupted(Exception):
    """Ctrl-C or SIGTERM: the running job was asked to stop with a checkpoint."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/burda_table.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), default="full")
    parser.add_argument(
        "--epochs", type=int, help="train only the schedule's first N passes (a small budget)"
    )
    parser.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    parser.add_argument("--limit", type=int, help="first N images of each split (default: all)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "burda")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=SHARED_MNIST if (SHARED_MNIST / "MNIST" / "raw").is_dir() else REPO / "data",
        help="where MNIST is (data.root); default ../shared/data if it has MNIST, else ./data",
    )
    parser.add_argument("--threads", type=int, help="CPU threads per job (OMP_NUM_THREADS)")
    parser.add_argument("overrides", nargs="*", help="vae_exp overrides for every run")
    args = parser.parse_args(argv)
    for name in ("epochs", "k", "limit", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value}; allowed: an integer >= 1")
    return args


# --------------------------------------------------------------------------------------------
# One row: its command, its state on disk, its training (watched) and its evaluation


def train_overrides(row: Row, args: argparse.Namespace) -> list[str]:
    """What defines the row's training run (a rerun with the same list resumes it)."""
    overrides = [*row.overrides, f"optim/scheduler={SCHEDULES[args.schedule]}"]
    if args.epochs is not None:
        overrides.append(f"trainer.epochs={args.epochs}")
    overrides += [f"data.root={args.data_root.resolve()}", "data.download=false"]
    if args.limit is not None:
        overrides.append(f"data.limit={args.limit}")
    return [*overrides, *args.overrides]


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """This checkout first on the path, so the jobs run this code; OMP_NUM_THREADS if asked."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return env


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line being written
    return lines


def epochs_done(run_dir: Path) -> list[dict]:
    return [m for m in read_jsonl(run_dir / "metrics.jsonl") if "val/loss" in m]


def planned_epochs(run_dir: Path) -> tuple[int, list[int]]:
    """trainer.epochs and the epochs that end the LR schedule's stages, from the run's
    composed config (.hydra/config.yaml, written when the job starts)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    ends, total = [], 0
    for n in cfg.optim.scheduler.stage_epochs:
        total += n
        ends.append(total)
    return int(OmegaConf.select(cfg, "trainer.epochs")), ends


def clock(seconds: float) -> str:
    """12.3 s, or 1:02:03 from a minute on."""
    return f"{seconds:.1f} s" if seconds < 60 else str(datetime.timedelta(seconds=round(seconds)))


def stage_line(row: Row, m: dict, epochs: int, ends: list[int], start: float) -> str:
    """One progress line for the epoch `m` that ends a stage (or the run)."""
    stage = next((i for i, end in enumerate(ends) if m["epoch"] <= end), len(ends) - 1)
    first, last = (ends[stage - 1] + 1 if stage else 1), min(m["epoch"], ends[stage])
    passes = f"pass {last}" if first == last else f"passes {first}-{last}"
    return (
        f"  {row.label}: stage {stage + 1}/{len(ends)} ({passes}, lr {m['lr']:.2e})"
        f" done at pass {m['epoch']}/{epochs}, step {m['step']}: -bound train "
        f"{m['train/loss']:.2f}, test {m['val/loss']:.2f} nats  [{clock(time.time() - start)}]"
    )


def run_watched(command: list[str], row: Row, run_dir: Path, args, watch: bool) -> None:
    """Run one vae_exp job in its own process group (so a Ctrl-C here reaches it once, from
    us), its output into run_dir/console.log; print one line per finished LR stage."""
    log_path = run_dir / "console.log"
    start, shown = time.time(), len(epochs_done(run_dir))
    with log_path.open("a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        job = subprocess.Popen(
            command,
            cwd=REPO,
            env=child_env(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while job.poll() is None:
                time.sleep(0.5)
                if watch:
                    shown = report_stages(row, run_dir, shown, start)
        except KeyboardInterrupt:
            stop_job(job)
            raise Interrupted from None
    if watch:
        report_stages(row, run_dir, shown, start)
    if job.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        print("\n".join(["", *tail, ""]), file=sys.stderr)
        sys.exit(
            f"burda_table: {row.label} failed (exit {job.returncode}); its output is in {log_path}"
        )


def report_stages(row: Row, run_dir: Path, shown: int, start: float) -> int:
    done = epochs_done(run_dir)
    if len(done) <= shown or not (run_dir / ".hydra" / "config.yaml").is_file():
        return shown
    epochs, ends = planned_epochs(run_dir)
    for m in done[shown:]:
        if m["epoch"] in ends or m["epoch"] == epochs:
            print(stage_line(row, m, epochs, ends, start), flush=True)
        if m["epoch"] == epochs:
            print(f"  {row.label}: evaluating the final model ...", flush=True)
    return len(done)


def stop_job(job: subprocess.Popen) -> None:
    """Ask the job to stop (SIGINT: it finishes the step and writes checkpoints/last.pt) and
    wait for it; a second Ctrl-C here makes it stop at once."""
    print("\nburda_table: stopping the running job (it saves a checkpoint) ...", flush=True)
    job.send_signal(signal.SIGINT)
    while True:
        try:
            job.wait()
            return
        except KeyboardInterrupt:
            job.send_signal(signal.SIGINT)


def run_row(row: Row, args: argparse.Namespace) -> Path:
    """Train (or resume) and evaluate one row, unless its run directory already holds it."""
    run_dir = (args.out / "runs" / row.name).resolve()
    training = train_overrides(row, args)
    claim_run_dir(run_dir, training)
    results = run_dir / "eval.json"
    if results.is_file() and json.loads(results.read_text())["k"] == args.k:
        print(f"{row.label}: already trained and evaluated in {run_dir}", flush=True)
    elif finished_training(run_dir):
        print(f"{row.label}: trained; evaluating with k={args.k} ...", flush=True)
        command = [sys.executable, "-m", "vae_exp.evaluate", str(run_dir), "--k", str(args.k)]
        run_watched([*command, "--device", args.device], row, run_dir, args, watch=False)
    else:
        command = [sys.executable, "-m", "vae_exp", *training, f"eval.k={args.k}"]
        command += [f"trainer.device={args.device}", "trainer.progress=false"]
        if not any(o.startswith("logger") for o in args.overrides):
            command.append("logger=none")
        command.append(f"hydra.run.dir={run_dir}")
        resuming = (run_dir / "checkpoints" / "last.pt").is_file()
        if resuming:
            command.append(f"trainer.resume={run_dir}")
        print(
            f"{row.label}: {'resuming' if resuming else 'training'} in {run_dir}\n"
            f"  python -m vae_exp {' '.join(command[3:])}",
            flush=True,
        )
        run_watched(command, row, run_dir, args, watch=True)
    return run_dir


def claim_run_dir(run_dir: Path, training: list[str]) -> None:
    """Record the row's training overrides in run_dir/row.json; a run directory made with
    other overrides is an error (its checkpoint cannot be resumed with these)."""
    state_path = run_dir / "row.json"
    if state_path.is_file():
        saved = json.loads(state_path.read_text())["train"]
        if saved != training:
            print(
                f"burda_table: {run_dir} holds a run made with other settings ({' '.join(saved)})"
                "; allowed: the same settings (to resume it), or another --out.",
                file=sys.stderr,
            )
            sys.exit(2)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"train": training}, indent=2) + "\n")


def finished_training(run_dir: Path) -> bool:
    done = epochs_done(run_dir)
    if not done or not (run_dir / ".hydra" / "config.yaml").is_file():
        return False
    return done[-1]["epoch"] >= planned_epochs(run_dir)[0]


# --------------------------------------------------------------------------------------------
# The table


def row_result(row: Row, run_dir: Path, threads: int | None) -> dict:
    """The row's numbers, all read from its run directory (eval.json, metrics.jsonl)."""
    r = json.loads((run_dir / "eval.json").read_text())
    done = epochs_done(run_dir)
    last = done[-1]
    return {
        "row": row.label,
        "run_dir": str(run_dir),
        "paper_nll": row.paper_nll,
        "nll": r["nll"],
        "neg_elbo": r["neg_elbo"],
        "kl": r["kl"],
        "trained_bound_test": last["val/loss"],
        "trained_bound_train": last["train/loss"],
        "active_units": r["active_units"],
        "latent_dim": r["latent_dim"],
        "eval_k": r["k"],
        "eval_images": r["images"],
        "epochs": last["epoch"],
        "steps": last["step"],
        "train_seconds": sum(m["seconds"] for m in done),
        "eval_seconds": r["seconds"],
        "device": describe_device(r["device"], threads),
    }


def describe_device(device: str, threads: int | None) -> str:
    """The device in words: the GPU's name, or the CPU model and its thread count."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return f"{device} ({torch.cuda.get_device_name(index)})"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else model
    n = threads or os.environ.get("OMP_NUM_THREADS")
    per_job = f", {n} thread{'' if str(n) == '1' else 's'} per job" if n else ""
    return f"cpu ({model}, {os.cpu_count()} cores{per_job})"


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    """The table of ours beside the paper's, with what budget made ours."""
    r0 = results[0]
    images = f"{r0['eval_images']:,} test images"
    lines = [
        "# Burda et al. 2015, Table 1: MNIST, one stochastic layer (test −log p(x), nats)",
        "",
        f"Ours: `python benchmarks/burda_table.py {' '.join(args.argv)}`".rstrip(),
        f"({datetime.date.today()}; schedule `{args.schedule}`"
        + (f", first {args.epochs} passes only" if args.epochs else "")
        + (f"; first {args.limit:,} images of each split" if args.limit else "")
        + f"; −log p(x) importance-sampled with k = {r0['eval_k']} on {images}; "
        f"device {r0['device']}). The paper: k = 5000 on all 10,000 test images after "
        "3,280 passes over 59,600 training images.",
        "",
        "| model | paper −log p(x) | ours −log p(x) | ours −ELBO | ours trained bound "
        "(test / train) | active units | passes (steps) | train time | eval time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['row']} | {r['paper_nll']:.2f} | {r['nll']:.2f} | {r['neg_elbo']:.2f} | "
            f"{r['trained_bound_test']:.2f} / {r['trained_bound_train']:.2f} | "
            f"{r['active_units']}/{r['latent_dim']} | {r['epochs']:,} ({r['steps']:,}) | "
            f"{clock(r['train_seconds'])} | {clock(r['eval_seconds'])} |"
        )
    lines += [
        "",
        "−ELBO: one posterior sample per test image. Trained bound: the row's own training "
        "objective (−ELBO with k samples for VAE rows, −IWAE bound for IWAE) after the last "
        "pass, on the test split (one fixed binarization) and the epoch's training batches.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # for the table's note
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as Ctrl-C does
    start = time.time()
    try:
        run_dirs = [run_row(row, args) for row in ROWS]
    except (Interrupted, KeyboardInterrupt):
        print(
            "burda_table: stopped. Run the same command again to resume (finished rows are "
            f"kept in {args.out / 'runs'}).",
            file=sys.stderr,
        )
        return 130
    results = [row_result(row, d, args.threads) for row, d in zip(ROWS, run_dirs)]
    bad = [r["row"] for r in results if not all(math.isfinite(r[k]) for k in ("nll", "neg_elbo"))]
    table = markdown(results, args)
    (args.out / "table.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{table}\nwrote {args.out / 'table.md'} and results.json ({clock(time.time() - start)})"
    )
    if bad:
        print(f"burda_table: non-finite numbers for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
