#!/usr/bin/env bash
# One prepared GPU run of the speed/memory benchmark (about 3-4 minutes on one H100/H200-class GPU).
# Needs python3 with torch (CUDA), timm, transformers, peft; the project on PYTHONPATH (run from the
# repository root). Writes JSON + log + Markdown under "$OUT" (default: ./bench_out).
#   bash benchmarks/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python3}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  "$PY" -c "import torch, timm, transformers, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.log" 2>&1
# fp32, both backbones, r=8 and 32, with a torch.compile DoRAN row (ViT-B/16 at 224, batch 32; BERT seq 128, batch 32).
timeout 170 "$PY" benchmarks/speed_memory.py --device cuda --compile --out "$OUT/results_cuda_fp32.json" \
  > "$OUT/results_cuda_fp32.md" 2> "$OUT/results_cuda_fp32.log" || echo "fp32 run failed/timed out: rc=$?" >> "$OUT/env.log"
# bf16 autocast, r=8 only (the paper's vision setting), no compile.
timeout 90 "$PY" benchmarks/speed_memory.py --device cuda --autocast bf16 --ranks 8 --out "$OUT/results_cuda_bf16.json" \
  > "$OUT/results_cuda_bf16.md" 2> "$OUT/results_cuda_bf16.log" || echo "bf16 run failed/timed out: rc=$?" >> "$OUT/env.log"
cat "$OUT/env.log"
tail -n 40 "$OUT"/results_cuda_*.md
