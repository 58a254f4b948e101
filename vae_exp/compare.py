"""Compare the runs of one or more sweeps without W&B.

    python -m vae_exp.compare multirun/<date>/<time>-<id> [more sweep or run dirs] [--sort KEY]

prints one row per run (swept values, state, final and best validation terms, epochs, seconds
per epoch, the test evaluation with its decoder and sigma) and writes comparison.csv,
comparison.md, comparison.png and a self-contained comparison.html into the first sweep
directory (or --out). When the runs' test numbers are not comparable (different decoders or
Gaussian sigma, different k or test images), a note under the table says so.
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

VAL_TERMS = ("val/loss", "val/recon", "val/kld")


@dataclass
class Run:
    """One run directory as the comparison sees it."""

    path: Path
    overrides: dict[str, str]
    epochs_planned: int | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one per epoch
    evaluation: dict[str, Any] = field(default_factory=dict)  # eval.json's numbers, if any
    state: str = "finished"  # finished | incomplete | failed

    @property
    def final(self) -> dict[str, Any]:
        return self.metrics[-1] if self.metrics else {}

    @property
    def best(self) -> dict[str, Any]:
        scored = [m for m in self.metrics if _finite(m.get("val/loss"))]
        return min(scored, key=lambda m: m["val/loss"]) if scored else {}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run directory (one with .hydra/config.yaml) at or below the given paths."""
    dirs: list[Path] = []
    for path in paths:
        found = [path] if (path / ".hydra" / "config.yaml").is_file() else []
        found += sorted(p.parent.parent for p in path.glob("**/.hydra/config.yaml"))
        dirs += [d for d in found if d not in dirs]
    return [read_run(d) for d in dirs]


def read_run(path: Path) -> Run:
    """A run's overrides, planned epochs, metrics and state (a broken run is still a Run)."""
    config = yaml.safe_load((path / ".hydra" / "config.yaml").read_text()) or {}
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    run = Run(
        path=path,
        overrides=dict(o.lstrip("+~").split("=", 1) for o in overrides or [] if "=" in o),
        epochs_planned=(config.get("trainer") or {}).get("epochs"),
    )
    metrics_file = path / "metrics.jsonl"
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                values = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "epoch" in values:
                run.metrics.append(values)
            elif "eval/nll" in values:  # training's final evaluation (older runs: no eval.json)
                run.evaluation = {k.removeprefix("eval/"): v for k, v in values.items()}
    run.evaluation = read_evaluation(path) or run.evaluation
    log_file = path / "vae_exp.log"
    errors = log_file.read_text().splitlines() if log_file.is_file() else []
    # a run stopped by a signal (preempted) is not a failure: incomplete, or finished with no
    # test numbers when the signal came during the final evaluation
    failed = any("[ERROR]" in e and "] - Stopped by SIG" not in e for e in errors)
    if failed or not run.metrics:
        run.state = "failed" if failed else "incomplete"
    elif run.epochs_planned is not None and run.final.get("epoch", 0) < run.epochs_planned:
        run.state = "incomplete"
    return run


def read_evaluation(run_dir: Path) -> dict[str, Any]:
    """The run's eval.json (its most thorough test evaluation), or {} if it has none."""
    try:
        return json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return {}


def swept_keys(runs: list[Run]) -> list[str]:
    """Override keys whose values differ between the runs (the sweep's parameters)."""
    keys = sorted({k for r in runs for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in runs}) > 1]


def rows(runs: list[Run], swept: list[str], root: Path) -> list[dict[str, Any]]:
    """One table row per run."""
    table = []
    for r in runs:
        row: dict[str, Any] = {"run": _relative(r.path, root), "state": r.state}
        row.update({k: r.overrides.get(k, "") for k in swept})
        row["epochs"] = r.final.get("epoch", 0)
        row.update({f"final {t}": r.final.get(t) for t in VAL_TERMS})
        row.update({f"best {t}": r.best.get(t) for t in VAL_TERMS})
        row["best epoch"] = r.best.get("epoch")
        seconds = [m["seconds"] for m in r.metrics if _finite(m.get("seconds"))]
        row["s/epoch"] = sum(seconds) / len(seconds) if seconds else None
        e = r.evaluation
        row["test -ELBO"] = e.get("neg_elbo")
        row["test NLL (IS)"] = e.get("nll")
        row["IS k"] = e.get("k")
        row["test images"] = e.get("images")
        row["decoder"] = e.get("likelihood")
        row["sigma"] = e.get("sigma")
        row["active units"] = e.get("active_units")
        table.append(row)
    return table


