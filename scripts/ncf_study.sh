#!/usr/bin/env bash
# The trainings of the NCF study (issue 18, docs/ncf.md): NeuMF on MovieLens-1M, baseline vs KURE on the
# activations vs KURE on weights and activations, three seeds each, the recipe of configs/movielens_neumf.py.
# Resumable: each train.py run resumes from its workdir; a finished run (its `done` marker) is skipped. Wall
# times land in $OUT/wall_times.tsv.
#
#   bash scripts/ncf_study.sh [DATA_DIR] [OUT]       e.g. bash scripts/ncf_study.sh ../shared/data/movielens runs/ncf
#
# ONLY="baseline_s0 act_s0" restricts the runs; LAMBDA_A (0.1) is the activation-KURE weight, LAMBDA_W (1.0) the
# weight-KURE weight; EXTRA adds overrides to every run.
set -euo pipefail
data=${1:-../shared/data/movielens}
out=${2:-runs/ncf}
lam_a=${LAMBDA_A:-0.1}
lam_w=${LAMBDA_W:-1.0}
read -r -a extra <<< "${EXTRA:-}"
common=(--config configs/movielens_neumf.py --config.dataset.data_dir="$data" --config.progress=False "${extra[@]}")
mkdir -p "$out"

# shellcheck source=scripts/train_runs.sh
source "$(dirname "$0")/train_runs.sh"

for seed in 0 1 2; do
  run "baseline_s$seed" --config.seed="$seed" --config.kure.weight=0 --config.kure.activations=0
  run "act_s$seed" --config.seed="$seed" --config.kure.weight=0 --config.kure.activations="$lam_a"
  run "both_s$seed" --config.seed="$seed" --config.kure.weight="$lam_w" --config.kure.activations="$lam_a"
done
