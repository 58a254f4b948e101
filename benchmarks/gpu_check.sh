#!/usr/bin/env bash
# Every GPU check of issue 4 in one call of the device tool (about 6 minutes on an H200).
# Prepare once on the dev machine (ignored folders, carried with the call):
#   mkdir -p .whl .gpu_data && cp ../shared/wheels/py312/*.whl .whl/
#   cp /usr/share/datasets/fashion-mnist/*.gz .gpu_data/
# then run `bash benchmarks/gpu_check.sh` with carry [".whl", ".gpu_data"].
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD VAE_EXP_FASHION_DIR=$PWD/.gpu_data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
echo "== CUDA-graph correctness (tests/test_gpu.py)"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
B="python3 benchmarks/epoch_time.py --device cuda --root .gpu_data --epochs 3"
echo "== batch 64: seed loop vs captured step (fp32)";    $B
echo "== batch 64: eager, device-resident";               $B --skip-original --cuda-graph false
echo "== batch 64: torch.compile reduce-overhead";        $B --skip-original --cuda-graph false --compile reduce-overhead
echo "== batch 64: captured step, bf16";                  $B --skip-original --precision bf16
echo "== batch 1024: captured step";                      $B --skip-original --batch-size 1024
echo "== the whole reference experiment, 100 epochs (Fashion-MNIST, logger=none)"
start=$(date +%s.%N)
python3 -m vae_exp data=fashion_mnist data.root=.gpu_data trainer.epochs=100 logger=none \
  trainer.progress=false eval.enabled=false hydra.run.dir=/tmp/ref100 2>&1 | grep -E "step:|epoch 100/" 
echo "100 epochs wall: $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f} s')")"
python3 -c "import json; m = [json.loads(l) for l in open('/tmp/ref100/metrics.jsonl')]; \
e = [r for r in m if 'epoch' in r][-1]; print('epoch', e['epoch'], 'val loss', e['val/loss'], \
'peak GPU memory', round(e.get('gpu_peak_mib', -1)), 'MiB')"
