#!/usr/bin/env bash
# Makes the default model (data/models/rwkvx-default.safetensors) from nothing, by the RWKV-X paper's
# recipe, with rwkvx alone: the exact commands, data and seeds behind the shipped file (README: model card).
#
#   bash scripts/make_default_model.sh [STEP...]      steps, in order: data rwkv7 expand stage1 stage2 eval ship
#                                                     (no STEP: all of them)
# Environment: RX (the rwkvx binary, default build/rwkvx), W (work folder, default work/default-model),
# THREADS (training threads, default: the processor count) and PARALLEL (sequences trained at once,
# default THREADS); results do not depend on either.
#
# Data (all public domain, from Debian 12 packages, see step_data) plus synthetic passkey documents made by
# `rwkvx passkey-data`. Model: RWKV-7 L4 D64 (one head of 64) with the World vocabulary (65536), trained
# from the official RWKV-7 init; then `rwkvx expand` adds 2 sparse-attention blocks (after RWKV blocks 1
# and 3; chunk 64, top-k 3, stored in the checkpoint), stage 1 trains the new blocks only at ctx 512,
# stage 2 trains everything at ctx 1024. Every step is deterministic (fixed seeds, the trainer's data order
# is the magic prime's); a training step interrupted by SIGINT saves its state, and running the step again
# resumes it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
RX=${RX:-build/rwkvx}
W=${W:-work/default-model}
THREADS=${THREADS:-$(nproc)}
D=$W/data
mkdir -p "$W" "$D"
log() { printf '\n== %s\n' "$*" >&2; }

# ---- data -----------------------------------------------------------------------------------------
# bible-kjv-text (+ bible-kjv, which prints it): the King James Version (1611); its copyright file: "The
#   copyright for the King James Version text of the Bible is expired".
# jargon-text: the Jargon File 4.4.7; copyright file: "This document (the Jargon File) is in the public
#   domain".
# dict-devil: Ambrose Bierce, The Devil's Dictionary (1911); copyright file: "The Devil's Dictionary is in
#   the public domain, its copyright has expired".
# Held out, never trained on: the KJV Gospels of Luke and John and the Acts of the Apostles.
step_data() {
  local pkgs=(bible-kjv bible-kjv-text jargon-text dict-devil)
  if ! dpkg -s "${pkgs[@]}" >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    $sudo apt-get install -y -q "${pkgs[@]}"
  fi
  # One verse per line without its number; "Book N" chapter headings kept.
  kjv() { bible -l100000 "$1" | sed -E 's/^ +[0-9]+ //'; }
  kjv "gen1:1-mark16:20" > "$D/kjv-a.txt"
  kjv "rom1:1-rev22:21" > "$D/kjv-b.txt"
  kjv "luke1:1-luke24:53" > "$D/heldout-luke.txt"
  kjv "john1:1-john21:25" > "$D/heldout-john.txt"
  kjv "acts1:1-acts28:31" > "$D/heldout-acts.txt"
  zcat /usr/share/doc/jargon-text/jargon.txt.gz > "$D/jargon.txt"
  zcat /usr/share/dictd/devil.dict.dz > "$D/devil.txt"
  local text=("$D/kjv-a.txt" "$D/kjv-b.txt" "$D/jargon.txt" "$D/devil.txt")
  local hay=(--haystack "$D/kjv-a.txt" --haystack "$D/jargon.txt" --haystack "$D/devil.txt")
  # Passkey documents: short ones (up to ~1/3 of ctx 512) for the RWKV-7 and stage 1, longer ones (up to
  # ~3/4 of ctx 1024) for stage 2; keys of 1 to 6 digits; 40% in the exact evaluation form.
  "$RX" passkey-data --out "$D/passkey-short.jsonl" --docs 12000 --seed 11 --min-chars 100 --max-chars 650 "${hay[@]}"
  "$RX" passkey-data --out "$D/passkey-long.jsonl" --docs 4000 --seed 12 --min-chars 600 --max-chars 2800 "${hay[@]}"
  "$RX" data --input "${text[@]}" --input "$D/passkey-short.jsonl" --out "$D/train-short" \
    --shuffle --seed 21 --epochs 4 --align 512 --ctx-len 512
  "$RX" data --input "${text[@]}" --input "$D/passkey-long.jsonl" --out "$D/train-long" \
    --shuffle --seed 22 --epochs 2 --align 1024 --ctx-len 1024
  "$RX" data --input "$D/heldout-luke.txt" --input "$D/heldout-john.txt" --input "$D/heldout-acts.txt" \
    --out "$D/heldout"
}

