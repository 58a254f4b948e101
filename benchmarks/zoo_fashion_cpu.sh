#!/usr/bin/env bash
# The README's results table: the model zoo on Fashion-MNIST (60,000 train / 10,000 test,
# Debian's dataset-fashion-mnist), on a CPU with a short budget (30 epochs: 18,000 steps of
# batch 100; the cyclical schedule makes 4 cycles), then the table.
#   bash benchmarks/zoo_fashion_cpu.sh [out dir, default results/fashion_cpu]
set -eu
OUT=${1:-results/fashion_cpu}
COMMON="data=fashion_mnist logger=none trainer.progress=false"
KW="experiment=kingma_welling $COMMON trainer.epochs=30 eval.k=1000"
run() { name=$1; shift; echo "== $name: python -m vae_exp $*"; python -m vae_exp "$@" hydra.run.dir="$OUT/$name" 2>&1 | grep -E "evaluate|Error" || true; echo "$*" > "$OUT/$name/command.txt"; }
mkdir -p "$OUT"
run vae_mlp $KW
run iwae_k5_mlp $KW loss=iwae loss.k=5
run beta4_mlp $KW loss=beta_vae
run cyclical_freebits_mlp $KW loss/kl_schedule=cyclical loss.kl_schedule.cycle_steps=4500 loss.free_bits=0.25
run reference_conv_1epoch $COMMON trainer.epochs=1 trainer.precision=bf16 trainer.channels_last=true eval.k=100 eval.limit=1000
python benchmarks/results_table.py "$OUT"/*/
