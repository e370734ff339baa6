#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/fuzz_*.cpp) with clang++-14 into build-fuzz/, seeds their corpora
# and runs each target for a bounded time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=30] [TARGET...]
#
# Corpora live in build-fuzz/corpus/<target>/ (never in the repository): the golden checkpoints from
# ../shared/golden, the data.pkl of each golden .pth, small generated checkpoints (a 1-block RWKV-7 and a
# 2+2-block RWKV-X in both formats, hand-made pickles with strided / f16 / bf16 / parameter tensors) and,
# for fuzz_vocab, the first 2000 lines of the World vocabulary. Crash inputs go to
# build-fuzz/artifacts/<target>/, logs to build-fuzz/logs/<target>.log.
# Exit status: 0 when every target ran its time without a finding, 1 otherwise.
#
# Environment: RWKVX_SHARED_DIR (default ../shared beside the checkout), RWKVX_FUZZ_BUILD_DIR (default
# build-fuzz), JOBS (build parallelism), FUZZ_RSS_LIMIT_MB (default 4096).
set -euo pipefail

SECS="${1:-30}"
shift || true
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${RWKVX_FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
SHARED="${RWKVX_SHARED_DIR:-$ROOT/../shared}"
JOBS="${JOBS:-$(nproc)}"
RSS="${FUZZ_RSS_LIMIT_MB:-4096}"

command -v clang++-14 >/dev/null || { echo "fuzz.sh: clang++-14 not found (apt-get install clang-14)" >&2; exit 2; }

cmake -S "$ROOT" -B "$BUILD" -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DRWKVX_BUILD_FUZZ=ON -DRWKVX_BUILD_TESTS=OFF -DRWKVX_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD" --target fuzz_all -j "$JOBS"

mkdir -p "$BUILD/corpus" "$BUILD/artifacts" "$BUILD/logs"
seed() {  # seed <target> <file> [name]
  local dir="$BUILD/corpus/$1"
  mkdir -p "$dir"
  [ -f "$2" ] && install -m 0644 "$2" "$dir/${3:-$(basename "$(dirname "$2")")_$(basename "$2")}"
  return 0
}

for cs in rwkv7-tiny rwkvx-tiny; do
  seed fuzz_pth "$SHARED/golden/$cs/model.pth"
  seed fuzz_safetensors "$SHARED/golden/$cs/model.safetensors"
done
if [ -f "$SHARED/data/rwkv_vocab_v20230424.txt" ]; then
  mkdir -p "$BUILD/corpus/fuzz_vocab"
  head -n 2000 "$SHARED/data/rwkv_vocab_v20230424.txt" > "$BUILD/corpus/fuzz_vocab/vocab_head2000.txt"
  head -n 300 "$SHARED/data/rwkv_vocab_v20230424.txt" > "$BUILD/corpus/fuzz_vocab/vocab_head300.txt"
fi

# Small generated seeds (python3 only; torch is not needed: its pickle globals are faked by name).
if command -v python3 >/dev/null; then
  python3 - "$BUILD/corpus" "$SHARED" <<'PY'
import collections, json, os, pickle, struct, sys, types, zipfile

corpus, shared = sys.argv[1], sys.argv[2]
for t in ("fuzz_pth", "fuzz_safetensors", "fuzz_pickle"):
    os.makedirs(os.path.join(corpus, t), exist_ok=True)

# Fake torch modules so that pickle writes the same GLOBALs torch.save does.
torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
torch._utils = utils
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
for cls in ("FloatStorage", "HalfStorage", "BFloat16Storage"):
    c = type(cls, (), {})
    c.__module__ = "torch"
    setattr(torch, cls, c)

def _rebuild_tensor_v2(*a): pass
def _rebuild_parameter(*a): pass
for f in (_rebuild_tensor_v2, _rebuild_parameter):
    f.__module__ = "torch._utils"
    setattr(utils, f.__name__, f)

class Storage:
    def __init__(self, cls, key, numel): self.cls, self.key, self.numel = getattr(torch, cls), key, numel

class Tensor:
    def __init__(self, storage, offset, size, stride): self.args = (storage, offset, size, stride)
    def __reduce__(self): return (_rebuild_tensor_v2, self.args + (False, collections.OrderedDict()))

class Param:
    def __init__(self, t): self.t = t
    def __reduce__(self): return (_rebuild_parameter, (self.t, True, collections.OrderedDict()))

class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage): return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None

def dumps(d):
    import io
    b = io.BytesIO()
    Pickler(b, protocol=2).dump(d)
    return b.getvalue()

def write(path, data):
    with open(path, "wb") as f: f.write(data)

# Hand-made pickles for fuzz_pickle: its blobs are m/data/0..3 with 16, 32, 64, 128 bytes.
s0, s1, s2, s3 = Storage("FloatStorage", "0", 4), Storage("HalfStorage", "1", 16), \
    Storage("BFloat16Storage", "2", 32), Storage("FloatStorage", "3", 32)
pickles = {
    "contiguous": {"a": Tensor(s0, 0, (2, 2), (2, 1))},
    "strided": {"b": Tensor(s1, 0, (4, 4), (1, 4)), "c": Tensor(s2, 3, (5,), (2,)),
                "d": Param(Tensor(s3, 0, (4, 8), (8, 1)))},
    "shared_storage": {"e": Tensor(s3, 0, (0, 5), (5, 1)), "f": Tensor(s3, 4, (), ()),
                       "g": Tensor(s3, 1, (3, 2), (2, 1))},
}
for name, d in pickles.items():
    write(os.path.join(corpus, "fuzz_pickle", name + ".pkl"), dumps(d))
