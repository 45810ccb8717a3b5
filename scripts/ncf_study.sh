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

wanted() { [[ -z ${ONLY:-} || " $ONLY " == *" $1 "* ]]; }

run() {  # run NAME OVERRIDES...: one train.py run in $out/NAME, skipped when done, timed
  local name=$1; shift
  wanted "$name" || return 0
  [[ -f "$out/$name/done" ]] && return 0
  local t0=$SECONDS
  if python train.py "${common[@]}" --workdir "$out/$name" "$@" > "$out/$name.log" 2>&1; then
    if grep -q "'interrupted': False" "$out/$name.log"; then
      touch "$out/$name/done"
      printf '%s\t%d\n' "$name" $((SECONDS - t0)) >> "$out/wall_times.tsv"
    fi
  else
    echo "$name failed: see $out/$name.log" >&2
  fi
}

for seed in 0 1 2; do
  run "baseline_s$seed" --config.seed="$seed" --config.kure.weight=0 --config.kure.activations=0
  run "act_s$seed" --config.seed="$seed" --config.kure.weight=0 --config.kure.activations="$lam_a"
  run "both_s$seed" --config.seed="$seed" --config.kure.weight="$lam_w" --config.kure.activations="$lam_a"
done
