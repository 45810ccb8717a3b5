#!/usr/bin/env bash
# The evaluations of the CIFAR-10 study (docs/RESULTS.md) under both presets, over the models that
# scripts/study_train.sh trained into OUT. Incremental and resumable: each run of this script scores, per evaluation,
# only the models it has not scored yet, in one eval.py call (one compile) into a new part OUT/eval_NAME/N/, which
# holds `scored` (its models) once it finished; the report merges the parts. So the evaluations can run as the
# models arrive. Wall times land in $OUT/wall_times.tsv. Each model is read from OUT when its training is done there,
# else from its shipped weights (weights/study_NAME; SHIPPED sets the prefix); models that are neither are left out.
# A model whose rows the committed report already holds (docs/results/cifar10_study/rows/NAME.csv; PUBLISHED sets the
# folder, PUBLISHED= looks nowhere) is not scored again: scripts/study_report.py keeps those rows, so a lost OUT costs
# no evaluation that was reported. LAPQ's searches (minutes each) are kept per model, settings and bit-width as each
# ends, in docs/results/cifar10_study_lapq (LAPQ_CACHE sets the folder), committed with the report: a killed or
# lost evaluation searches again only what had not finished.
#
#   bash scripts/study_eval.sh [DATA_DIR] [OUT]          e.g. bash scripts/study_eval.sh ../shared/data/cifar10 runs/study
#
# PRESETS ("ours authors") chooses the presets; CPU_DEVICES (1) splits the CPU into XLA devices (2 scores ~1.3x
# faster on a 2-core CPU, but one long evaluation on two CPU devices hung at a cross-device reduction with both
# cores idle, so unattended evaluations keep one); ONLY="ptq_w_ours ratio_authors" restricts the evaluations;
# DRY=1 prints the eval.py commands instead of running them. Each preset fixes the weight grid, bias
# correction, quantized layers and base-step method (configs/default.py, eval.preset); every evaluation also
# records the base steps' method in its rows, so the report can tell them apart.
set -euo pipefail
data=${1:-../shared/data/cifar10}
out=${2:-runs/study}
read -r -a presets <<< "${PRESETS:-ours authors}"
shipped=${SHIPPED-weights/study_}
published=${PUBLISHED-docs/results/cifar10_study/rows}
lapq_cache=${LAPQ_CACHE-docs/results/cifar10_study_lapq}
common=(--config configs/cifar10_resnet20.py --config.dataset.name=folder --config.dataset.data_dir="$data"
        --config.progress=False --config.eval.lapq_cache="$lapq_cache"  # one LAPQ search per model and setting
        --config.cpu_devices="${CPU_DEVICES:-1}")  # see CPU_DEVICES above (nothing changes on an accelerator)

wanted() { [[ -z ${ONLY:-} || " $ONLY " == *" $1 "* ]]; }

