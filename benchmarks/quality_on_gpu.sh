#!/usr/bin/env bash
# The quality study (benchmarks/quality.py, default settings) trained on a lent CUDA machine.
# Training runs on the GPU (TrainConfig device=auto); the eval passes and the step timing run on that machine's CPU,
# so the 2-core step timing is re-measured here afterwards with `quality.py --timing-only`.
# Usage (device tool): carry .gpu_data (a copy of the prepared default corpus), OUT set by the tool.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=.
OUT=${OUT:-/tmp/quality-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
python3 benchmarks/quality.py --data-dir .gpu_data/default --out-dir /tmp/runs/quality --threads 16 \
    --results "$OUT/quality.json" --plot "$OUT/quality-loss.png" "$@" 2>&1 | tee "$OUT/log.txt" | grep -v "it/s\]$" | tail -n 60
for v in dense spark_ffn spark topk_no_predictor; do
    cp /tmp/runs/quality/$v/metrics.jsonl "$OUT/metrics_$v.jsonl" 2>/dev/null
done
ls -la "$OUT"
