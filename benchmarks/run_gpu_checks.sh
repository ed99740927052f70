#!/usr/bin/env bash
# The GPU checks of one short device session, in order of importance: the CUDA tests
# (Triton kernels' parity, autocast), the kernel benchmark, then Table I in fp32 and bf16.
# Usage: OUT=results_dir bash benchmarks/run_gpu_checks.sh   (python3 with torch + triton)
set -u
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT" /tmp/gpu_res
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi -L
  $PY -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
  echo "== CUDA tests"; date
  timeout 100 $PY -m pytest -q -o addopts= -p no:cacheprovider -k "cuda or triton" \
    tests/test_triton.py tests/test_export.py
  echo "== kernels"; date
  timeout 70 $PY benchmarks/gpu_kernels.py --batch 64 --step-batch 64 --output /tmp/gpu_res/kernels
  echo "== Table I fp32"; date
  timeout 110 $PY -m quadranet.cli bench throughput --device cuda --models quadranet36_t,hornet_t,swin_tiny_patch4_window7_224,convnext_tiny,reference --rounds 1 --warmup 3 \
    --repeats 10 --gemm-size 4096 --output /tmp/gpu_res/tp_fp32
  echo "== Table I bf16"; date
  timeout 80 $PY -m quadranet.cli bench throughput --device cuda --models quadranet36_t,hornet_t,swin_tiny_patch4_window7_224,convnext_tiny,reference --precision bf16 --rounds 1 \
    --warmup 3 --repeats 10 --gemm-size 4096 --output /tmp/gpu_res/tp_bf16
  date
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/gpu_res/kernels/kernels_cuda.md /tmp/gpu_res/kernels/kernels_cuda.csv "$OUT"/ 2>/dev/null
for p in fp32 bf16; do
  for f in md csv; do cp "/tmp/gpu_res/tp_$p/throughput.$f" "$OUT/tp_$p.$f" 2>/dev/null; done
done
cp /tmp/gpu_res/tp_fp32/throughput.png "$OUT/tp_fp32.png" 2>/dev/null
exit 0