evaluate() {  # evaluate NAME "MODEL..." OVERRIDES...: one eval.py call over the trained models among MODEL... that
              # OUT/eval_NAME has not scored yet, into its next part
  local name=$1 dir="$out/eval_$1" ckpts=() labels=() m src n=1; shift
  wanted "$name" || return 0
  for m in $1; do
    src=""
    if [[ -f "$out/$m/done" || -n ${DRY:-} ]]; then src="$out/$m"
    elif [[ -n $shipped && -f "${shipped}$m/variables.msgpack" ]]; then src="${shipped}$m"
    fi
    [[ -n $src ]] || continue
    grep -qsxF -- "$m" "$dir"/*/scored && continue  # grep the files itself: `cat | grep -q` under pipefail fails
                                                    # (and rescored the model) when grep quit first and cat got SIGPIPE
    [[ -n $published ]] && awk -F, -v m="$m" '$1 == m {found = 1; exit} END {exit !found}' \
        "$published/$name.csv" 2> /dev/null && continue  # reported already (its first column: the checkpoint)
    ckpts+=(--checkpoint "$src" --label "$m")
    labels+=("$m")
  done; shift
  (( ${#ckpts[@]} )) || return 0
  while [[ -f "$dir/$n/scored" ]]; do n=$((n + 1)); done  # the first unfinished part (a killed call's) is redone
  if [[ -n ${DRY:-} ]]; then
    printf '%q ' python eval.py "${common[@]}" "${ckpts[@]}" --out "$dir/$n" "$@"; echo
    return 0
  fi
  rm -rf "${dir:?}/$n"
  mkdir -p "$dir"
  local t0=$SECONDS
  if python eval.py "${common[@]}" "${ckpts[@]}" --out "$dir/$n" "$@" > "$dir/$n.log" 2>&1; then
    printf '%s\n' "${labels[@]}" > "$dir/$n/scored"
    printf 'eval %s\t%d\n' "$name" $((SECONDS - t0)) >> "$out/wall_times.tsv"
  else
    echo "eval $name failed: see $dir/$n.log" >&2
  fi
}

seeds="baseline_s0 baseline_s1 baseline_s2 kure_s0 kure_s1 kure_s2"
at_1=(--config.eval.ratio_min=1.0 --config.eval.ratio_max=1.0 --config.eval.ratio_steps=1
      --config.eval.policies="('exact',)")
ratios=(--config.eval.ratio_min=0.5 --config.eval.ratio_max=1.5 --config.eval.ratio_steps=21
        --config.eval.policies="('exact',)")

for p in "${presets[@]}"; do
  pre=(--config.eval.preset="$p")
  # PTQ in the paper's table shape: W8…W2 and 8/8…3/3 at the preset's base step (the float column is each
  # model's own last evaluation)
  evaluate "ptq_w_$p" "base $seeds grad_l1" "${pre[@]}" "${at_1[@]}" --config.eval.bits="(2,3,4,5,6,8)" \
      --config.eval.targets="('weights',)"
  evaluate "ptq_wa_$p" "base $seeds grad_l1" "${pre[@]}" "${at_1[@]}" --config.eval.bits="(3,4,5,6,8)" \
      --config.eval.targets="('both',)"
  # step ratios 0.5…1.5 (21 points) relative to the preset's base step; report.relative_to_best re-expresses
  # them against each model's accuracy-best step
  evaluate "ratio_$p" "$seeds" "${pre[@]}" "${ratios[@]}" --config.eval.bits="(2,3,4)" \
      --config.eval.targets="('weights',)"
  # power-of-two steps on LAPQ steps (nearest, floor, ceil; exact beside them)
  evaluate "pow2_$p" "$seeds" "${pre[@]}" --config.eval.methods="('lapq',)" --config.eval.bits="(2,3,4)" \
      --config.eval.targets="('weights',)" --config.eval.ratio_min=1.0 --config.eval.ratio_max=1.0 \
      --config.eval.ratio_steps=1 --config.eval.policies="('exact','pow2_nearest','pow2_floor','pow2_ceil')"
  # the kurtosis-target ablation at W2…W8 with LAPQ steps
  evaluate "ablation_$p" "baseline_s0 kure_s0 kure_t2.4 kure_t3 kure_t4 kure_t6" "${pre[@]}" "${at_1[@]}" \
      --config.eval.methods="('lapq',)" --config.eval.bits="(2,3,4,5,6,7,8)" --config.eval.targets="('weights',)"
done

# Number formats (issue 17): the kurtosis targets scored across integer, FP, MX and NVFP4 formats, per output
# channel (the integer grid's points: MSE steps; format points, int8/4/3 among them: max scaling), weights and
# weights + activations
evaluate formats "base baseline_s0 kure_s0 kure_t2.4 kure_t3 kure_t4 kure_t6" "${at_1[@]}" \
    --config.eval.granularity=channel --config.eval.bits="(3,4,8)" --config.eval.targets="('weights','both')" \
    --config.eval.formats="('int8','int4','int3','fp8_e4m3','fp6_e3m2','fp4_e2m1','mxfp8_e4m3','mxfp6_e3m2','mxfp4','nvfp4','mxint8')"

# QAT checkpoints, scored with their own (learned) steps: bit-widths weights-only (as the authors) and WkAk, and
# step ratios; DoReFa in both perturbation modes (symmetric: Δ = ratio·Δ̃; the authors' sliding grid)
dorefa=(--config.quant.method=dorefa --config.quant.dorefa_form=relus)
evaluate qat_bits_dorefa "qat_dorefa qat_dorefa_kure" "${dorefa[@]}" "${at_1[@]}" --config.eval.methods="('learned',)" \
    --config.eval.bits="(2,3,4,5,6,8)" --config.eval.targets="('weights','both')"
evaluate qat_bits_lsq "qat_lsq qat_lsq_kure" --config.quant.method=lsq "${at_1[@]}" \
    --config.eval.methods="('learned',)" --config.eval.bits="(2,3,4,5,6,8)" --config.eval.targets="('weights','both')"
evaluate qat_ratio_dorefa_symmetric "qat_dorefa qat_dorefa_kure" "${dorefa[@]}" "${ratios[@]}" \
    --config.eval.methods="('learned',)" --config.eval.bits="(4,)" --config.eval.targets="('weights',)"
evaluate qat_ratio_dorefa_sliding "qat_dorefa qat_dorefa_kure" "${dorefa[@]}" "${ratios[@]}" \
    --config.eval.methods="('learned',)" --config.eval.bits="(4,)" --config.eval.targets="('weights',)" \
    --config.eval.dorefa_mode=sliding
evaluate qat_ratio_lsq "qat_lsq qat_lsq_kure" --config.quant.method=lsq "${ratios[@]}" \
    --config.eval.methods="('learned',)" --config.eval.bits="(4,)" --config.eval.targets="('weights',)"
