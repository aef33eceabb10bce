#!/usr/bin/env bash
# GPU checks in one go, for a lent GPU machine whose python3 already has torch/timm but not
# grad-cam: carry its wheels in .whl/ (pip wheel --no-deps grad-cam ttach).
#   OUT=/some/dir bash bench/gpu_checks.sh
# CUDA paths (CAM engine and layer sweep, bf16 AMP and channels-last training, DDP over NCCL when
# there are 2 GPUs), then the numbers: CAM and sweep ratios, training throughput per model alone,
# and two runs packed on one GPU (what bench/schedule.py assumes). Everything lands in $OUT, with
# a RESULTS.md section ready to paste into bench/RESULTS.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
# CUDA paths: the CAM engine (parity with pytorch-grad-cam on every registry model, the layer
# sweep, no leaks) and the training loop (bf16 autocast, channels-last, resume) on the GPU
python3 -m pytest -q -p no:cacheprovider -x tests/explain/test_cam.py tests/training/test_loop.py tests/explain/test_metrics.py 2>&1 | tail -15 | tee "$OUT/tests_gpu.txt"
if [ "$GPUS" -ge 2 ]; then  # DDP inside one run over NCCL, two workers
  python3 -m pytest -q -p no:cacheprovider -x tests/training/test_loop_ddp.py 2>&1 | tail -5 | tee "$OUT/tests_ddp.txt"
fi
# CAM throughput ratios and the layer sweep's cost on the GPU (224 px, batch 8 as on CPU, and batch 64)
python3 bench/cam.py --device cuda --threads 8 --repeats 20 2>&1 | tee "$OUT/cam_gpu_b8.txt"
python3 bench/cam.py --device cuda --threads 8 --repeats 20 --batch 64 2>&1 | tee "$OUT/cam_gpu_b64.txt"
# training throughput alone and packed two to a GPU (224 px, batch 32, bf16)
python3 bench/packing.py --models resnet18,resnet34,resnet50,resnet101,vgg16,vit_small,vit_base --runs 2 \
  --images 2048 --device cuda 2>&1 | tee "$OUT/packing.txt"
python3 bench/packing.py --models vit_large --runs 1 --images 1024 --device cuda 2>&1 | tee "$OUT/vit_large.txt"
{
  echo "### GPU checks, $(date +%F), $(head -1 "$OUT/device.txt")"
  echo '```'; cat "$OUT/tests_gpu.txt" "$OUT/cam_gpu_b8.txt" "$OUT/packing.txt" "$OUT/vit_large.txt"; echo '```'
} > "$OUT/RESULTS.md"
