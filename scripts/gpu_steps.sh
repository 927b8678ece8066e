#!/usr/bin/env bash
# Runs named steps one after another under one deadline and packs every log and result into
# $OUT/results.tgz (the device tool returns only a few files, so everything travels in one tarball).
#   OUT=/dir DEADLINE_S=540 bash scripts/gpu_steps.sh NAME MAX_S 'command' [NAME MAX_S 'command' ...]
# Each step gets the smaller of MAX_S and the time left, logs to NAME.log, and may write files to $OUT
# (exported as the step's result folder); returns the command's exit status. Sourced by scripts/gpu_checks_x2.sh for its `step` function.
set -uo pipefail
ROOT=${OUT:-runs/gpu_steps}
export OUT=$ROOT/r
mkdir -p "$OUT"
END=$((SECONDS + ${DEADLINE_S:-540}))
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

# step NAME MAX_S CMD...: runs CMD with the smaller of MAX_S and the time left, logs to $OUT/NAME.log
step() {
  local name=$1 max=$2; shift 2
  local left=$((END - SECONDS - 5)); local t=$((max < left ? max : left))
  if ((t < 20)); then echo "[skip] $name (no time left)" | tee -a "$OUT/steps.txt"; return 1; fi
  local t0=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "[rc=$rc ${name} $((SECONDS - t0))s of ${t}s]" | tee -a "$OUT/steps.txt"
  return $rc
}

pack() {
  tar czf "$ROOT/results.tgz" -C "$OUT" . && rm -rf "$OUT" && echo "packed $(du -h "$ROOT/results.tgz" | cut -f1)"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
  while (($# >= 3)); do step "$1" "$2" bash -c "$3"; shift 3; done
  pack
fi
