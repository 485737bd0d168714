#!/usr/bin/env bash
# One device call of the GPU CamVid study (benchmarks/camvid_study.py --preset=gpu).
#
# Run inside a `device` call, after the wheel prefix of ../shared/device/README.md
# (carry: [".whl", ".device_data"], timeout_s: 600):
#   rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; bash benchmarks/gpu_study.sh 1
#
# bash benchmarks/gpu_study.sh K [flags]: trains device call K of
#   `python -m benchmarks.camvid_study --plan --preset=gpu` (calls 1-2 hold the core cells:
#   pce_only, full, agmm_released, agmm_paper on clicks:20, seeds 0 and 1), resuming what an
#   earlier call of the same task left (workdirs, data/ and .jax_cache are git-ignored, so they
#   stay on the warm machine between calls); a run still going at the call's deadline gets
#   SIGTERM and checkpoints. Then packs the report inputs of every planned run into $OUT.
# bash benchmarks/gpu_study.sh extras [flags]: in the task that trained the core cells (their
#   checkpoints), the overlay grid and the G-vs-p diagnostic, packed with the scalars.
# Further flags go to every camvid_study command (e.g. --img_per_s=650 --compile_s=60 once a
# call has measured them: they change the split, so give the same ones to --plan).
# Back on the CPU machine, with the folders that came back, in order:
#   python -m benchmarks.camvid_study --report --from=FOLDER1,FOLDER2 --output=docs/results_gpu.md
set -uo pipefail
call=${1:?usage: bash benchmarks/gpu_study.sh CALL|extras [camvid_study flags]}
shift
: "${OUT:?OUT must name the folder that comes back from the device call}"
flags=(--preset=gpu --python=python3 --override=data.prepare.root=.device_data/camvid)
export JAX_COMPILATION_CACHE_DIR="$PWD/.jax_cache"
nvidia-smi -L
if [ "$call" = extras ]; then
  python3 -m benchmarks.camvid_study --pack="$OUT" "${flags[@]}" --diagnostic_images=64 "$@"
  echo "--pack exit status: $?"
else
  flags+=(--call="$call")
  python3 -m benchmarks.camvid_study --plan "${flags[@]}" "$@" | grep -E '^# (call|total)'
  python3 -m benchmarks.camvid_study --run "${flags[@]}" "$@"
  echo "--run exit status: $?"
  python3 -m benchmarks.camvid_study --pack="$OUT" "${flags[@]}" "$@"
  echo "--pack exit status: $?"
  python3 -m benchmarks.camvid_study --status "${flags[@]}" "$@"
fi
ls -l "$OUT"
