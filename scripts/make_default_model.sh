#!/usr/bin/env bash
# Makes the default model (data/models/rwkvx-default.safetensors) from nothing, by the RWKV-X paper's
# recipe, with rwkvx alone: the exact commands, data and seeds behind the shipped file (README: model card).
#
#   bash scripts/make_default_model.sh [STEP...]   steps, in order: text data rwkv7 expand stage1 stage2
#                                                  stage2b eval ship (no STEP: all of them)
# Environment: RX (the rwkvx binary, default build/rwkvx; a -DRWKVX_CUDA=ON build for DEVICE=cuda),
# W (work folder, default work/default-model), DEVICE (cuda, the default, or cpu: same results up to
# rounding, about 20x slower on 16 cores), THREADS / PARALLEL (CPU threads and sequences trained at once;
# results do not depend on either). Token budgets: RWKV7_TOKENS, STAGE1_TOKENS, STAGE2_TOKENS, STAGE2B_TOKENS.
#
# Data (all public domain, from Debian 12 packages, see step_text) plus synthetic passkey documents made by
# `rwkvx passkey-data`. Model: RWKV-7 L4 D64 (one head of 64) with the World vocabulary (65536), trained
# from the official RWKV-7 init at ctx 512; then `rwkvx expand` adds 2 sparse-attention blocks (after RWKV
# blocks 1 and 3; chunk 64, top-k 3, stored in the checkpoint), stage 1 trains the new blocks only at ctx
# 512, stage 2 trains everything at ctx 4096 (two runs: the second restarts the learning-rate schedule at half
# the first's peak and visits the windows in another order). The RWKV-7 it was expanded from is the baseline of the
# evaluation (as in the paper). Every step is deterministic (fixed seeds, the trainer's data order
# is the magic prime's); a training step interrupted by SIGINT saves its state, and running the step again
# resumes it exactly. The `text` step needs Debian's packages (it installs them with apt); the others run
# anywhere, so `text` can run on one machine and the rest on a GPU machine with the texts copied over.
set -euo pipefail
cd "$(dirname "$0")/.."
RX=${RX:-build/rwkvx}
W=${W:-work/default-model}
THREADS=${THREADS:-$(nproc)}
DEVICE=${DEVICE:-cuda}
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
step_text() {
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
}