# ---- training ------------------------------------------------------------------------------------
# run_train NAME JSON: writes $W/NAME.json and trains (resuming NAME's out_dir if it holds a state).
run_train() {
  local name=$1 json=$2 cfg=$W/$1.json
  printf '%s\n' "$json" > "$cfg"
  if ls -d "$W/$name"/state-* >/dev/null 2>&1; then
    "$RX" train "$cfg" --resume "$W/$name"
  else
    "$RX" train "$cfg"
  fi
}

step_rwkv7() {
  [ -f "$W/rwkv7-init.safetensors" ] ||
    "$RX" init --preset rwkv7-0.1b --n-layer 4 --n-embd 64 --init rwkv7 --seed 1 --dtype f32 \
      --out "$W/rwkv7-init.safetensors"
  run_train rwkv7 "{
  \"stage\": \"stage2\", \"model\": \"rwkv7-init.safetensors\", \"data\": \"data/train-short\",
  \"out_dir\": \"rwkv7\", \"ctx_len\": 512, \"micro_bsz\": 16, \"threads\": $THREADS, \"parallel_sequences\": ${PARALLEL:-$THREADS}, \"recompute\": false,
  \"loss\": \"ce\", \"lr_init\": 2e-3, \"lr_final\": 2e-4, \"warmup_steps\": 20, \"tokens\": ${RWKV7_TOKENS:-819200},
  \"steps\": ${RWKV7_STEPS:-0}, \"save_every\": 50, \"save_formats\": [\"safetensors\"], \"log_every\": 10
}"
}

step_expand() {
  "$RX" expand --model "$W/rwkv7/rwkv-final.safetensors" --out "$W/rwkvx-expanded.safetensors" \
    --sparse-layers 2 --init paper --chunk-size 64 --top-k 3
}

step_stage1() {
  run_train stage1 "{
  \"stage\": \"stage1\", \"model\": \"rwkvx-expanded.safetensors\", \"data\": \"data/train-short\",
  \"out_dir\": \"stage1\", \"ctx_len\": 512, \"micro_bsz\": 16, \"threads\": $THREADS, \"parallel_sequences\": ${PARALLEL:-$THREADS}, \"recompute\": false,
  \"loss\": \"ce\", \"lr_init\": 2e-3, \"lr_final\": 2e-4, \"warmup_steps\": 10, \"tokens\": ${STAGE1_TOKENS:-245760},
  \"steps\": ${STAGE1_STEPS:-0}, \"save_every\": 50, \"save_formats\": [\"safetensors\"], \"log_every\": 10
}"
}

step_stage2() {
  run_train stage2 "{
  \"stage\": \"stage2\", \"model\": \"stage1/rwkv-final.safetensors\", \"data\": \"data/train-long\",
  \"out_dir\": \"stage2\", \"ctx_len\": 1024, \"micro_bsz\": 16, \"threads\": $THREADS, \"parallel_sequences\": ${PARALLEL:-$THREADS}, \"recompute\": false,
  \"loss\": \"ce\", \"lr_init\": 1e-3, \"lr_final\": 1e-4, \"warmup_steps\": 10, \"tokens\": ${STAGE2_TOKENS:-851968},
  \"steps\": ${STAGE2_STEPS:-0}, \"save_every\": 50, \"save_formats\": [\"safetensors\"], \"log_every\": 10
}"
}

# ---- evaluation ------------------------------------------------------------------------------------
step_eval() {
  local x=$W/stage2/rwkv-final.safetensors r=$W/rwkv7/rwkv-final.safetensors e=$W/eval
  mkdir -p "$e"
  local lengths=1K,2K,4K,8K,16K depths=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
  "$RX" eval passkey -m "$x" --lengths $lengths --depths $depths --trials 5 --out-png "$e/passkey-rwkvx.png" \
    --json > "$e/passkey-rwkvx.json"
  "$RX" eval passkey -m "$r" --lengths $lengths --depths $depths --trials 5 --out-png "$e/passkey-rwkv7.png" \
    --json > "$e/passkey-rwkv7.json"
  "$RX" eval loss -m "$x" -m "$r" --data "$D/heldout" --ctx 16384 --buckets 512,1024,2048,4096,8192,16384 \
    --skip 0 --out-png "$e/loss.png" --json > "$e/loss.json"
}

# ---- ship ------------------------------------------------------------------------------------------
step_ship() {
  mkdir -p data/models
  cp "$W/stage2/rwkv-final.safetensors" data/models/rwkvx-default.safetensors
  "$RX" info -m data/models/rwkvx-default.safetensors
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(data rwkv7 expand stage1 stage2 eval ship)
for s in "${steps[@]}"; do
  log "step $s"
  "step_$s"
done
