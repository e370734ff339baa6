#!/usr/bin/env python3
"""GPU peers for the CUDA side-by-side table (issue 6), timed in the same device run as rwkvx
(scripts/bench_cuda.sh calls this after bench_cuda_ops). Benchmark tooling only: rwkvx never needs Python.

  * PyTorch SDPA, full causal attention of one layer (12 heads of 64, bf16), per backend (flash, cuDNN,
    memory-efficient): what a dense long-context model pays where RWKV-X uses its sparse attention.
  * fla `chunk_rwkv7` (flash-linear-attention's chunked WKV-7, Triton), bf16, 12 heads of 64: the peer of
    rwkvx's WKV-7 prefill kernel.
  * The official `rwkv-x` 0.1.3 package on CUDA (bf16, RWKV_CUDA_ON=1: its own WKV-7 kernel, built with
    torch.utils.cpp_extension): prefill tokens/s of the whole model, and decode ms/token after it.

Usage: gpu_peers.py [--model M.safetensors] [--tokens 4096,16384,65536,131072] [--repeat 5]
                    [--official-tokens 4096,16384,65536,131072] [--skip sdpa,fla,official]
The wheels the device image lacks (fla-core, rwkv-x) are installed beforehand by
scripts/bench_cuda.sh (RWKVX_PEER_WHEELS) from a folder of wheels (pip download on a machine with network).
Prints one JSON object per line; a peer that cannot run prints {"peer": ..., "error": ...} and the rest go on.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from official_rwkvx_cpu import load_safetensors  # beside this file: same reader, same .pth conversion

H, D = 12, 64


def emit(**kv):
    print(json.dumps(kv), flush=True)


def cuda_ms(fn, repeat, warmup=2):
    """Median wall time of fn() in ms, timed with CUDA events (fn runs on the current stream)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_sdpa(tokens, repeat):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        q, k, v = (torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        flops = 4.0 * D * H * T * (T + 1) / 2  # causal: T(T+1)/2 (query, key) pairs
        for name, be in backends.items():
            try:
                with sdpa_kernel(be):
                    ms = cuda_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                 repeat)
                emit(peer="sdpa_causal", backend=name, T=T, ms=ms, tokens_per_s=T / ms * 1e3, tflops=flops / ms * 1e-9)
            except Exception as e:  # a backend may not support the shape or this GPU
                emit(peer="sdpa_causal", backend=name, T=T, error=str(e).splitlines()[0][:200])
        del q, k, v
        torch.cuda.empty_cache()


def bench_fla(tokens, repeat):
    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as e:
        emit(peer="fla_chunk_rwkv7", error="import: " + str(e).splitlines()[0][:200])
        return
    import fla
    for T in tokens:
        g = torch.Generator(device="cuda").manual_seed(T)
        def rnd(lo, hi):
            return (torch.rand(1, T, H, D, device="cuda", generator=g) * (hi - lo) + lo).to(torch.bfloat16)
        r, k, v = rnd(-1, 1), rnd(-0.2, 0.2), rnd(-1, 1)
        w = torch.log(torch.rand(1, T, H, D, device="cuda", generator=g) * 0.499 + 0.5).to(torch.bfloat16)  # log decay
        kk = torch.nn.functional.normalize(rnd(-1, 1).float(), dim=-1)
        a, b = (-kk).to(torch.bfloat16), (kk * 0.5).to(torch.bfloat16)  # the model's α = −k̂, β = k̂·a
        s0 = torch.zeros(1, H, D, D, device="cuda", dtype=torch.float32)
        try:
            ms = cuda_ms(lambda: chunk_rwkv7(r, w, k, v, a, b, scale=1.0, initial_state=s0, output_final_state=True),
                         repeat)
            emit(peer="fla_chunk_rwkv7", version=fla.__version__, T=T, ms=ms, tokens_per_s=T / ms * 1e3,
                 tflops=8.0 * D * H * D * T / ms * 1e-9)
        except Exception as e:
            emit(peer="fla_chunk_rwkv7", T=T, error=str(e).splitlines()[0][:200])
        del r, k, v, w, a, b, kk
        torch.cuda.empty_cache()


def bench_official(model_path, tokens, repeat, decode_steps=32, time_cap_s=120.0):
    os.environ["RWKV_CUDA_ON"] = "1"
    try:
        import rwkv_x
        from rwkv_x.model import RWKV_X, RWKV_X_Config
    except Exception as e:
        emit(peer="official_rwkv_x", error="import: " + str(e).splitlines()[0][:200])
        return
    tensors = load_safetensors(model_path)
    vocab = tensors["rwkv.emb.weight"].shape[0]
    with tempfile.TemporaryDirectory() as d:
        pth = os.path.join(d, "model.pth")
        torch.save(tensors, pth)
        del tensors
        cfg = RWKV_X_Config(moba_chunk_size=2048, moba_topk=3, max_kv_cache_size=0)  # eviction off, as rwkvx
        model = RWKV_X(pth, "cuda bf16", config=cfg)
    name = "rwkv-x %s (official, PyTorch %s, cuda bf16, RWKV_CUDA_ON=1)" % (
        getattr(rwkv_x, "__version__", "0.1.3"), torch.__version__)
    for T in tokens:
        ids = [(i * 7919) % vocab for i in range(T + decode_steps)]
        try:
            runs = []
            for _ in range(max(1, repeat)):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits, state = model.forward(ids[:T], None)
                torch.cuda.synchronize()
                runs.append(time.perf_counter() - t0)
                if sum(runs) > time_cap_s:
                    break
            steps = []
            for i in range(decode_steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                logits, state = model.forward(ids[T + i], state)
                torch.cuda.synchronize()
                steps.append(time.perf_counter() - t0)
            s = statistics.median(runs)
            emit(peer="official_rwkv_x", name=name, T=T, prefill_s=s, prefill_runs=len(runs),
                 prefill_tokens_per_s=T / s, decode_ms_per_token=statistics.median(steps) * 1e3,
                 peak_gib=torch.cuda.max_memory_allocated() / 2**30)
            del state, logits
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if s > time_cap_s:
                emit(peer="official_rwkv_x", note="longer lengths skipped: one prefill took %.0f s" % s)
                break
        except Exception as e:
            emit(peer="official_rwkv_x", T=T, error=str(e).splitlines()[0][:200])
            break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--tokens", default="4096,16384,65536,131072")
    ap.add_argument("--official-tokens", default="")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--skip", default="")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",") if t]
    skip = set(args.skip.split(","))
    emit(env="torch %s, cuda %s, %s" % (torch.__version__, torch.version.cuda, torch.cuda.get_device_name()))
    if "sdpa" not in skip:
        bench_sdpa(tokens, args.repeat)
    if "fla" not in skip:
        bench_fla(tokens, args.repeat)
    if "official" not in skip and args.model:
        official = [int(t) for t in (args.official_tokens or args.tokens).split(",") if t]
        bench_official(args.model, official, min(args.repeat, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