step_data() {
  local text=("$D/kjv-a.txt" "$D/kjv-b.txt" "$D/jargon.txt" "$D/devil.txt")
  local hay=(--haystack "$D/kjv-a.txt" --haystack "$D/jargon.txt" --haystack "$D/devil.txt")
  # Passkey documents: short ones (up to ~1/2 of ctx 512, keys of 1 to 6 digits) for the RWKV-7 and stage 1;
  # long ones (about 1/5 to all of ctx 4096, keys of 2 to 9 digits) for stage 2: too far and too long for
  # the small RWKV-7 state to keep, so the sparse attention has to learn to fetch and copy them. 40% are
  # in the exact evaluation form; in a tenth of the long ones the key sits exactly at the start or the end
  # of the filler (the evaluation's depths 0 and 1, which a uniform depth almost never gives).
  "$RX" passkey-data --out "$D/passkey-short.jsonl" --docs 56000 --seed 11 --min-chars 100 --max-chars 1700 "${hay[@]}"
  "$RX" passkey-data --out "$D/passkey-long.jsonl" --docs 32000 --seed 12 --min-chars 3000 --max-chars 15000 \
    --min-digits 2 --max-digits 9 --edge-depth-fraction 0.1 "${hay[@]}"
  # Four copies of the text (each file is one document) and one of the passkey documents, shuffled: text
  # is about 30% of train-short's tokens and 7% of train-long's.
  local text4=("${text[@]}" "${text[@]}" "${text[@]}" "${text[@]}")
  "$RX" data --input "${text4[@]}" --input "$D/passkey-short.jsonl" --out "$D/train-short" \
    --shuffle --seed 21 --align 512 --ctx-len 512
  "$RX" data --input "${text4[@]}" --input "$D/passkey-long.jsonl" --out "$D/train-long" \
    --shuffle --seed 22 --align 4096 --ctx-len 4096
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

# train NAME STAGE MODEL DATA CTX LR_INIT LR_FINAL TOKENS [LOSS]: one `rwkvx train` run (LOSS: JSON keys of the
# loss, default plain CE; + L2Wrap, batch 16, AdamW betas (0.9, 0.99), wd 1e-3, clip 1, token-cosine
# schedule with 20 warmup steps).
train() {
  run_train "$1" "{
  \"stage\": \"$2\", \"model\": \"$3\", \"data\": \"$4\", \"out_dir\": \"$1\", \"ctx_len\": $5, \"micro_bsz\": 16,
  \"device\": \"$DEVICE\", \"threads\": $THREADS, \"parallel_sequences\": ${PARALLEL:-$THREADS}, \"recompute\": false,
  ${9:-\"loss\": \"ce\"}, \"lr_init\": $6, \"lr_final\": $7, \"warmup_steps\": 20, \"tokens\": $8,
  \"save_every\": 1000, \"save_formats\": [\"safetensors\"], \"log_every\": 50
}"
}

RWKV7_TOKENS=${RWKV7_TOKENS:-14000000}
STAGE1_TOKENS=${STAGE1_TOKENS:-4000000}
STAGE2_TOKENS=${STAGE2_TOKENS:-56000000}
STAGE2B_TOKENS=${STAGE2B_TOKENS:-24000000}

step_rwkv7() {
  [ -f "$W/rwkv7-init.safetensors" ] ||
    "$RX" init --preset rwkv7-0.1b --n-layer 4 --n-embd 64 --init rwkv7 --seed 1 --dtype f32 \
      --out "$W/rwkv7-init.safetensors"
  train rwkv7 stage2 rwkv7-init.safetensors data/train-short 512 2e-3 2e-4 "$RWKV7_TOKENS"
}

step_expand() {
  "$RX" expand --model "$W/rwkv7/rwkv-final.safetensors" --out "$W/rwkvx-expanded.safetensors" \
    --sparse-layers 2 --init paper --chunk-size 64 --top-k 3
}

step_stage1() {
  train stage1 stage1 rwkvx-expanded.safetensors data/train-short 512 2e-3 2e-4 "$STAGE1_TOKENS"
}

step_stage2() {
  # LongCE (the paper's stage-2 loss) with a short truncated context: a token's weight is its probability
  # with the whole window over that with only the 512 tokens before it (capped at 10), so the answers
  # that need the far key count up to 10 times.
  train stage2 stage2 stage1/rwkv-final.safetensors data/train-long 4096 1e-3 1e-4 "$STAGE2_TOKENS" \
    '"loss": "longce", "longce_truncated": 512, "longce_window": 1024'
}

step_stage2b() {
  # Stage 2 again from its result, the schedule restarted at half the peak (a warm restart), and another
  # magic prime, so the windows come in a new order (about a third of them unseen by the first run). The
  # first run alone finds 87% of the keys at 32K (8x its ctx); this one finds all of them
  # (BENCHMARKS.md, "Training the default model on one GPU").
  train stage2b stage2 stage2/rwkv-final.safetensors data/train-long 4096 5e-4 5e-5 "$STAGE2B_TOKENS" \
    '"loss": "longce", "longce_truncated": 512, "longce_window": 1024, "magic_prime": 21767'
}

# ---- evaluation ------------------------------------------------------------------------------------
step_eval() {
  local e=$W/eval lengths=1K,2K,4K,8K,16K,32K,64K depths=0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1
  mkdir -p "$e"
  local names=(rwkvx rwkv7) ms=()
  local files=("$W/stage2b/rwkv-final.safetensors" "$W/rwkv7/rwkv-final.safetensors")
  for i in 0 1; do
    ms+=(-m "${files[$i]}")
    "$RX" eval passkey --device "$DEVICE" -m "${files[$i]}" --lengths $lengths --depths $depths --trials 5 \
      --out-png "$e/passkey-${names[$i]}.png" | tee "$e/passkey-${names[$i]}.txt"
  done
  "$RX" eval loss --device "$DEVICE" "${ms[@]}" --data "$D/heldout" --ctx 16384 \
    --buckets 512,1024,2048,4096,8192,16384 --skip 0 --out-png "$e/loss.png" | tee "$e/loss.txt"
}

# ---- ship ------------------------------------------------------------------------------------------
step_ship() {
  mkdir -p data/models
  cp "$W/stage2b/rwkv-final.safetensors" data/models/rwkvx-default.safetensors
  "$RX" info -m data/models/rwkvx-default.safetensors
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(text data rwkv7 expand stage1 stage2 stage2b eval ship)
for s in "${steps[@]}"; do
  log "step $s"
  "step_$s"
done
