#!/usr/bin/env bash
# Device check for issue #8 (GPU decode): environment, the gemma2-2b decode benchmark (bf16, context 512 and
# 4096), then the Triton/CUDA tests. Run from the repo root on the GPU machine:
#     PYTHONUNBUFFERED=1 bash benchmarks/gpu_check.sh            # results under $OUT (default /tmp/gpu_check)
# Each stage has its own timeout and writes its log/JSON to $OUT at once, so one failure does not lose the rest.
# Uses the machine's python3 (torch + triton + transformers) with the repo on PYTHONPATH; no C++ extension.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} SPARKFORMER_DISABLE_EXT=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
stage() { echo "+++ [$(date +%T)] $*"; }

stage "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))'
  $PY -c 'import transformers; print("transformers", transformers.__version__)' || true
} 2>&1 | tee "$OUT/env.txt"

stage "benchmark: gemma2-2b decode, bf16, context 512,4096"
timeout 200 $PY -m sparkformer.cli bench decode --device cuda --preset gemma2-2b --context 512,4096 --dtype bf16 \
  --tokens 32 --repeats 5 --out "$OUT" --name decode_cuda_h200 2>&1 | tee "$OUT/bench.txt"
echo "bench exit ${PIPESTATUS[0]}"

stage "tests: Triton kernels vs references, engine, CUDA graph"
timeout 120 $PY -m pytest -q -p no:cacheprovider -m "triton or gpu" tests/test_triton_decode.py 2>&1 \
  | tee "$OUT/tests.txt" | tail -25
echo "tests exit ${PIPESTATUS[0]}"
stage "done"
ls -la "$OUT"
