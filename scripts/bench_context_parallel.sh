#!/bin/bash
# bench_context_parallel.sh RWKVX [N] [MODEL]: N-token prefill (default 1M) of a random RWKV-X 0.2B (or
# MODEL) on 1 GPU (Model::forward) and context parallel on 2 GPUs, fp32 and bf16 KV caches, and a bitwise
# comparison of the last token's logits (README "Context-parallel prefill"). NCCL: libnccl.so.2 on the
# library path or RWKVX_NCCL_LIBRARY; NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
set -u
X=${1:?usage: $0 RWKVX [N] [MODEL]}; N=${2:-1M}; M=${3:-}
export NCCL_NVLS_ENABLE=0
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
if [ -z "$M" ]; then M=$T/m.safetensors; "$X" init --preset rwkvx-0.2b --out "$M" --seed 1 >/dev/null || exit 1; fi
L="bash $(dirname "$0")/launch_dp.sh"
P="prefill --device cuda -m $M --tokens $N"
for kv in f32 bf16; do
  "$X" $P --kv-dtype $kv --out-logits "$T/one.$kv"
  $L 2 "$X" $P --kv-dtype $kv --context-parallel --out-logits "$T/two.$kv"
  cmp "$T/one.$kv" "$T/two.$kv" && echo "kv $kv: last logits of 1 GPU and 2 GPUs are bitwise identical"
done
