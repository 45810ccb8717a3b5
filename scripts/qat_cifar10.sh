#!/usr/bin/env bash
# QAT demonstration on the real CIFAR-10: ResNet-20 fine-tuned from a float checkpoint at W4A4
# with DoReFa and with LSQ, each with and without KURE, then scored at W2…W8 and 16 bits
# (≈ float) and at step ratios 0.7…1.3 by eval.py. Resumable: rerun to continue.
#
#   bash scripts/qat_cifar10.sh FLOAT_WORKDIR [DATA_DIR] [OUT]
#
# e.g. bash scripts/qat_cifar10.sh runs/r20 ../shared/data/cifar10 runs/qat
set -euo pipefail
float=${1:?usage: qat_cifar10.sh FLOAT_WORKDIR [DATA_DIR] [OUT]}
data=${2:-../shared/data/cifar10}
out=${3:-runs/qat}
steps=${STEPS:-585}   # 1.5 epochs at batch 128
common=(--config configs/cifar10_resnet20.py --config.dataset.data_dir="$data")
for method in dorefa lsq; do
  for kure in 0 1; do
    name="${method}_kure${kure}"
    python train.py "${common[@]}" --workdir "$out/$name" --config.init_from="$float" \
        --config.quant.method=$method --config.quant.w_bits=4 --config.quant.a_bits=4 \
        --config.kure.weight=$kure --config.num_epochs=2 --config.max_steps="$steps" --config.schedule.learning_rate=0.01 \
        --config.schedule.warmup_epochs=0 --config.progress=False
  done
done
for method in dorefa lsq; do
  ckpts=(--checkpoint "$out/${method}_kure0" --label baseline --checkpoint "$out/${method}_kure1" --label KURE)
  # other bit-widths (weights and activations together), the learned steps rescaled by the authors' rule
  python eval.py "${common[@]}" --config.quant.method=$method "${ckpts[@]}" --out "$out/eval_${method}_bits" \
      --config.eval.methods="('learned',)" --config.eval.targets="('both',)" --config.eval.policies="('exact',)" \
      --config.eval.bits="(2,3,4,5,6,8,16)" --config.eval.ratio_min=1.0 --config.eval.ratio_max=1.0 \
      --config.eval.ratio_steps=1
  # step-size error at the trained W4A4
  python eval.py "${common[@]}" --config.quant.method=$method "${ckpts[@]}" --out "$out/eval_${method}_ratio" \
      --config.eval.methods="('learned',)" --config.eval.targets="('both',)" --config.eval.policies="('exact',)" \
      --config.eval.bits="(4,)" --config.eval.ratio_min=0.7 --config.eval.ratio_max=1.3 --config.eval.ratio_steps=13
done
