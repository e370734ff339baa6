#!/usr/bin/env bash
# First run on a fresh machine: install dependencies, build, and run the shipped default model
# (data/models/rwkvx-default.safetensors, a small RWKV-X trained by rwkvx itself; see the README's model
# card): text generation from a prompt, then a short passkey-retrieval demonstration that prints, for
# keys hidden at several depths of long prompts, what the model answers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j"$(nproc)" --target rwkvx
rx=build/rwkvx

echo
echo "== the default model"
"$rx" info

echo
echo "== text generation (prompt: \"In the beginning\"; sampling seeded, so the text is reproducible)"
"$rx" generate --prompt "In the beginning" --max-tokens 80 --seed 1
echo

echo
echo "== passkey retrieval: a 5-digit key hidden at depth 20%, 50% and 80% of prompts of about 1K and 8K"
echo "   tokens (the evaluation's filler, spec system.md §5.1); greedy answers"
"$rx" eval passkey --lengths 1K,8K --depths 0.2,0.5,0.8 --trials 2 --verbose
