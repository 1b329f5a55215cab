#!/bin/bash
# bench/ on one GPU, as one prepared script: maskrcnn_jax vs real torchvision (CUDA) in the
# same process for each benchmark, each under its own time limit so that one failure or
# overrun leaves the others' figures.
#
#   bash bench/gpu.sh [OUT_DIR]        # default $OUT, else /tmp/gpu_bench
#
# Meant for a machine that has jax (CUDA), torch + torchvision (CUDA), flax, optax and
# orbax-checkpoint installed but none of this project's data dependencies: wheels found in
# .whl/ (ml_collections, pycocotools, grain, array_record, tensorflow-datasets and theirs,
# downloaded for its Python with `pip download --only-binary=:all: --python-version 3.12 ...`)
# are installed into /tmp/site first. Each benchmark's output goes to OUT_DIR/<name>.log and
# the versions and the GPU to OUT_DIR/env.log. The benchmarks put JAX and torch on the GPU
# (`bench/timing.py torch_device`: CUDA when JAX's backend is the GPU).
set -u
out=${1:-${OUT:-/tmp/gpu_bench}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc
  python3 -c "import jax, jaxlib, flax, optax, torch, torchvision, numpy as np
print('jax', jax.__version__, jaxlib.__version__, jax.devices(), 'flax', flax.__version__,
      'optax', optax.__version__, 'torch', torch.__version__, 'torchvision',
      torchvision.__version__, torch.cuda.get_device_name(0), 'numpy', np.__version__)"
} > "$out/env.log" 2>&1
cat "$out/env.log"

run() {  # run NAME SECONDS ARGS...: one benchmark under its time limit, output to NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name ($limit s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" python3 "$@" > "$out/$name.log" 2>&1
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 40 "$out/$name.log"
}

run ops 60 bench/ops.py --repeats 5
run inference 170 bench/inference.py --sizes 800x1333 photos --batches 1 --dtypes float32 bfloat16 --repeats 5
run train 150 bench/train.py --size 800 --batch 2 --steps 5
run eval 120 bench/eval.py --images 24
