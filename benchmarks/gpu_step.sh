#!/usr/bin/env bash
# The prepared check for one lent H100/H200-class GPU (about 6 minutes): the four gpu_step.py sections,
# each with its own time limit (a slow compile cannot cost the others their numbers), the target
# table, then the FSDP end-to-end test. Needs python3 with torch (CUDA), transformers, peft, pytest;
# missing wheels (jsonargparse, …) may lie in .whl/. Writes at most 8 files under "$OUT" (default ./gpu_out).
#   bash benchmarks/gpu_step.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
  export PYTHONPATH="$PWD"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.log" 2>&1
section() {  # name, time limit in seconds
  timeout "$2" python3 benchmarks/gpu_step.py --section "$1" --out "$OUT/$1.json" >> "$OUT/sections.log" 2>&1
  echo "section $1: rc=$? (124 = timed out) at ${SECONDS}s" | tee -a "$OUT/env.log"
}
section eager-bf16 80
section eager-fp32 80
section llama-pair 60
section compiled-bf16 200
python3 benchmarks/gpu_step.py --summarize "$OUT"/*.json > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py -k fsdp > "$OUT/fsdp.log" 2>&1
echo "fsdp test: rc=$? at ${SECONDS}s" | tee -a "$OUT/env.log"
tail -n 5 "$OUT/fsdp.log"
