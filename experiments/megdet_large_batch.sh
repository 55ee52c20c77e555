#!/usr/bin/env bash
# MegDet on the embedded dataset (issue #3): 4x the default global batch (4 ranks x 8 images = 32)
# with the linear scaling rule, with/without warmup, with cross-GPU BN (one group of 4 ranks =
# 32 images, MegDet's best BN size) and with per-GPU BN (8 images). The default batch-8 run is
# README command 1. Results: docs/RESULTS.md. CPU: 4 single-threaded gloo ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
DS=".venv/bin/deepspeed --num_gpus 4"
COMMON=(--config configs/shapes_default.yaml train.micro_batch=8 train.progress=false)
export OMP_NUM_THREADS=1

run() {  # name, overrides...
  local name=$1; shift
  [ -f "runs/$name/eval_metrics.json" ] && { echo "skip $name (done)"; return; }
  $DS launch/train.py "${COMMON[@]}" train.run_name="$name" "$@" > "runs/$name.log" 2>&1 || echo "$name FAILED"
  echo "$name: $(cat runs/$name/eval_metrics.json 2>/dev/null | tr -d '\n ')"
}
mkdir -p runs
run megdet_b32_warmup_cgbn     model.norm=cgbn model.bn_group=node schedule.warmup_epochs=2
run megdet_b32_nowarmup_cgbn   model.norm=cgbn model.bn_group=node schedule.warmup_iters=0
run megdet_b32_warmup_pergpu   model.norm=per_gpu schedule.warmup_epochs=2
