#!/usr/bin/env bash
# Every GPU figure of issue #5 in one run, for a session that is lent a GPU machine (15 minutes of device
# time in all; this takes ~5-9 minutes, at most 545 s of timeouts). The machine has torch, torchvision,
# opencv, pillow and pyarrow but not simplejpeg (pipeline/decode.py needs it): carry its wheel. Here, once,
# in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl simplejpeg==1.9.0
#
# then run it there with the device tool: command `bash benchmarks/gpu_session.sh`, carry [".whl"],
# timeout_s 600. Figures and logs land in $OUT (or /tmp/gpu-session when OUT is unset: a CPU smoke run
# here, with GPU_SESSION_QUICK=1 to shrink everything).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ "${GPU_SESSION_QUICK:-0}" = 1 ]; then
  PRESET=vit_ti_16 BATCH=8 ITERS="--iters 2 --warmup 1" IMAGES="--images 64 --distinct 4 --rounds 1"
else
  PRESET=vit_b_16 BATCH=512 ITERS="" IMAGES=""
fi
run() {  # name, timeout, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}
nvidia-smi -L 2>/dev/null
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
# Target 2: the model alone, fp32/bf16 x eager/compile, each batch copied host→device inside the timing.
run model 220 $PY benchmarks/model.py --preset $PRESET --batch-size $BATCH --all --transfer $ITERS \
  --json "$OUT/model.json"
# The model stage as the pipeline calls it (numpy in/out), eager and compiled; each also in one piece (the
# compiled one compiles for two batch shapes: 512 and the 128-image pieces).
run actor 75 $PY benchmarks/embed_actor.py --preset $PRESET --batch-size $BATCH $ITERS --json "$OUT/actor.json"
run actor_compiled 150 $PY benchmarks/embed_actor.py --preset $PRESET --batch-size $BATCH --compile $ITERS \
  --json "$OUT/actor_compiled.json"
# --decode gpu: nvJPEG decode + resize + crop + patchify, against the CPU path; PSNR between them.
run gpu_decode 100 $PY benchmarks/gpu_decode.py $IMAGES --json "$OUT/gpu_decode.json"
ls -l "$OUT"
