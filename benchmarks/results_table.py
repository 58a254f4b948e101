"""A markdown table of the final evaluations (eval.json) of run directories, with the command
that made each (command.txt, written by benchmarks/zoo_fashion_cpu.sh).

    python benchmarks/results_table.py results/fashion_cpu/*/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    print(
        "| run | test −ELBO (nats) | test −log p(x), IS | KL | active units | MSE | "
        "train s/epoch | command |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in map(Path, paths):
        r = json.loads((path / "eval.json").read_text())
        epochs = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        seconds = [m["seconds"] for m in epochs if "seconds" in m]
        command = (
            (path / "command.txt").read_text().strip() if (path / "command.txt").is_file() else ""
        )
        print(
            f"| {path.name} ({r['likelihood']}) | {r['neg_elbo']:.2f} | "
            f"{r['nll']:.2f} (k={r['k']}, {r['images']} images) | {r['kl']:.2f} | "
            f"{r['active_units']}/{r['latent_dim']} | "
            f"{r['mse']:.4f} | {sum(seconds) / len(seconds):.1f} | `python -m vae_exp {command}` |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
