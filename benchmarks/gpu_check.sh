#!/usr/bin/env bash
# Every GPU check of the speed work (issue 13) in one call of the device tool, under 8
# minutes on one H100: tests/test_gpu.py, then each benchmark row, most important first; a row
# that would not fit in what is left of the budget is skipped (and says so). Prints one
# table at the end (and writes it, with the full log, to $OUT when the device tool sets it).
# Prepare once on the dev machine (ignored folders, carried with the call):
#   mkdir -p .whl .gpu_data && cp ../shared/wheels/py312/*.whl .whl/
#   cp /usr/share/datasets/fashion-mnist/*.gz .gpu_data/
# then run `bash benchmarks/gpu_check.sh` with carry [".whl", ".gpu_data"] and timeout_s 600.
set -u
BUDGET=${BUDGET:-470}   # seconds for everything after the install
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
TABLE=$OUT/gpu_table.md
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD VAE_EXP_FASHION_DIR=$PWD/.gpu_data
start=$(date +%s)
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
} | tee "$LOG"
left() { echo $((BUDGET - ($(date +%s) - start))); }

echo "| check | command | result |" >"$TABLE"
echo "|---|---|---|" >>"$TABLE"

# row NAME LIMIT COMMAND...: run COMMAND (at most LIMIT s) if it fits; table rows from its output
row() {
  local name=$1 limit=$2; shift 2
  if [ "$(left)" -lt "$limit" ]; then
    echo "| $name | \`$*\` | skipped: $(left) s of the budget left, needs up to $limit s |" >>"$TABLE"
    return
  fi
  echo "== $name: $*" | tee -a "$LOG"
  local t0=$(date +%s) out
  out=$(timeout "$limit" "$@" 2>&1); local rc=$?
  echo "$out" >>"$LOG"
  local pattern='^\| (the original|vae_exp|`python|validation|checkpoint|gradient)'
  echo "$out" | grep -E "$pattern|^speed-up|^peak|^device" | sed 's/^/    /'
  # "| loop | s/epoch | images/s | epochs | notes |" -> "loop: s/epoch (epochs); notes", rows joined
  local rows
  rows=$(echo "$out" | grep -E "$pattern" | awk -F' [|] ' '{sub(/^[|] /, "", $1); sub(/ [|]$/, "", $NF);
    if ($1 ~ /^(validation|checkpoint|gradient)/) printf "%s: %s -> %s (%s). ", $1, $2, $3, $4;
    else printf "%s: **%s s/epoch** (%s); %s. ", $1, $2, $4, $5}')
  local extra
  extra=$(echo "$out" | grep -E '^speed-up|^peak' | tr '\n' ' ')
  if [ $rc -ne 0 ]; then
    rows="FAILED (exit $rc after $(( $(date +%s) - t0 )) s): $(echo "$out" | grep -v '^\s*$' | tail -2 | tr '\n' ' ' | cut -c1-400)"
  fi
  echo "| $name | \`$*\` | ${rows//|/\\|} $extra |" >>"$TABLE"
}

E="python3 benchmarks/epoch_time.py --device ${DEVICE:-cuda} --root .gpu_data ${LIMIT:+--limit $LIMIT}"
row "batch 64: original loop vs the default step (CUDA graph, fused Adam, fp32)" 100 $E --epochs 3
row "the whole reference experiment, 100 epochs, wall clock (target < 120 s)" 200 $E --skip-original --cli ${CLI_EPOCHS:-100} --cli-timeout 180
echo "== tests/test_gpu.py" | tee -a "$LOG"
if [ "$(left)" -ge 180 ]; then  # one line per test as it ends, so a timeout keeps the results
  timeout 180 python3 -m pytest -v -p no:cacheprovider tests/test_gpu.py >"$OUT/test_gpu.log" 2>&1
  rc=$?; cat "$OUT/test_gpu.log" >>"$LOG"
  t=$(grep -E " (PASSED|FAILED|ERROR|SKIPPED)" "$OUT/test_gpu.log" | sed -E 's/.*::(\S+) (PASSED|FAILED|ERROR|SKIPPED).*/\1 \2/' | tr '\n' ';')
  [ $rc -eq 124 ] && t="$t STOPPED at 180 s"
  echo "| tests/test_gpu.py (CUDA graph, fused Adam, compile in the graph, fresh noise) | \`pytest tests/test_gpu.py\` | ${t:-no result (exit $rc)} |" >>"$TABLE"
else
  echo "| tests/test_gpu.py | \`pytest tests/test_gpu.py\` | skipped: $(left) s of the budget left, needs up to 180 s |" >>"$TABLE"
fi

row "batch 1024, bf16 + channels_last, captured (target <= 0.2 s/epoch)" 45 $E --skip-original --epochs 3 --batch-size 1024 --precision bf16 --channels-last
row "epoch parts: validation batch size, checkpoint hand-off, gradient norm" 60 python3 benchmarks/parts.py --device ${DEVICE:-cuda} --root .gpu_data ${LIMIT:+--val-images $LIMIT}
row "batch 64: torch.compile inside the CUDA graph" 150 $E --skip-original --epochs 3 --compile default
row "batch 64: captured, unfused (foreach) Adam" 45 $E --skip-original --epochs 3 --fused false
row "batch 64: eager (no CUDA graph), fused Adam" 60 $E --skip-original --epochs 2 --cuda-graph false
row "batch 64: captured, bf16" 45 $E --skip-original --epochs 3 --precision bf16
row "batch 1024: captured, fp32" 45 $E --skip-original --epochs 3 --batch-size 1024

echo
echo "== $(head -1 "$LOG"); $(sed -n 2p "$LOG"); $(( $(date +%s) - start )) s in all"
cat "$TABLE"
