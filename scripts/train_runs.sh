# Shared by the study scripts (sourced, not run): `wanted NAME` and `run NAME OVERRIDES...`.
# The sourcing script sets $out (the runs folder) and the array `common` (train.py's arguments for every run);
# ONLY="a b" restricts the runs. With $shipped set (e.g. weights/study_), a run whose weights are shipped as
# ${shipped}NAME is final and skipped too: a study continues on a machine that has the repository but not its runs.

wanted() { [[ -z ${ONLY:-} || " $ONLY " == *" $1 "* ]]; }

shipped() { [[ -n ${shipped:-} && -f "${shipped}$1/variables.msgpack" ]]; }

run() {  # run NAME OVERRIDES...: one train.py run in $out/NAME, skipped when done, timed
  local name=$1; shift
  wanted "$name" || return 0
  [[ -f "$out/$name/done" ]] && return 0
  shipped "$name" && return 0
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
