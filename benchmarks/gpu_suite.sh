#!/usr/bin/env bash
# The GPU suite as one device call (docs/benchmarks.md, "GPU suite").
# Here, from the project root, once:   bash ../shared/device/prepare.sh
# Device call: command `bash benchmarks/gpu_suite.sh`, carry [".whl", ".device_data"],
# timeout_s 540. Prints every figure; gpu_suite.json and gpu_suite.md land in $OUT.
set -uo pipefail
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c 'import jax, torch; print("jax", jax.__version__, jax.devices(), "torch", torch.__version__)'
timeout 470 python3 benchmarks/gpu_suite.py --out="${OUT:-/tmp/gpu_suite}" --budget_s 440