TEST_COLUMNS = ("test -ELBO", "test NLL (IS)")


def comparability_notes(runs: list[Run]) -> list[str]:
    """Why the test columns of these runs cannot be compared row against row, if they can't:
    different decoders or Gaussian sigma (a density's nats depend on sigma), or a different
    number of importance samples or test images."""
    evaluated = [r.evaluation for r in runs if r.evaluation]
    decoders = sorted({_decoder(e) for e in evaluated})
    notes = []
    if len(decoders) > 1:
        notes.append(
            f"Test -ELBO and NLL are NOT comparable between these runs: their decoders differ "
            f"({'; '.join(decoders)}). Nats of a Gaussian decoder depend on its sigma (for "
            "mse_kld sigma follows loss.w: sigma^2 = w * pixels / 2) and are not comparable "
            "with Bernoulli nats; compare only rows with the same decoder and sigma."
        )
    settings = sorted({(e.get("k"), e.get("images")) for e in evaluated}, key=str)
    if len(settings) > 1:
        listed = "; ".join(f"k={k}, {n} images" for k, n in settings)
        notes.append(
            f"Test NLL (IS) was estimated with different settings ({listed}): a larger k "
            "gives a tighter (lower) estimate; re-evaluate with the same --k and --limit "
            "(python -m vae_exp.evaluate <run> --k K) to compare."
        )
    return notes


def _decoder(evaluation: dict[str, Any]) -> str:
    sigma = evaluation.get("sigma")
    return str(evaluation.get("likelihood")) + (f" sigma={sigma:.4g}" if _finite(sigma) else "")


