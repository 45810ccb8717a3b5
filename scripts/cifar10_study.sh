#!/usr/bin/env bash
# The whole CIFAR-10 study (issue 16, docs/RESULTS.md): the converged ResNet-20 base, the fine-tunes, the evaluations
# under both presets, the report. Resumable at every step: a finished (or shipped) training is skipped, an
# unfinished one resumes bit-identically from its last checkpoint; an evaluation scores only the models it has not
# scored yet (so the stages can be rerun as the models arrive); each step's wall time lands in $OUT/wall_times.tsv.
#
#   bash scripts/cifar10_study.sh [DATA_DIR] [OUT] [DEST]
#
# e.g. bash scripts/cifar10_study.sh ../shared/data/cifar10 runs/study docs/results/cifar10_study
# STAGE=train | eval | report runs one stage only. The stages' own variables pass through (JOBS, ONLY, FT_EPOCHS,
# FT_LR, EXTRA for the trainings; PRESETS, ONLY, DRY for the evaluations): see scripts/study_train.sh and
# scripts/study_eval.sh.
set -euo pipefail
data=${1:-../shared/data/cifar10}
out=${2:-runs/study}
dest=${3:-docs/results/cifar10_study}
stage=${STAGE:-all}
here=$(dirname "$0")
if [[ $stage == all || $stage == train ]]; then bash "$here/study_train.sh" "$data" "$out"; fi
# the evaluations skip the models whose rows DEST's report holds (study_eval.sh's PUBLISHED) and keep LAPQ's
# searches beside it, in DEST_lapq (LAPQ_CACHE; not inside DEST, which each report replaces whole)
if [[ $stage == all || $stage == eval ]]; then
  PUBLISHED=${PUBLISHED-$dest/rows} LAPQ_CACHE=${LAPQ_CACHE-${dest%/}_lapq} bash "$here/study_eval.sh" "$data" "$out"
fi
if [[ $stage == all || $stage == report ]]; then python "$here/study_report.py" "$out" "$dest"; fi
