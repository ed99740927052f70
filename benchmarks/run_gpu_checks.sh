#!/usr/bin/env bash
# One prepared device session (run from the repository root on a CUDA machine):
#  1. the Triton backend's tests on the GPU (tests/test_triton.py);
#  2. benchmarks/gpu_checks.py: explain, FLOPs, compile parity, eager step times;
#  3. with OLD_TREE=<folder holding an older src/>: whole-step CPU times of quadranet36_t,
#     that tree against this one, at 8 threads on CPUs 0-7 (benchmarks/compare_trees.py).
# Each part has its own time limit; results go to $OUT (default results/gpu_checks).
set -u
OUT=${OUT:-results/gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/device.txt"
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "cpus $(nproc)"
} > "$log" 2>&1
start=$SECONDS
timeout "${TEST_S:-180}" python3 -m pytest -q -p no:cacheprovider tests/test_triton.py \
  > "$OUT/test_triton.txt" 2>&1
echo "test_triton rc=$? after $((SECONDS - start))s" >> "$log"
timeout "${CHECKS_S:-240}" python3 benchmarks/gpu_checks.py --skip-compile-speed \
  --out "$OUT/checks.jsonl" > "$OUT/gpu_checks.txt" 2>&1
echo "gpu_checks rc=$? after $((SECONDS - start))s" >> "$log"
if [ -n "${OLD_TREE:-}" ]; then
  timeout "${COMPARE_S:-150}" python3 benchmarks/compare_trees.py --tree "old=$OLD_TREE" \
    --tree new=. --threads 8 --cpus 0-7 --rounds 2 --steps 3 \
    --output "$OUT/compare_8_threads.json" > "$OUT/compare_8_threads.txt" 2>&1
  echo "compare rc=$? after $((SECONDS - start))s" >> "$log"
fi
cat "$log"
