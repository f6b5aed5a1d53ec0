#!/usr/bin/env bash
# Device check for issue #16 (GPU decode that beats dense), sized for 6 minutes of device time. From the repo root
# on the GPU machine:
#     PYTHONUNBUFFERED=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# Stages, each with its own timeout, each writing into $OUT as it goes (a run cut short keeps what it measured):
#   1. environment                                                     env.txt                          ~5 s
#   2. each kernel alone vs its dense counterpart, gemma2-2b, bf16,    kernels.jsonl (one line per item) <= 115 s
#      CUDA graphs over the 26 layers' own weights (cold L2):
#      M0 kernel boundary, M1 F1, M2 F1+F2 (BLOCK_C 16/32/64, column splits), M2b no output atomics, M2c batch 4,
#      M2d PDL, M2e the tuner's pick, M3 dense GeGLU FFN, M4 A1 / A1+A2 (cap as drawn / forced on / off) vs dense
#      flash-decoding at 512 and 4096, M5 norm folded into the q/k/v GEMV
#   3. whole model at 512, dense engine rerun in the same call         decode_cuda_512.json             <= 70 s
#   4. whole model at 4096 + a 2048-token prefill, dense rerun          decode_cuda_4096.json            <= 90 s
#   5. the Triton/CUDA tests (kernels vs references, engine vs CPU engine, graph replay == eager)  <= 75 s
# stages.jsonl gets one line per stage (exit code, seconds) and the final JSON line of each benchmark.
# Uses the machine's python3 (torch + triton) with the repo on PYTHONPATH; no C++ extension, no HF baseline.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} SPARKFORMER_DISABLE_EXT=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
T0=$(date +%s)
stage() { echo "+++ [$(date +%T), $(( $(date +%s) - T0 )) s] $*"; }
record() {  # record NAME EXIT SECONDS [LOGFILE]: one JSON line per stage, plus the benchmark's own last JSON line
  echo "{\"stage\": \"$1\", \"exit\": $2, \"seconds\": $3}" >> "$OUT/stages.jsonl"
  if [ $# -ge 4 ] && [ -f "$4" ]; then grep '^{' "$4" | tail -1 >> "$OUT/stages.jsonl"; fi
}
run() {  # run NAME TIMEOUT_S CMD...: the command's output into $OUT/NAME.txt (and the console), then record
  local name=$1 limit=$2 t
  shift 2
  stage "$name (timeout ${limit} s)"
  t=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  record "$name" "$rc" "$(( $(date +%s) - t ))" "$OUT/$name.txt"
  echo "$name exit $rc"
}

stage "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv
  $PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/env.txt"

run kernels 115 $PY benchmarks/gpu_kernels.py --out "$OUT"

BENCH=(-m sparkformer.cli bench decode --device cuda --preset gemma2-2b --dtype bf16 --tokens 32 --repeats 3 --no-hf
       --out "$OUT")
run bench_512 70 $PY "${BENCH[@]}" --context 512 --name decode_cuda_512
run bench_4096 90 $PY "${BENCH[@]}" --context 4096 --prefill 2048 --prefill-repeats 1 --name decode_cuda_4096

# engine + graph replay first, so a cut-short stage still reports the tests that matter most
run tests 75 $PY -m pytest -q -p no:cacheprovider -m "triton or gpu" tests/test_triton_decode.py \
  tests/test_triton_spark_attn.py tests/test_triton_spark_ffn.py
stage "done"
ls -la "$OUT"
