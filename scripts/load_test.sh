#!/usr/bin/env bash
# Bounded load test of `rwkvx serve` on loopback: writes a tiny random model (World vocabulary, width
# 64), starts the server on a free port, runs bench/load_test (N concurrent streaming clients for S
# seconds), prints its report and stops the server with SIGTERM (graceful shutdown).
# Usage: scripts/load_test.sh [build-dir] [clients] [seconds] [max-tokens]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
clients=${2:-32}
seconds=${3:-60}
max_tokens=${4:-32}
cmake --build "$build" -j"$(nproc)" --target rwkvx load_test >/dev/null
work=$(mktemp -d)
trap 'kill "${server_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
"$build/bench/load_test" --write-model "$work/tiny.safetensors"
: >"$work/server.log"  # exists before the server's own redirect opens it, for the polling below
"$build/rwkvx" serve --model "$work/tiny.safetensors" --model-name tiny --host 127.0.0.1 --port 0 \
  --chunk-size 64 --max-concurrency "$clients" --max-tokens-limit 256 --prefix-cache-mib 64 \
  2>"$work/server.log" &
server_pid=$!
port=""
for _ in $(seq 1 200); do
  port=$(sed -n 's|.*http://127.0.0.1:\([0-9]*\)/v1.*|\1|p' "$work/server.log" || true)
  [[ -n "$port" ]] && break
  sleep 0.1
done
[[ -n "$port" ]] || { cat "$work/server.log"; echo "server did not start" >&2; exit 1; }
echo "server pid $server_pid on port $port"
status=0
"$build/bench/load_test" --port "$port" --clients "$clients" --seconds "$seconds" --max-tokens "$max_tokens" \
  --server-pid "$server_pid" || status=$?
kill -TERM "$server_pid"
wait "$server_pid" || true
server_pid=""
cat "$work/server.log"
exit $status
