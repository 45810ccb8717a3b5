#!/usr/bin/env bash
# The trainings of the CIFAR-10 study (docs/RESULTS.md): the converged ResNet-20 base, then every fine-tune from it
# with one schedule. Resumable: each train.py run resumes from its workdir; a finished run (its `done` marker) is
# skipped, and so is one whose weights are shipped (weights/study_NAME): a clone continues the study where the
# shipped weights end. Wall times land in $OUT/wall_times.tsv.
#
#   bash scripts/study_train.sh [DATA_DIR] [OUT]          e.g. bash scripts/study_train.sh ../shared/data/cifar10 runs/study
#
# JOBS=N runs N fine-tunes at once (default 1: one after another, as on a CPU; on an accelerator, all at once fills
# it better). ONLY="base kure_s0" restricts the runs; FT_EPOCHS (15) and FT_LR (0.001: 1% of the base's learning
# rate, as the authors fine-tune) set the fine-tunes' schedule; CPU_DEVICES (2: both cores of this CPU busy, 1.3x
# faster; nothing changes on an accelerator) splits the CPU into XLA devices; EXTRA adds overrides to every run;
# SHIPPED (weights/study_) is where shipped models are looked for (SHIPPED= looks nowhere). 15 epochs: in the
# GPU pilot (the same schedule from an 89% base) KURE's mean kurtosis was 2.33 after 1 epoch, 1.95 after 5, 1.88
# after 9 and 1.84 after 17, so 15 reach the issue's 1.8 ± 0.1 with a margin at half the cost of 30.
set -euo pipefail
data=${1:-../shared/data/cifar10}
out=${2:-runs/study}
jobs=${JOBS:-1}
ft_epochs=${FT_EPOCHS:-15}
ft_lr=${FT_LR:-0.001}
read -r -a extra <<< "${EXTRA:-}"
common=(--config configs/cifar10_resnet20.py --config.dataset.name=folder --config.dataset.data_dir="$data"
        --config.progress=False --config.cpu_devices="${CPU_DEVICES:-2}" "${extra[@]}")
shipped=${SHIPPED-weights/study_}
mkdir -p "$out"

# shellcheck source=scripts/train_runs.sh
source "$(dirname "$0")/train_runs.sh"

# 1. the converged base: the recipe of configs/cifar10_resnet20.py
run base

# 2. fine-tunes from the base (this run's, else the shipped one: the same values), identical schedules (constant
#    learning rate, FT_EPOCHS epochs). Order: the first seed pair, the kurtosis targets (with it, the number-formats
#    experiment can run; K_T 4.0 first, the one the GPU pilot did not train), the other seed pairs (a partial study
#    still compares like with like), gradient-l1, QAT. DoReFa in the authors' model form (every ReLU clamped and
#    quantized, the residual stream included)
base=$out/base
[[ ! -f $base/done ]] && shipped base && base=${shipped}base
ft=(--config.init_from="$base" --config.num_epochs="$ft_epochs" --config.schedule.name=constant
    --config.schedule.learning_rate="$ft_lr" --config.schedule.warmup_epochs=0)
finetunes=(
  "baseline_s0 --config.seed=0 --config.kure.weight=0"
  "kure_s0 --config.seed=0 --config.kure.weight=1.0 --config.kure.target=1.8"
  "kure_t4 --config.kure.weight=1.0 --config.kure.target=4.0"
  "kure_t2.4 --config.kure.weight=1.0 --config.kure.target=2.4"
  "kure_t3 --config.kure.weight=1.0 --config.kure.target=3.0"
  "kure_t6 --config.kure.weight=1.0 --config.kure.target=6.0"
  "baseline_s1 --config.seed=1 --config.kure.weight=0"
  "kure_s1 --config.seed=1 --config.kure.weight=1.0 --config.kure.target=1.8"
  "baseline_s2 --config.seed=2 --config.kure.weight=0"
  "kure_s2 --config.seed=2 --config.kure.weight=1.0 --config.kure.target=1.8"
  "grad_l1 --config.kure.weight=0 --config.reg.kind=grad_l1 --config.reg.grad_l1_weight=0.001"
  "qat_dorefa --config.kure.weight=0 --config.quant.method=dorefa --config.quant.dorefa_form=relus --config.quant.w_bits=4 --config.quant.a_bits=4"
  "qat_dorefa_kure --config.kure.weight=1.0 --config.quant.method=dorefa --config.quant.dorefa_form=relus --config.quant.w_bits=4 --config.quant.a_bits=4"
  "qat_lsq --config.kure.weight=0 --config.quant.method=lsq --config.quant.w_bits=4 --config.quant.a_bits=4"
  "qat_lsq_kure --config.kure.weight=1.0 --config.quant.method=lsq --config.quant.w_bits=4 --config.quant.a_bits=4"
)
for f in "${finetunes[@]}"; do
  read -r -a args <<< "$f"
  while (( $(jobs -rp | wc -l) >= jobs )); do wait -n || true; done
  run "${args[0]}" "${ft[@]}" "${args[@]:1}" &
done
wait