for cs in ("rwkv7-tiny", "rwkvx-tiny"):
    p = os.path.join(shared, "golden", cs, "model.pth")
    if os.path.exists(p):
        with zipfile.ZipFile(p) as z:
            for n in z.namelist():
                if n.endswith("/data.pkl"): write(os.path.join(corpus, "fuzz_pickle", cs + ".pkl"), z.read(n))

# Tiny but valid checkpoints (spec model.md §1.3), so that the fuzzers reach infer_config quickly.
def model_tensors(prefix, n_rwkv, n_moba, V=8, C=64, F=64, D=8):
    t = [(prefix + "emb.weight", (V, C)), (prefix + "blocks.0.ln0.weight", (C,)), (prefix + "blocks.0.ln0.bias", (C,))]
    for i in range(n_rwkv):
        b = f"{prefix}blocks.{i}."
        t += [(b + ln + s, (C,)) for ln in ("ln1", "ln2") for s in (".weight", ".bias")]
        t += [(b + "att." + x, (1, 1, C)) for x in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a")]
        lr = ("w", "a", "v", "g") if i > 0 else ("w", "a", "g")
        t += [(b + f"att.{x}1", (C, D)) for x in lr] + [(b + f"att.{x}2", (D, C)) for x in lr]
        if i > 0: t.append((b + "att.v0", (1, 1, C)))
        t += [(b + "att.r_k", (C // 64, 64))]
        t += [(b + f"att.{w}.weight", (C, C)) for w in ("receptance", "key", "value", "output")]
        t += [(b + "att.ln_x.weight", (C,)), (b + "att.ln_x.bias", (C,)), (b + "ffn.x_k", (1, 1, C)),
              (b + "ffn.key.weight", (F, C)), (b + "ffn.value.weight", (C, F))]
    for m in range(n_moba):
        b = f"moba.{m}."
        t += [(b + ln + s, (C,)) for ln in ("ln1", "ln2") for s in (".weight", ".bias")]
        t += [(b + f"att.{w}.weight", (C, C)) for w in ("receptance", "key", "value", "output")]
        t += [(b + "ffn.x_k", (1, 1, C)), (b + "ffn.key.weight", (F, C)), (b + "ffn.value.weight", (C, F))]
    t += [(prefix + "ln_out.weight", (C,)), (prefix + "ln_out.bias", (C,)), (prefix + "head.weight", (V, C))]
    return t

def numel(shape):
    n = 1
    for d in shape: n *= d
    return n

def strides(shape):
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= d
    return tuple(reversed(st))

def blob(n, esize, seed):
    return bytes(((i * 131 + seed * 17) % 251) & 0x3f for i in range(n * esize))  # small finite values

for name, prefix, n_rwkv, n_moba, dt in (("tiny_rwkv7", "", 1, 0, "F16"), ("tiny_rwkvx", "rwkv.", 2, 2, "BF16")):
    tensors = model_tensors(prefix, n_rwkv, n_moba)
    esize = 2
    # safetensors
    header, data = {}, bytearray()
    for k, (n, shape) in enumerate(tensors):
        b = blob(numel(shape), esize, k)
        header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    h = json.dumps(header, separators=(",", ":")).encode()
    write(os.path.join(corpus, "fuzz_safetensors", name + ".safetensors"), struct.pack("<Q", len(h)) + h + bytes(data))
    # pth
    cls = "HalfStorage" if dt == "F16" else "BFloat16Storage"
    d = {n: Tensor(Storage(cls, str(k), numel(shape)), 0, tuple(shape), strides(shape))
         for k, (n, shape) in enumerate(tensors)}
    path = os.path.join(corpus, "fuzz_pth", name + ".pth")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", dumps(d))
        z.writestr("archive/byteorder", "little")
        for k, (n, shape) in enumerate(tensors):
            z.writestr(f"archive/data/{k}", blob(numel(shape), esize, k))
        z.writestr("archive/version", "3\n")
PY
fi

max_len() {
  case "$1" in
    fuzz_pth|fuzz_safetensors) echo 4200000 ;;
    *) echo 65536 ;;
  esac
}

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for exe in "$BUILD"/fuzz/fuzz_*; do [ -x "$exe" ] && [ -f "$exe" ] && targets+=("$(basename "$exe")"); done
fi

failed=()
for t in "${targets[@]}"; do
  exe="$BUILD/fuzz/$t"
  mkdir -p "$BUILD/corpus/$t" "$BUILD/artifacts/$t"
  echo "== $t: ${SECS}s (corpus $(ls "$BUILD/corpus/$t" | wc -l) files, log $BUILD/logs/$t.log)"
  if "$exe" "$BUILD/corpus/$t" -max_total_time="$SECS" -max_len="$(max_len "$t")" -rss_limit_mb="$RSS" \
      -timeout=60 -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/$t/" >"$BUILD/logs/$t.log" 2>&1; then
    grep -E "^stat::number_of_executed_units|^Done" "$BUILD/logs/$t.log" | tr '\n' ' '
    echo
  else
    echo "!! $t FAILED (exit $?); last lines of $BUILD/logs/$t.log:"
    tail -n 40 "$BUILD/logs/$t.log"
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: findings in: ${failed[*]} (inputs in $BUILD/artifacts/)" >&2
  exit 1
fi
echo "fuzz.sh: all targets ran ${SECS}s without findings"
