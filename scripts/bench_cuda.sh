#!/usr/bin/env bash
# One device run: CUDA prefill tokens/s for RWKV-X 0.2B (random weights, real shapes) at 4K/16K/64K/128K
# and decode ms/token at a short and a 128K context, through `rwkvx bench --device cuda`.
# Usage: scripts/bench_cuda.sh [path/to/rwkvx] [work dir]
#   RWKVX_BENCH_PREFILL (default 4K,16K,64K,128K), RWKVX_BENCH_LONG_CONTEXT (default 128K; empty = skip)
# Build first with -DRWKVX_CUDA=ON (README, "CUDA backend").
set -euo pipefail
rwkvx=${1:-build-cuda/rwkvx}
work=${2:-/tmp/rwkvx-bench-cuda}
prefill=${RWKVX_BENCH_PREFILL:-4K,16K,64K,128K}
long=${RWKVX_BENCH_LONG_CONTEXT-131072}
mkdir -p "$work"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
model="$work/rwkvx-0.2b.safetensors"
[ -f "$model" ] || "$rwkvx" init --preset rwkvx-0.2b --out "$model"
echo "== prefill ($prefill) and decode after 4K tokens"
"$rwkvx" bench --device cuda --model "$model" --prefill "$prefill" --decode 64 --context 4096 --repeat 3
if [ -n "$long" ]; then
  echo "== decode after $long tokens"
  "$rwkvx" bench --device cuda --model "$model" --prefill 1 --repeat 1 --decode 64 --context "$long"
fi
