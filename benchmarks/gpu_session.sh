#!/usr/bin/env bash
# Every GPU measurement the open issues need, in stages that each fit one 10-minute call
# of the device tool. Run from the repository root on the GPU machine:
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#
# Stages (rough H100 minutes, compile included):
#   check   GPU tests (cuBLASLt FP8 calls, Triton-compiled kernels matching their references, in-place
#           merges) + benchmarks/kernels.py (issue 3) + merge_cost.py          ~4
#   layer   step_time.py layer scope: 3 LLaMA-7B linears x 6 methods             ~3
#   model   7B shape at 4 and 8 layers: bf16-lora, falqon, CLI-default falqon    ~7
#   model2  7B shape at 4 and 8 layers: fp8-base-lora, fp8-all-lora, qlora-nf4   ~7
#   full    7B shape at all 32 layers: bf16-lora and CLI-default falqon          ~9
#   13b     13B shape at 4 and 8 layers: bf16-lora and CLI-default falqon        ~7
#   quality benchmarks/quality.py on a 1024-wide, 8-layer Llama (rank 64): bf16-lora,
#           the reference and the CLI default, each with its lr sweep            ~6
#
# Call the device tool with, e.g., command: bash benchmarks/gpu_session.sh check layer
# Wheels the GPU image lacks, if any, go in .whl/ (git-ignored; carry=[".whl"]): installed first.
# The quality stage reads the corpus from $FALQON_CORPUS (default .corpus/, git-ignored):
# `cp -r ../shared/data/shakespeare .corpus` here and add ".corpus" to carry.
# Results land in $OUT (the device tool's return folder; default /tmp/falqon_gpu): one
# log and one JSON per step, and env.txt with the device, driver and versions to quote
# in benchmarks/RESULTS.md. Each step gets what is left of a 570 s budget per call, so a
# slow step is cut short and the call still returns the logs of the others.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/falqon_gpu}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
BUDGET=${GPU_SESSION_BUDGET_S:-570}
START=$SECONDS
CLI_DEFAULT="falqon[init=random,reset=merged,rounding=stochastic,top_k=all]"
export PYTHONUNBUFFERED=1

if [ $# -eq 0 ]; then
  sed -n '2,25p' "$0"
  exit 2
fi
for stage in "$@"; do
  case $stage in
    check|layer|model|model2|full|13b|quality) ;;
    *) echo "unknown stage '$stage'; use check, layer, model, model2, full, 13b or quality"
       exit 2;;
  esac
done

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi

# A GPU session must not spend its minutes on a CPU fallback (a missing CUDA plugin, say).
if [ "${GPU_SESSION_ALLOW_CPU:-0}" != 1 ] && \
   ! python3 -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  echo "jax sees no GPU here ($(python3 -c 'import jax; print(jax.devices())' 2>&1 | tail -1));"\
       "stopping (GPU_SESSION_ALLOW_CPU=1 runs anyway, for a dry run)" | tee "$OUT/summary.txt"
  exit 1
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command: bash benchmarks/gpu_session.sh $*"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  python3 -c 'import sys, jax, jaxlib, flax, optax; print("python", sys.version.split()[0], "| jax", jax.__version__, "jaxlib", jaxlib.__version__, "| flax", flax.__version__, "| optax", optax.__version__); print("devices", jax.devices())' 2>&1
} | tee "$OUT/env.txt"

# step NAME COMMAND...: runs with the time left in this call's budget, logs to $OUT/NAME.log.
step() {
  local name=$1
  shift
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    echo "=== $name: skipped, ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "=== $name (up to ${left}s): $*"
  local t0=$SECONDS
  timeout --signal=INT --kill-after=10 "$left" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

for stage in "$@"; do
  case $stage in
    check)
      XLA_PYTHON_CLIENT_PREALLOCATE=false step tests python3 -m pytest -q -ra \
        -p no:cacheprovider tests/test_gpu.py tests/kernels tests/test_melded_dense.py \
        tests/test_merge.py tests/test_proxy_update.py tests/test_nnx.py tests/test_models.py
      step kernels python3 benchmarks/kernels.py --json "$OUT/kernels.json"
      step merge_cost python3 benchmarks/merge_cost.py
      ;;
    layer)
      step layer python3 benchmarks/step_time.py --scope layer --json "$OUT/layer.json"
      ;;
    model)
      step model_7b python3 benchmarks/step_time.py --scope model --layers 4,8 \
        --methods "bf16-lora,falqon,$CLI_DEFAULT" --json "$OUT/model_7b.json"
      ;;
    model2)
      step model_7b_2 python3 benchmarks/step_time.py --scope model --layers 4,8 \
        --methods "fp8-base-lora,fp8-all-lora,qlora-nf4" --json "$OUT/model_7b_2.json"
      ;;
    full)
      step model_7b_32 python3 benchmarks/step_time.py --scope model --layers 32 \
        --methods "bf16-lora,$CLI_DEFAULT" --json "$OUT/model_7b_32.json"
      ;;
    13b)
      step model_13b python3 benchmarks/step_time.py --scope model --shape 13b \
        --layers 4,8 --methods "bf16-lora,$CLI_DEFAULT" --json "$OUT/model_13b.json"
      ;;
    quality)
      step quality python3 benchmarks/quality.py --corpus "${FALQON_CORPUS:-.corpus}" \
        --hidden 1024 --layers 8 --heads 8 --intermediate 2752 --rank 64 --alpha 64 \
        --pretrain-steps 1000 --steps 200 --methods "bf16-lora,falqon,$CLI_DEFAULT" \
        --json "$OUT/quality.json"
      ;;
  esac
done
echo "--- summary"
cat "$OUT/summary.txt"
