#!/usr/bin/env bash
# The stage-1 recipe study (docs/KFORCING-notes.md): each ARM is configs/study/s1-ARM.json,
# distilled from the shipped teacher (models/default/teacher) to k = 1, one after another, on
# one thread each (so the machine keeps a core), resumable (rerun to continue an arm).
#
#   tools/recipes/study.sh RUNS_DIR SHARDS ARM [ARM ...]
#   python3 tools/recipes/study_table.py RUNS_DIR       # the table
#
# SHARDS: `kfrun data prepare` output made with models/default/teacher/tokenizer.json.
set -u
here="$(cd "$(dirname "$0")/../.." && pwd)"
kfrun="${KFRUN:-$here/target/release/kfrun}"
runs="$1"; shards="$2"; shift 2
mkdir -p "$runs"
for arm in "$@"; do
  "$kfrun" --threads 1 distill --teacher "$here/models/default/teacher" --k 1 \
    --data "$shards" --tokenizer "$here/models/default/teacher/tokenizer.json" \
    --recipe "$here/configs/study/s1-$arm.json" --out "$runs/$arm" --resume >> "$runs/$arm.log" 2>&1
  echo "$arm rc=$? $(date)" >> "$runs/done.log"
done
