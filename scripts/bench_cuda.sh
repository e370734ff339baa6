#!/usr/bin/env bash
# One device run: CUDA prefill tokens/s for RWKV-X 0.2B (random weights, real shapes) at 4K/16K/64K/128K
# and decode ms/token at a short and a 128K context, through `rwkvx bench --device cuda`; then the decode
# benchmark (rwkvx_cuda_decode_bench, built beside the tests): single-stream decode through the fused
# whole-step decoder replayed as a CUDA graph and op by op, a ~1M-token context, batched decode throughput
# at batch 1/8/64/256 with device memory, every row against its memory-bandwidth floor (bandwidth measured
# in the same run); then the peers at the same shapes (RWKVX_BENCH_PEERS=1): rwkvx's CUDA ops
# (bench_cuda_ops: one layer's WKV-7 recurrence and sparse-attention prefill) beside PyTorch SDPA causal
# attention, fla chunk_rwkv7 and the official rwkv-x package's whole-model prefill/decode
# (scripts/peers/gpu_peers.py).
# Usage: scripts/bench_cuda.sh [path/to/rwkvx] [work dir] [path/to/rwkvx_cuda_decode_bench]
#   RWKVX_BENCH_PREFILL (default 4K,16K,64K,128K; empty = skip the prefill run)
#   RWKVX_BENCH_LONG_CONTEXT (default 128K; empty = skip)
#   RWKVX_BENCH_DECODE_LONG (default 1048000: the ~1M-token decode; 0 = skip)
#   RWKVX_BENCH_BATCHES (default 1,8,64,256), RWKVX_BENCH_BATCH_CONTEXT (default 2000)
#   RWKVX_BENCH_TRAIN_CONTEXTS (default 4096,65536; empty = skip the training benchmark),
#   RWKVX_OFFICIAL_SRC: a checkout of howard-hou/RWKV-X's pretrain/ code for the official-trainer peer
#   RWKVX_BENCH_PEERS (1 = run the peers), RWKVX_PEER_TOKENS (default 4096,16384,65536,131072),
#   RWKVX_PEER_WHEELS: a folder of the wheels the device image lacks, installed first (fetched beforehand
#   on a machine with network: pip download --no-deps fla-core==0.6.0 rwkv-x==0.1.3)
# Build first with -DRWKVX_CUDA=ON (README, "CUDA backend").
set -euo pipefail
rwkvx=${1:-build-cuda/rwkvx}
work=${2:-/tmp/rwkvx-bench-cuda}
dbench=${3:-$(dirname "$rwkvx")/tests/rwkvx_cuda_decode_bench}
prefill=${RWKVX_BENCH_PREFILL-4K,16K,64K,128K}
long=${RWKVX_BENCH_LONG_CONTEXT-131072}
dlong=${RWKVX_BENCH_DECODE_LONG-1048000}
batches=${RWKVX_BENCH_BATCHES-1,8,64,256}
bctx=${RWKVX_BENCH_BATCH_CONTEXT-2000}
mkdir -p "$work"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
model="$work/rwkvx-0.2b.safetensors"
[ -f "$model" ] || "$rwkvx" init --preset rwkvx-0.2b --out "$model"
if [ -n "$prefill" ]; then
  echo "== prefill ($prefill) and decode after 4K tokens"
  "$rwkvx" bench --device cuda --model "$model" --prefill "$prefill" --decode 64 --context 4096 --repeat 3
fi
if [ -n "$long" ]; then
  echo "== decode after $long tokens"
  "$rwkvx" bench --device cuda --model "$model" --prefill 1 --repeat 1 --decode 64 --context "$long"
fi
if [ -x "$dbench" ]; then
  echo "== decode benchmark: fused step decoder without a graph (kernels launched one by one), 4K context"
  "$dbench" "$model" --contexts 4096 --op-contexts "" --batches 1,8 --batch-context "$bctx" --no-graph
  echo "== decode benchmark: fused step decoder as a CUDA graph vs op by op; ~1M context; batches $batches"
  "$dbench" "$model" --contexts 4096,131072 --op-contexts 4096,131072 --long "$dlong" --batches "$batches" \
    --batch-context "$bctx"
else
  echo "no decode benchmark binary at $dbench (build the tests with -DRWKVX_CUDA=ON)"
fi
tbench=${RWKVX_TRAIN_BENCH:-$(dirname "$dbench")/rwkvx_cuda_train_bench}
tctx=${RWKVX_BENCH_TRAIN_CONTEXTS-4096,65536}
if [ -n "$tctx" ] && [ -x "$tbench" ]; then
  echo "== training steps (forward, backward, AdamW), RWKV-X 0.2B, batch 1, contexts $tctx"
  "$tbench" --preset rwkvx-0.2b --contexts "$tctx" --steps 3
fi
if [ "${RWKVX_BENCH_PEERS:-0}" = 1 ] && [ -n "$tctx" ] && [ -n "${RWKVX_OFFICIAL_SRC:-}" ]; then
  echo "== peer: the official RWKV-X PyTorch trainer (sources at \$RWKVX_OFFICIAL_SRC), same shapes"
  python3 "$(dirname "$0")/peers/train_official.py" --official-src "$RWKVX_OFFICIAL_SRC" --ctx "$tctx" --steps 3 || true
fi
if [ "${RWKVX_BENCH_PEERS:-0}" = 1 ]; then
  ptokens=${RWKVX_PEER_TOKENS:-4096,16384,65536,131072}
  if [ -n "${RWKVX_PEER_WHEELS:-}" ]; then
    python3 -m pip install --quiet --no-deps --no-index "$RWKVX_PEER_WHEELS"/*.whl 2>&1 | tail -3 || true
  fi
  echo "== rwkvx CUDA ops (C 768, 12 heads of 64; sparse attention chunk 2048, top-k 3)"
  "$(dirname "$rwkvx")/bench/bench_cuda_ops" --tokens "$ptokens" --repeat 5
  echo "== peers: SDPA causal attention, fla chunk_rwkv7, official rwkv-x (same model file)"
  python3 "$(dirname "$0")/peers/gpu_peers.py" --model "$model" --tokens "$ptokens" --repeat 5
fi
