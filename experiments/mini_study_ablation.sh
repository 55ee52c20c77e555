#!/usr/bin/env bash
# Ablation beside studies/mini_batch_scaling.yaml: the "agvm" recipe with modulation switched off
# (agvm.ratio_min = ratio_max = 1, so mu = 1) but everything else the same, including AGVM's
# gradient-clipping window before its start. It separates what AGVM's lr modulation does from
# what its clipping window does. Results: docs/RESULTS.md ("Scaling study").
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
for mb in 4 8 16; do
  name="2x${mb}__agvm_mu1"
  [ -f "runs/mini_batch_scaling_ablation/$name/run_summary.json" ] && { echo "skip $name (done)"; continue; }
  .venv/bin/deepspeed --num_gpus 2 launch/train.py --config configs/shapes_default.yaml \
    schedule.policy=multistep schedule.epochs=5 "schedule.milestones=[4]" optim.base_lr=0.04 \
    train.eval_every_epochs=0 train.ckpt_every_iters=100 train.micro_batch=$mb optim.name=agvm_sgd \
    schedule.warmup_epochs=1 model.norm=cgbn model.bn_group=world agvm.ratio_min=1 agvm.ratio_max=1 agvm.start_after_warmup=0 \
    train.output_dir=runs/mini_batch_scaling_ablation train.run_name=$name train.progress=false \
    tracking.group=mini_batch_scaling > "runs/mini_batch_scaling_ablation/$name.log" 2>&1
  grep "final bbox" "runs/mini_batch_scaling_ablation/$name.log"
done
