#!/usr/bin/env bash
# The whole GPU check, in one go on one card (a few minutes): the environment, the tests marked
# gpu, the bf16 and fp32 matmul ceilings and a bf16 training run, written to
# benchmarks/results/gpu-<card>.md. Needs the venv (`make install`, with a CUDA build of torch:
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 make install, for example).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
"$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    print("GPU", i, torch.cuda.get_device_name(i))
if torch.cuda.is_available():
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
PYEOF
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py -rs
"$PY" -m benchmarks.gpu_report "$@"
