#!/usr/bin/env bash
# One device call of the GPU CamVid study (benchmarks/camvid_study.py --preset=gpu).
#
# Run inside a `device` call, after the wheel prefix of ../shared/device/README.md
# (carry: [".whl", ".device_data"]):
#   rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; bash benchmarks/gpu_study.sh 1
# CALL is the device call of `python -m benchmarks.camvid_study --plan --preset=gpu` (1 holds
# the core cells: pce_only, full, agmm_released, agmm_paper on clicks:20, and the bfloat16 check).
# Further arguments go to every camvid_study command (e.g. --img_per_s=650 --compile_s=60 once a
# call has measured them: they change the split, so pass the same ones to --plan here).
# The runs resume what an earlier call on the same warm machine left (workdirs, data and
# .jax_cache are git-ignored, so they stay between calls); a run still going at the call's
# deadline is stopped with SIGTERM (it checkpoints). Whatever happened, the report inputs of
# every planned run are packed into $OUT (study_results.json, study_figures.tar.gz), then
# turned into docs/results.md on the CPU machine:
#   python -m benchmarks.camvid_study --report --from=FOLDER_THAT_CAME_BACK[,ANOTHER]
set -uo pipefail
call=${1:?usage: bash benchmarks/gpu_study.sh CALL [camvid_study flags]}
shift
: "${OUT:?OUT must name the folder that comes back from the device call}"
flags=(--preset=gpu --call="$call" --python=python3
       --override=data.prepare.root=.device_data/camvid --diagnostic_images=64 "$@")
export JAX_COMPILATION_CACHE_DIR="$PWD/.jax_cache"
nvidia-smi -L
python3 -m benchmarks.camvid_study --plan "${flags[@]}" | grep -E '^# (call|total)'
python3 -m benchmarks.camvid_study --run "${flags[@]}"
echo "--run exit status: $?"
timeout 240 python3 -m benchmarks.camvid_study --pack="$OUT" "${flags[@]}"
echo "--pack exit status: $?"
python3 -m benchmarks.camvid_study --status "${flags[@]}"
ls -l "$OUT"