def sort_rows(table: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Ascending by `key`; rows without a finite value last."""
    if table and key not in table[0]:
        raise SystemExit(f"--sort {key!r}: allowed: {', '.join(table[0])}")
    return sorted(table, key=lambda r: (not _finite(r[key]), r[key] if _finite(r[key]) else 0))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve())) or "."
    except ValueError:
        return str(path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _headers(table: list[dict[str, Any]], notes: list[str]) -> list[str]:
    """The column titles; the test columns marked with * when a note qualifies them."""
    return [f"{h} *" if notes and h in TEST_COLUMNS else h for h in table[0]]


def markdown(table: list[dict[str, Any]], notes: list[str] = ()) -> str:
    header = _headers(table, notes)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(r[h]) for h in table[0]) + " |" for r in table]
    lines += ["", *(f"* {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def plot(runs: list[Run], swept: list[str], path: Path) -> None:
    """Validation curves of every run, and the best validation loss against each swept
    parameter (log scale for a KL weight `w` or values spanning over two decades)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [k for k in swept if all(_number(r.overrides.get(k)) is not None for r in runs)]
    fig, axes = plt.subplots(1, 1 + len(numeric), figsize=(6 + 4.5 * len(numeric), 4.5))
    axes = list(axes) if numeric else [axes]
    curves = axes[0]
    for r in runs:
        points = [(m["epoch"], m["val/loss"]) for m in r.metrics if _finite(m.get("val/loss"))]
        if points:
            label = ", ".join(f"{k.split('.')[-1]}={r.overrides.get(k)}" for k in swept)
            curves.plot(*zip(*points), marker="o", label=label or r.path.name)
    curves.set(xlabel="epoch", ylabel="validation loss", title="Validation loss per epoch")
    curves.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if any(r.metrics for r in runs):
        curves.legend(fontsize="small")
    for ax, key in zip(axes[1:], numeric):
        points = [(_number(r.overrides[key]), r.best.get("val/loss")) for r in runs]
        points = sorted((x, y) for x, y in points if _finite(y))
        if points:
            ax.scatter(*zip(*points))
        values = [x for x, _ in points if x and x > 0]
        if key.split(".")[-1] == "w" or (values and max(values) / min(values) > 100):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best validation loss", title=f"Best validation loss vs {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _last_picture(run: Run, kind: str) -> Path | None:
    pictures = sorted((run.path / kind).glob("epoch_*.png"))
    return pictures[-1] if pictures else None


SORT_SCRIPT = """
window.addEventListener("load", () => {  // how many pictures decoded (0 means broken images)
  const images = [...document.images];
  document.body.dataset.imagesShown = images.filter(i => i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = images.length;
});
document.querySelectorAll("th").forEach((th, col) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0];
  const up = th.dataset.dir !== "asc"; th.dataset.dir = up ? "asc" : "desc";
  const key = tr => { const t = tr.cells[col].textContent; const n = parseFloat(t);
                      return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (up ? 1 : -1))
    .forEach(tr => body.appendChild(tr));
}));
"""


def write_html(
    table, runs: list[Run], root: Path, plot_png: Path, path: Path, notes: list[str] = ()
) -> None:
    """One self-contained page: the sortable table (and its notes), the plots, each run's
    last grids."""
    header = "".join(f"<th>{html.escape(h)}</th>" for h in _headers(table, notes))
    note_html = "".join(f'<p class="note">* {html.escape(n)}</p>' for n in notes)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(r[h]))}</td>" for h in table[0]) + "</tr>"
        for r in table
    )
    cards = []
    for r in runs:
        images = []
        for kind in ("samples", "reconstructions"):
            picture = _last_picture(r, kind)
            if picture is not None:
                images.append(
                    f'<figure><img src="{_data_uri(picture)}" alt="{kind}">'
                    f"<figcaption>{kind} ({picture.stem})</figcaption></figure>"
                )
        title = html.escape(_relative(r.path, root))
        cards.append(
            f'<section class="run"><h3>{title} ({r.state})</h3>{"".join(images)}</section>'
        )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>vae_exp comparison: {html.escape(str(root))}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }} th, td {{ border: 1px solid #bbb; padding: 3px 8px; }}
th {{ cursor: pointer; background: #eee; }} td {{ text-align: right; }}
.run {{ display: inline-block; vertical-align: top; margin: 0.5em; }}
figure {{ display: inline-block; margin: 0.3em; }} img {{ image-rendering: pixelated; }}
#plots {{ max-width: 100%; image-rendering: auto; }}
.note {{ color: #a00; max-width: 60em; }}
</style></head><body>
<h1>Comparison of {len(runs)} runs</h1><p>{html.escape(str(root))} (click a column to sort)</p>
<table id="runs"><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>{note_html}
<h2>Plots</h2><img id="plots" src="{_data_uri(plot_png)}" alt="validation plots">
<h2>Last grids of each run</h2>{"".join(cards)}
<script>{SORT_SCRIPT}</script></body></html>
"""
    path.write_text(page)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m vae_exp.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--sort", default="best val/loss", help="column to sort by (ascending)")
    parser.add_argument("--out", type=Path, help="where to write the files (default: first path)")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {', '.join(map(str, missing))}")
    runs = find_runs(args.paths)
    if not runs:
        raise SystemExit(f"no run directories (with .hydra/config.yaml) under {args.paths}")
    root = args.paths[0]
    out = args.out or root
    out.mkdir(parents=True, exist_ok=True)
    swept = swept_keys(runs)
    table = sort_rows(rows(runs, swept, root), args.sort)
    notes = comparability_notes(runs)
    write_csv(table, out / "comparison.csv")
    (out / "comparison.md").write_text(markdown(table, notes))
    plot(runs, swept, out / "comparison.png")
    write_html(table, runs, root, out / "comparison.png", out / "comparison.html", notes)
    print(markdown(table, notes))
    print(f"wrote comparison.csv, .md, .png and .html in {out}")
    offline = sorted(p for r in runs for p in r.path.glob("wandb/offline-run-*"))
    if offline:
        print(f"{len(offline)} offline W&B run(s); upload them with:")
        print("  wandb sync " + " ".join(str(p) for p in offline))


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (`| head`): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
