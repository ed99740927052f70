#!/usr/bin/env bash
# One prepared device session in two parts (run from the repository root on a CUDA machine;
# PART=1 then PART=2, each ends well inside ten minutes). Results go to $OUT, packed into
# one archive per part (the device tool brings back few files) plus a summary on stdout.
#  part 1: the Triton backend's tests on the GPU (no autotuning), the kernel benchmark
#          (benchmarks/kernels.py: kernels vs the reference, three plain cuDNN depthwise
#          convs and the memory/arithmetic floors), and the step benchmark in the eager
#          and whole-step CUDA graph modes, bf16, batch 128 training / 256 inference;
#  part 2: the step benchmark with torch.compile for quadranet36_t and hornet_t, and
#          benchmarks/gpu_checks.py (explain, FLOPs, compile parity) when COMPILE_CHECKS=1.
set -u
OUT=${OUT:-results/gpu_checks}
PART=${PART:-1}
R="$OUT/part$PART"
mkdir -p "$R"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="$R/device.txt"
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "cpus $(nproc)"
} > "$log" 2>&1
start=$SECONDS
MODELS=quadranet36_t,hornet_t,convnext_tiny,swin_tiny_patch4_window7_224,reference
bench() {  # bench <seconds> <name> <args...>: the step benchmark, bf16
  local limit=$1 name=$2
  shift 2
  timeout "$limit" python3 -m quadranet bench throughput --device cuda --precision bf16 \
    --steps 20 --warmup 3 --output "$R/$name" "$@" > "$R/$name.log" 2>&1
  echo "$name rc=$? after $((SECONDS - start))s" >> "$log"
}
if [ "$PART" = 1 ]; then
  QUADRANET_TRITON_AUTOTUNE=0 timeout "${TEST_S:-120}" python3 -m pytest -q -x \
    -p no:cacheprovider tests/test_triton.py > "$R/test_triton.txt" 2>&1
  echo "test_triton rc=$? after $((SECONDS - start))s" >> "$log"
  timeout "${KERNELS_S:-120}" python3 benchmarks/kernels.py --device cuda --batch 128 \
    --step-batch 128 --infer-batch 256 --dtypes bf16,fp32 --output "$R/kernels" \
    > "$R/kernels.log" 2>&1
  echo "kernels rc=$? after $((SECONDS - start))s" >> "$log"
  bench "${STEPS_S:-200}" steps --modes eager,graph --models "$MODELS"
else
  bench "${COMPILE_S:-330}" steps_compile --modes compile --models quadranet36_t,hornet_t
  if [ "${COMPILE_CHECKS:-0}" = 1 ]; then
    timeout 200 python3 benchmarks/gpu_checks.py --out "$R/checks.jsonl" > "$R/checks.log" 2>&1
    echo "gpu_checks rc=$? after $((SECONDS - start))s" >> "$log"
  fi
fi
cat "$log"
tail -n 3 "$R"/test_triton.txt 2>/dev/null
cat "$R"/kernels/kernels.md "$R"/steps*/steps_*.md 2>/dev/null | grep -v "^- command"
tar czf "$OUT/part$PART.tgz" -C "$OUT" "part$PART" && rm -rf "$R"
