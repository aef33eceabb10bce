#!/usr/bin/env bash
# GPU checks in one go (CUDA paths, bf16 AMP, throughput), for a lent GPU machine whose python3
# already has torch/timm but not grad-cam: carry its wheels in .whl/ (pip wheel --no-deps grad-cam ttach).
#   OUT=/some/dir bash bench/gpu_checks.sh
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
# CUDA paths: the CAM engine (parity with pytorch-grad-cam on every registry model, no leaks) and the
# training loop (bf16 autocast, channels-last, resume) on the GPU
python3 -m pytest -q -p no:cacheprovider -x tests/test_cam.py tests/test_loop.py tests/test_metrics.py 2>&1 | tail -15 | tee "$OUT/tests_gpu.txt"
# CAM throughput ratios on the GPU (224 px, batch 8 as on CPU, and batch 64)
python3 bench/cam.py --device cuda --threads 8 --repeats 20 2>&1 | tee "$OUT/cam_gpu_b8.txt"
python3 bench/cam.py --device cuda --threads 8 --repeats 20 --batch 64 2>&1 | tee "$OUT/cam_gpu_b64.txt"
