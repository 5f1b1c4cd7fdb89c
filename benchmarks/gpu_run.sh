#!/usr/bin/env bash
# One prepared GPU run of the speed/memory benchmark (at most ~5 minutes on one H100/H200-class GPU).
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
# Three runs, each with its own time limit so that a slow one cannot cost the others their results
# (every finished (model, rank) table is also in the .log as it completes).
bench() {  # name, limit in seconds, extra flags
  local name="$1" limit="$2"; shift 2
  timeout "$limit" "$PY" benchmarks/speed_memory.py --device cuda --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.md" 2> "$OUT/$name.log" || echo "$name: rc=$? (124 = timed out)" >> "$OUT/env.log"
}
# fp32, both backbones, r=8 and 32 (ViT-B/16 at 224 px batch 32; BERT-base 128 tokens batch 32).
bench results_cuda_fp32 120
# bf16 autocast, r=8 (the paper's vision setting).
bench results_cuda_bf16 60 --autocast bf16 --ranks 8
# torch.compile (mode default) DoRAN row, r=8; compilation time is not timed (warm-up rounds).
bench results_cuda_compile 100 --compile --ranks 8
cat "$OUT/env.log"
tail -n 40 "$OUT"/results_cuda_*.md
