#!/usr/bin/env bash
# One device run: rwkvx's CUDA op timings (bench_cuda_ops: WKV-7 prefill recurrence, one sparse-attention
# layer's prefill) and the GPU peers at the same shapes, in the same run (scripts/peers/gpu_peers.py:
# PyTorch SDPA causal attention, fla chunk_rwkv7, the official rwkv-x package's whole-model prefill/decode).
# Usage: scripts/bench_cuda_peers.sh [build dir with -DRWKVX_CUDA=ON] [wheel dir]
#   RWKVX_PEER_TOKENS (default 4096,16384,65536,131072), RWKVX_OFFICIAL_TOKENS (default the same)
# The wheel dir holds what the device image lacks (fla-core, rwkv-x), fetched beforehand on
# a machine with network (einops and ninja are on the device image already):
#   pip download --no-deps fla-core==0.6.0 rwkv-x==0.1.3
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build-cuda}
wheels=${2:-}
tokens=${RWKVX_PEER_TOKENS:-4096,16384,65536,131072}
official=${RWKVX_OFFICIAL_TOKENS:-$tokens}
work=${RWKVX_BENCH_WORK:-/tmp/rwkvx-bench-cuda}
mkdir -p "$work"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "$wheels" ]; then
  python3 -m pip install --quiet --no-deps --no-index "$wheels"/*.whl 2>&1 | tail -3 || true
  export PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
fi
model="$work/rwkvx-0.2b.safetensors"
[ -f "$model" ] || "$build/rwkvx" init --preset rwkvx-0.2b --out "$model"
echo "== rwkvx CUDA ops (C 768, 12 heads of 64; sparse attention chunk 2048, top-k 3)"
"$build/bench/bench_cuda_ops" --tokens "$tokens" --repeat 5
echo "== peers"
python3 scripts/peers/gpu_peers.py --model "$model" --tokens "$tokens" --official-tokens "$official" --repeat 5
echo "== rwkvx whole-model prefill at the official lengths"
"$build/rwkvx" bench --device cuda --model "$model" --prefill "$official" --decode 32 --repeat 3
