#!/bin/bash
# launch_dp.sh N CMD [ARGS...]: data-parallel training on N GPUs of this host, one process of CMD per GPU
# (docs/training.md "Data-parallel training"), e.g.
#   scripts/launch_dp.sh 2 build-cuda/rwkvx train stage1.json
#   scripts/launch_dp.sh 8 build-cuda/tests/rwkvx_cuda_train_bench --batch 8 --contexts 4096
# Each process gets RANK = LOCAL_RANK = its index, WORLD_SIZE = N and RWKVX_DIST_INIT (a fresh
# rendezvous file under a temporary directory, unless the caller set one); CUDA_VISIBLE_DEVICES is left
# as it is (process r uses the r-th visible GPU). NVLink multicast stays off (NCCL_NVLS_ENABLE=0 unless
# set). When one process fails the others are killed and the script exits with that process's status;
# Ctrl-C reaches every process (they stop together at a step boundary and save a state).
set -u
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N CMD [ARGS...]   (N processes, one per GPU)" >&2
  exit 2
fi
n=$1
shift
tmpdir=
if [ -z "${RWKVX_DIST_INIT:-}" ]; then
  tmpdir=$(mktemp -d "${TMPDIR:-/tmp}/rwkvx-dp.XXXXXX")
  export RWKVX_DIST_INIT="file://$tmpdir/rendezvous"
fi
export WORLD_SIZE=$n
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

state=$(mktemp -d "${TMPDIR:-/tmp}/rwkvx-dp-state.XXXXXX")  # pid.R and status.R of each rank
kill_all() {
  for f in "$state"/pid.*; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done
  sleep 3
  for f in "$state"/pid.*; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null; done
}
finish() {
  rm -rf "$state"
  [ -n "$tmpdir" ] && rm -rf "$tmpdir"
  exit "$1"
}
interrupts=0
# Ctrl-C reaches every rank itself (same process group): `rwkvx train` stops all ranks at the same step,
# saves a state and exits 130. A second Ctrl-C here kills whatever still runs.
on_int() {
  interrupts=$((interrupts + 1))
  if [ "$interrupts" -ge 2 ]; then kill_all; finish 130; fi
  echo "launch_dp.sh: interrupted; waiting for the ranks to stop (Ctrl-C again kills them)" >&2
}
trap on_int INT
trap 'kill_all; finish 143' TERM

for ((r = 0; r < n; r++)); do
  (
    trap '' INT
    RANK=$r LOCAL_RANK=$r "$@" &
    echo $! > "$state/pid.$r"
    wait $!
    echo $? > "$state/status.$r.tmp" && mv "$state/status.$r.tmp" "$state/status.$r"
  ) &
done

# Poll: a rank that fails (status other than 0 or 130) takes the others down with it.
status=0
while :; do
  done_n=0
  for ((r = 0; r < n; r++)); do
    [ -f "$state/status.$r" ] || continue
    done_n=$((done_n + 1))
    st=$(cat "$state/status.$r")
    if [ "$st" -ne 0 ] && [ "$st" -ne 130 ]; then
      echo "launch_dp.sh: rank $r exited with status $st; stopping the others" >&2
      kill_all
      wait
      finish "$st"
    fi
    [ "$st" -eq 130 ] && status=130
  done
  [ "$done_n" -eq "$n" ] && break
  sleep 0.2
done
wait
finish "$status"
