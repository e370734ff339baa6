#!/usr/bin/env python3
"""Times the official `rwkv-x` Python package (0.1.3, the MoBA version the spec describes) on the CPU,
for the side-by-side numbers in BENCHMARKS.md. Benchmark tooling only: rwkvx never needs Python.

Usage (inside a virtualenv with torch and rwkv-x==0.1.3, see scripts/peers/setup_venv.sh):
  official_rwkvx_cpu.py MODEL.safetensors --prefill 512 --decode 32 --threads 2 [--dtype fp32|bf16]
The .safetensors file (e.g. from `rwkvx init`) is converted to the .pth layout the package loads.
Prints one JSON object: prefill tokens/s and decode ms/token (median).
"""
import argparse
import json
import os
import statistics
import struct
import sys
import tempfile
import time

import torch


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[b:e]), dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from rwkv_x.model import RWKV_X, RWKV_X_Config  # noqa: E402

    tensors = load_safetensors(args.model)
    with tempfile.TemporaryDirectory() as d:
        pth = os.path.join(d, "model.pth")
        torch.save(tensors, pth)
        cfg = RWKV_X_Config(moba_chunk_size=args.chunk_size, moba_topk=args.top_k, max_kv_cache_size=0)
        model = RWKV_X(pth, f"cpu {args.dtype}", config=cfg)
    vocab = tensors["rwkv.emb.weight"].shape[0]
    ids = [(i * 7919) % vocab for i in range(args.prefill + args.decode)]
    t0 = time.perf_counter()
    logits, state = model.forward(ids[: args.prefill], None)
    prefill_s = time.perf_counter() - t0
    steps = []
    for i in range(args.decode):
        t0 = time.perf_counter()
        logits, state = model.forward(ids[args.prefill + i], state)
        steps.append(time.perf_counter() - t0)
    print(json.dumps({
        "peer": "rwkv-x 0.1.3 (official, PyTorch %s CPU, %s, %d threads)" % (torch.__version__, args.dtype, args.threads),
        "prefill_tokens": args.prefill, "prefill_tokens_per_s": args.prefill / prefill_s,
        "decode_steps": args.decode, "decode_ms_per_token": statistics.median(steps) * 1e3,
    }))


if __name__ == "__main__":
    sys.exit(main())
