#!/usr/bin/env bash
# First run on a fresh machine: install dependencies, build, and run the engine end to end.
# Until the trained default model ships (issue 8), the model is a random-weight RWKV-X of tiny size
# with the real World vocabulary: the output tokens are meaningless, the pipeline is real.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target rwkvx
rx=build/rwkvx
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$rx" init --preset rwkvx-tiny --out "$work/model.safetensors" --seed 7 >/dev/null
# The tiny preset has a 300-token vocabulary; keep the ids of the tokenized prompt inside it.
prompt="User: What is the pass key?\n\nAssistant:"
printf '%b' "$prompt" | "$rx" tokenize | tr -d '[],' | tr ' ' '\n' | awk 'NF {print $1 % 300}' > "$work/tokens.txt"
echo "prompt tokens: $(wc -w < "$work/tokens.txt")"
"$rx" info --model "$work/model.safetensors" --chunk-size 4 --top-k 3
"$rx" logits --model "$work/model.safetensors" --tokens-file "$work/tokens.txt" --out "$work/prefill.f32" --chunk-size 4
"$rx" logits --model "$work/model.safetensors" --tokens-file "$work/tokens.txt" --out "$work/decode.f32" --chunk-size 4 --mode decode
if cmp -s "$work/prefill.f32" "$work/decode.f32"; then
  echo "prefill and token-by-token decode give bit-identical logits ($(stat -c %s "$work/prefill.f32") bytes)"
else
  echo "prefill and decode differ" >&2
  exit 1
fi
