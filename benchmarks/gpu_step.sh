#!/usr/bin/env bash
# The one prepared runner for a lent H100/H200-class GPU. Modes (default: step):
#   step   (≤ 10 min) gpu_step.py's sections, each with its own time limit (a slow compile cannot cost the
#          others their numbers): eager bf16 / fp32, the LLaMA-sized pair, compiled bf16, CUDA graphs
#          (torch.compile mode reduce-overhead); the target table; then the FSDP end-to-end test.
#   speed  (~5 min) speed_memory.py on CUDA: fp32 (both backbones, r = 8 and 32), bf16 autocast, compiled row.
#   sweep  (~9.5 min) a bf16-mixed smoke fit, then the SST-2 sample-efficiency sweep, 10 runs at a time,
#          then `speed` (into $OUT/speed) in the time left. Expects in the git-ignored .whl/: minilm/ (the MiniLM-L6 model
#          folder) and glue/SST-2/*.tsv.
# Needs python3 with torch (CUDA), timm, transformers, peft, pytest; wheels missing on the machine may lie in
# .whl/*.whl. Writes a few files under "$OUT" (default ./gpu_out).
#   bash benchmarks/gpu_step.sh [step|speed|sweep]
set -u
cd "$(dirname "$0")/.."
MODE="${1:-step}"
case "$MODE" in
  step | speed | sweep) ;;
  *) echo "benchmarks/gpu_step.sh: unknown mode '$MODE'; use step, speed or sweep" >&2; exit 2 ;;
esac
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
  python3 -c "import torch, timm, transformers, peft; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} > "$OUT/env.log" 2>&1

section() {  # gpu_step.py section, time limit in seconds
  timeout "$2" python3 benchmarks/gpu_step.py --section "$1" --out "$OUT/$1.json" >> "$OUT/sections.log" 2>&1
  echo "section $1: rc=$? (124 = timed out) at ${SECONDS}s" | tee -a "$OUT/env.log"
}

speed() {  # name, time limit in seconds, speed_memory.py flags; each finished table is also in the .log
  local name="$1" limit="$2"; shift 2
  timeout "$limit" python3 benchmarks/speed_memory.py --device cuda --out "$OUT/$name.json" "$@" \
    > "$OUT/$name.md" 2> "$OUT/$name.log"
  echo "$name: rc=$? (124 = timed out) at ${SECONDS}s" | tee -a "$OUT/env.log"
}

run_step() {
  local name finished=()
  section eager-bf16 70
  section eager-fp32 60
  section llama-pair 50
  section compiled-bf16 150
  section cudagraphs-bf16 150
  for name in eager-bf16 eager-fp32 llama-pair compiled-bf16 cudagraphs-bf16; do
    [ -f "$OUT/$name.json" ] && finished+=("$OUT/$name.json")
  done
  python3 benchmarks/gpu_step.py --summarize "${finished[@]}" > "$OUT/summary.md" 2>&1
  cat "$OUT/summary.md"
  timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_distributed.py -k fsdp > "$OUT/fsdp.log" 2>&1
  echo "fsdp test: rc=$? at ${SECONDS}s" | tee -a "$OUT/env.log"
  tail -n 5 "$OUT/fsdp.log"
}

run_speed() {
  speed speed_cuda_fp32 120                             # ViT-B/16 224 px and BERT-base 128 tokens, batch 32
  speed speed_cuda_bf16 60 --autocast bf16 --ranks 8    # the paper's vision setting
  speed speed_cuda_compile 100 --compile --ranks 8      # compilation happens in the untimed warm-up rounds
  tail -n 40 "$OUT"/speed_cuda_*.md
}

run_sweep() {
  local args=(--trainer.accelerator=gpu --trainer.precision=bf16-mixed --model.backbone.name="$PWD/.whl/minilm"
              --model.backbone.dtype=float32 --data.init_args.tokenizer="$PWD/.whl/minilm"
              --data.init_args.root="$PWD/.whl/glue")
  # A smoke fit first: if the stack does not run here, say so and still benchmark.
  timeout 90 python3 -m doran_lightning fit --config configs/minilm_sst2.yaml "${args[@]}" \
    --trainer.fast_dev_run=3 --trainer.default_root_dir=/tmp/smoke > "$OUT/smoke.log" 2>&1
  local smoke=$?
  echo "smoke fit (bf16-mixed on CUDA): rc=$smoke at ${SECONDS}s" | tee -a "$OUT/env.log"
  if [ "$smoke" = 0 ]; then  # finished runs stay cached under /tmp/sst2/runs, so the same command resumes
    timeout 270 python3 benchmarks/sample_efficiency.py --config configs/minilm_sst2.yaml --jobs 10 \
      --fractions 0.1 0.3 1.0 --lrs 1e-3 3e-3 --epochs 3 --seeds 0 1 2 --out /tmp/sst2 -- "${args[@]}" \
      > "$OUT/sweep.log" 2>&1
    echo "sweep: rc=$? at ${SECONDS}s" | tee -a "$OUT/env.log"
    tar -czf "$OUT/sst2.tar.gz" -C /tmp --exclude='*.ckpt' sst2 2>/dev/null
  fi
  local left=$(( ${GPU_SWEEP_BUDGET:-575} - SECONDS ))
  OUT="$OUT/speed" timeout "$left" bash "$0" speed > /dev/null 2>&1
  echo "speed (in $OUT/speed): rc=$? at ${SECONDS}s" | tee -a "$OUT/env.log"
}

"run_$MODE"
