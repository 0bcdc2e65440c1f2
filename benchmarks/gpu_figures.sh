#!/usr/bin/env bash
# The GPU benchmarks in one run: the model alone (benchmarks/model.py: fp32/bf16 x eager/compile, the
# host->device copy inside the timing), the model stage as the pipeline calls it (benchmarks/embed_actor.py,
# eager and compiled) and batched JPEG decoding on the GPU (benchmarks/gpu_decode.py) against the CPU path.
# About 5-9 minutes on one GPU (at most 545 s of per-step timeouts).
#
# Needs: a CUDA GPU, torch, torchvision, opencv, pillow, pyarrow and simplejpeg (pipeline/decode.py). On a
# machine without a package index, put simplejpeg's wheel in .whl/ first and the script installs it into
# /tmp/site; from a machine that has one, in the repo root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl simplejpeg==1.9.0
#
# Run from the repo root: `bash benchmarks/gpu_figures.sh`. Figures (model.json, actor.json,
# actor_compiled.json, gpu_decode.json) and one log per step land in $OUT (default /tmp/gpu-figures).
# PYTHON picks the interpreter (default python3); GPU_FIGURES_QUICK=1 shrinks every step to a smoke run
# (vit_ti_16, batch 8, 64 images), which also runs on a CPU.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-figures}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ "${GPU_FIGURES_QUICK:-0}" = 1 ]; then
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
# The model alone, fp32/bf16 x eager/compile, each batch copied host→device inside the timing.
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
