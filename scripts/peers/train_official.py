#!/usr/bin/env python3
"""Training throughput and peak GPU memory of the OFFICIAL RWKV-X PyTorch trainer (howard-hou/RWKV-X,
pretrain/), for the side-by-side numbers in BENCHMARKS.md. Benchmark tooling only: rwkvx never needs Python.

The official code is NOT part of this repository. Point --official-src at a checkout of RWKV-X (the folder
that holds pretrain/, or pretrain/ itself). Nothing is downloaded.

Usage:
  train_official.py --official-src DIR --ctx 4096,65536 --steps 3 [--selftest]
  train_official.py --official-src DIR --device cpu --tiny --ctx 64 --steps 1 --selftest   # CPU smoke

What runs is the official code: src/model.py (RWKV, RWKVHybrid, Block, MOBABlock, L2Wrap,
RWKVHybrid.training_step), src/moba_efficient.py (moba_attn_varlen, MixedAttention) and the official wkv7
CUDA training kernel (cuda/wkv7_cuda.cu, compiled by model.py at import with torch.utils.cpp_extension.load),
with the environment variables train.py sets. One step = training_step (forward + CE + L2Wrap) + backward +
the optimizer step, emulating what Lightning 2 + DeepSpeed ZeRO-1 with precision "bf16" (the official
scripts' strategy) does on one GPU:
  * DeepSpeed's bf16 engine casts the whole module to bf16 (module.bfloat16()); activations are bf16;
  * fp32 master weights; gradient clipping to global norm 1.0 (on the fp32 grads); FusedAdam in AdamW
    mode on the fp32 masters (here torch.optim.AdamW(fused=True), beta (0.9, 0.99), eps 1e-18,
    wd 0.001 on params whose squeezed shape is >= 2-D, 0 otherwise, as RWKVHybrid.configure_optimizers);
    then the masters are copied back into the bf16 weights.
Replaced, because the device image lacks them (documented in every JSON "notes"):
  * deepspeed: a stub module. deepspeed.checkpointing.checkpoint (used by RWKVHybrid.forward for
    grad_cp=1) -> torch.utils.checkpoint.checkpoint(use_reentrant=True), the same re-entrant recompute
    scheme; deepspeed.ops.adam.FusedAdam/DeepSpeedCPUAdam -> names only (never called: the optimizer
    is built here, see above).
  * flash_attn: the three functions moba_efficient.py imports (flash_attn_varlen_func,
    _flash_attn_varlen_forward, _flash_attn_varlen_backward, flash-attn 2.6 calling convention) are
    re-implemented on PyTorch's own vendored FlashAttention-2 varlen kernels
    (torch.ops.aten._flash_attention_forward / _flash_attention_backward: same algorithm, same unpadded
    [H, total_q] log-sum-exp, backward with the caller's out and lse as MixedAttention needs). On CPU a
    plain per-segment reference is used instead. --selftest checks both against a dense reference and
    checks the official moba_attn_varlen (through the shim) against a naive MoBA.
  * CPU only (--device cpu, a smoke test): the wkv7 kernel is CUDA-only, so the extension build is skipped
    and src.model.RUN_CUDA_RWKV7g is replaced by a per-step torch reference of the same recurrence.
Not emulated: Lightning's loop/callback/progress-bar overhead, DeepSpeed's gradient bucketing, the
DataLoader (random tokens are made on the device beforehand).

Output: one JSON line per context on stdout
  {"peer": "official-rwkvx-train", "ctx": N, "tokens_per_s": ..., "peak_mem_gb": ..., "step_ms": ..., "notes": ...}
and a human-readable line per context on stderr. Timing: 1 warm-up step, then the median of --steps steps,
torch.cuda.synchronize() around each. peak_mem_gb = torch.cuda.max_memory_allocated() / 1e9 over the
warm-up and timed steps of that context (model, fp32 masters and Adam state included).
"""
import argparse
import gc
import importlib.machinery
import json
import math
import os
import statistics
import sys
import time
import types


# ----------------------------------------------------------------------------------------------------
# flash_attn replacement
# ----------------------------------------------------------------------------------------------------

def _segments(cu):
    c = [int(x) for x in cu.tolist()]
    return list(zip(c[:-1], c[1:]))


def _ref_varlen_fwd(q, k, v, cu_q, cu_k, scale, causal):
    """Per-segment reference: q [Tq,H,D], k/v [Tk,H,D]. Returns out (q.dtype) and lse [H, Tq] fp32.
    Causal mask aligned bottom-right as in flash-attn (key j visible to query i iff j <= i + Sk - Sq)."""
    import torch
    H = q.shape[1]
    out = torch.zeros(q.shape[0], H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((H, q.shape[0]), float("inf"), dtype=torch.float32, device=q.device)
    for (qa, qb), (ka, kb) in zip(_segments(cu_q), _segments(cu_k)):
        if qb == qa or kb == ka:
            continue
        qs, ks, vs = q[qa:qb].float(), k[ka:kb].float(), v[ka:kb].float()
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            sq, sk = qb - qa, kb - ka
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (sk - sq), float("-inf"))
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l[..., None])
        out[qa:qb] = torch.einsum("hqk,khd->qhd", p, vs)
        lse[:, qa:qb] = l
    return out.to(q.dtype), lse


def _ref_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal):
    """Flash-attention backward with the caller's out and lse: P = exp(S - lse), D = rowsum(dO * O)."""
    import torch
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for (qa, qb), (ka, kb) in zip(_segments(cu_q), _segments(cu_k)):
        if qb == qa or kb == ka:
            continue
        qs, ks, vs = q[qa:qb].float(), k[ka:kb].float(), v[ka:kb].float()
        do, o = dout[qa:qb].float(), out[qa:qb].float()
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            sq, sk = qb - qa, kb - ka
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (sk - sq), float("-inf"))
        p = torch.exp(s - lse[:, qa:qb, None])
        dv[ka:kb] += torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vs)
        dsum = (do * o).sum(-1).t()[..., None]  # [H, q, 1]
        ds = p * (dp - dsum)
        dq[qa:qb] += torch.einsum("hqk,khd->qhd", ds, ks) * scale
        dk[ka:kb] += torch.einsum("hqk,qhd->khd", ds, qs) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _contig_last(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _lse_to_unpadded(lse, cu_q, total_q):
    """Older vendored kernels return a padded [B, H, max_q] lse; flash-attn 2.6 (what the official code
    uses: it calls .t() on it) returns [H, total_q]. Convert if needed."""
    import torch
    if lse.dim() == 2:
        return lse
    pos = torch.arange(total_q, device=lse.device)
    b = torch.searchsorted(cu_q[1:].long(), pos, right=True)
    return lse[b, :, pos - cu_q.long()[b]].t().contiguous()


def _lse_to_padded(lse_unp, cu_q, max_q):
    import torch
    H, total_q = lse_unp.shape
    B = cu_q.numel() - 1
    pos = torch.arange(total_q, device=lse_unp.device)
    b = torch.searchsorted(cu_q[1:].long(), pos, right=True)
    padded = torch.zeros(B, H, max_q, dtype=lse_unp.dtype, device=lse_unp.device)
    padded[b, :, pos - cu_q.long()[b]] = lse_unp.t()
    return padded


_LSE_PADDED = {"v": None}  # whether this torch's vendored varlen kernel returns a padded lse


def _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    import torch
    if q.device.type != "cuda":
        return _ref_varlen_fwd(q, k, v, cu_q, cu_k, scale, causal)
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, int(max_q), int(max_k), 0.0, bool(causal), False, scale=scale)
    _LSE_PADDED["v"] = lse.dim() == 3
    return out, _lse_to_unpadded(lse, cu_q, q.shape[0])


def _varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    import torch
    if q.device.type != "cuda":
        return _ref_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, scale, causal)
    q, k, v, out, dout = [_contig_last(x) for x in (q, k, v, out, dout)]
    if _LSE_PADDED["v"]:
        lse = _lse_to_padded(lse, cu_q, int(max_q))
    seed = torch.zeros((2,), dtype=torch.uint64, device=q.device)  # dropout 0: unused
    offset = torch.empty(0, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), cu_q, cu_k, int(max_q), int(max_k), 0.0, bool(causal),
        seed, offset, scale=scale)
    return dq, dk, dv


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **kw):
    """flash-attn 2.6 API: returns (out, q, k, v, out_padded, softmax_lse [H, total_q], S_dmask, rng_state)."""
    assert dropout_p == 0.0
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    out, lse = _varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    return out, q, k, v, out, lse, None, None


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                                window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                rng_state=None):
    """flash-attn 2.6 API: returns (dq, dk, dv, softmax_d)."""
    assert dropout_p == 0.0 and tuple(window_size) == (-1, -1) and softcap == 0.0 and alibi_slopes is None
    gq, gk, gv = _varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    for dst, src in ((dq, gq), (dk, gk), (dv, gv)):
        if dst is not None:
            dst.copy_(src)
    return (gq if dq is None else dq), (gk if dk is None else dk), (gv if dv is None else dv), None


def _make_flash_attn_varlen_func():
    import torch

    class _FlashAttnVarlenFunc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
            out, lse = _varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
            ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
            ctx.args = (max_q, max_k, scale, causal)
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
            max_q, max_k, scale, causal = ctx.args
            dq, dk, dv = _varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
            return dq, dk, dv, None, None, None, None, None, None

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, **kw):
        assert dropout_p == 0.0
        if softmax_scale is None:
            softmax_scale = q.shape[-1] ** -0.5
        return _FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale, causal)

    return flash_attn_varlen_func


# ----------------------------------------------------------------------------------------------------
# stubs injected through sys.modules before the official code is imported
# ----------------------------------------------------------------------------------------------------

def _module(name):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec() needs a spec
    m.__file__ = f"<stub {name} from train_official.py>"
    return m


def install_stubs():
    import torch
    import torch.utils.checkpoint

    ds = _module("deepspeed")
    ds.__version__ = "0.0+stub"
    ds_ops = _module("deepspeed.ops")
    ds_adam = _module("deepspeed.ops.adam")
    ds_ckpt = _module("deepspeed.checkpointing")

    class FusedAdam(torch.optim.AdamW):  # never used by this script; keeps the official import working
        def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True,
                     adam_w_mode=True, amsgrad=False, **kw):
            super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)

    class DeepSpeedCPUAdam(FusedAdam):
        pass

    def checkpoint(function, *args):
        # deepspeed.checkpointing.checkpoint is a re-entrant (autograd.Function) activation checkpoint
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)

    ds_adam.FusedAdam, ds_adam.DeepSpeedCPUAdam = FusedAdam, DeepSpeedCPUAdam
    ds_ckpt.checkpoint = checkpoint
    ds.ops, ds_ops.adam, ds.checkpointing = ds_ops, ds_adam, ds_ckpt

    fa = _module("flash_attn")
    fai = _module("flash_attn.flash_attn_interface")
    fa.flash_attn_varlen_func = fai.flash_attn_varlen_func = _make_flash_attn_varlen_func()
    fai._flash_attn_varlen_forward = _flash_attn_varlen_forward
    fai._flash_attn_varlen_backward = _flash_attn_varlen_backward
    fa.flash_attn_interface = fai
    fa.__version__ = "2.6.3+torch-aten-shim"
    for m in (ds, ds_ops, ds_adam, ds_ckpt, fa, fai):
        sys.modules[m.__name__] = m


# ----------------------------------------------------------------------------------------------------
# CPU reference of the wkv7 kernel (only for --device cpu; the official kernel is CUDA-only)
# ----------------------------------------------------------------------------------------------------

def _ref_rwkv7(q, w, k, v, a, b):
    """Same recurrence as cuda/wkv7_cuda.cu forward_kernel: S = S*diag(exp(-exp(w))) + (S a) b^T + v k^T,
    y = S q (S[value, key], fp32 state, bf16 in/out)."""
    import torch
    B, T, HC = q.shape
    H, N = HC // 64, 64
    q, w, k, v, a, b = [t.float().view(B, T, H, N) for t in (q, w, k, v, a, b)]
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, N, N, dtype=torch.float32, device=q.device)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, q[:, t]))
    return torch.stack(ys, 1).reshape(B, T, HC).to(torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# self tests of the shim
# ----------------------------------------------------------------------------------------------------

def _naive_moba(q, k, v, chunk, topk):
    """Dense MoBA reference for one sequence: q,k,v [S,H,D] (fp32 math). Query s attends causally to its own
    chunk plus the top-(topk-1) complete past chunks by q . mean(k of chunk) (mean rounded like the official
    bf16 mean)."""
    import torch
    S, H, D = q.shape
    nchunk = (S + chunk - 1) // chunk
    nf = nchunk - 1  # the official code never gates the last chunk (it is always someone's own chunk)
    pos = torch.arange(S, device=q.device)
    cid = pos // chunk
    with torch.no_grad():
        allowed = (cid[None, :] == cid[:, None]) & (pos[None, :] <= pos[:, None])  # own chunk, causal [s, t]
        allowed = allowed[None].repeat(H, 1, 1)
        kk = min(topk - 1, nf)
        if kk > 0:
            km = k[: nf * chunk].view(nf, chunk, H, D).float().mean(1).to(k.dtype).float()  # [nf, H, D]
            gate = torch.einsum("nhd,shd->hsn", km, q.float())
            vis = pos[:, None] >= ((torch.arange(nf, device=q.device) + 1) * chunk)[None, :]  # [s, n]
            gate = gate.masked_fill(~vis[None], float("-inf"))
            _, idx = torch.topk(gate, kk, dim=-1)
            sel = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, idx, True) & vis[None]  # [h, s, n]
            sel = torch.cat([sel, torch.zeros_like(sel[..., :1])], -1)  # chunk nf: never gated
            tsel = sel[:, :, cid]  # [h, s, t]
            allowed = allowed | tsel
    s = torch.einsum("shd,thd->hst", q.float(), k.float()) * D ** -0.5
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("hst,thd->shd", p, v.float())


def selftest(device, M=None):
    import torch
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references (and the official fp32 gate) exact
    try:
        return _selftest(device, M)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _selftest(device, M=None):
    import torch
    torch.manual_seed(0)
    res = {}
    dt = torch.bfloat16
    H, D = 3, 64
    # 1) varlen fwd/bwd of the shim vs the fp32 reference (on cuda: the aten flash kernels)
    for causal in (True, False):
        lq = [37, 128, 1, 200]
        lk = lq if causal else [64, 64, 64, 64]
        cu_q = torch.tensor([0] + lq, device=device).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lk, device=device).cumsum(0).to(torch.int32)
        q = torch.randn(sum(lq), H, D, device=device, dtype=dt)
        k = torch.randn(sum(lk), H, D, device=device, dtype=dt)
        v = torch.randn(sum(lk), H, D, device=device, dtype=dt)
        do = torch.randn(sum(lq), H, D, device=device, dtype=dt)
        sc = D ** -0.5
        o1, _, _, _, _, l1, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.0, sc, causal)
        o2, l2 = _ref_varlen_fwd(q, k, v, cu_q, cu_k, sc, causal)
        # external (perturbed) lse as MixedAttention passes: the backward must use it, not recompute it
        lx = l2 + 0.25
        g1 = _flash_attn_varlen_backward(do, q, k, v, o2, lx, None, None, None, cu_q, cu_k, max(lq), max(lk),
                                         0.0, sc, causal)[:3]
        g2 = _ref_varlen_bwd(do, q, k, v, o2, lx, cu_q, cu_k, sc, causal)
        tag = "causal" if causal else "full"
        res[f"varlen_{tag}_out"] = (o1.float() - o2.float()).abs().max().item()
        res[f"varlen_{tag}_lse"] = (l1 - l2).abs().max().item()
        res[f"varlen_{tag}_grad"] = max((a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-6)
                                        for a, b in zip(g1, g2))
    # 2) official moba_attn_varlen (through the shim) vs naive MoBA, forward and gradients
    if M is not None:
        moba = sys.modules["src.moba_efficient"].moba_attn_varlen
        S, chunk, topk = 8 * 64 + 40, 64, 3
        q0 = (torch.randn(S, H, D, device=device) * 0.5).to(dt)
        k0 = (torch.randn(S, H, D, device=device) * 0.5 + 0.3 * torch.randn(1, H, D, device=device)).to(dt)
        v0 = torch.randn(S, H, D, device=device).to(dt)
        dy = torch.randn(S, H, D, device=device).to(dt)
        grads = []
        outs = []
        for f in ("official", "naive"):
            qq, kk, vv = [t.clone().requires_grad_(True) for t in (q0, k0, v0)]
            if f == "official":
                cu = torch.tensor([0, S], device=device, dtype=torch.int32)
                y = moba(qq, kk, vv, cu, S, chunk, topk)
            else:
                y = _naive_moba(qq, kk, vv, chunk, topk)
            (y.float() * dy.float()).sum().backward()
            outs.append(y.float().detach())
            grads.append([t.grad.float() for t in (qq, kk, vv)])
        res["moba_out_maxerr"] = (outs[0] - outs[1]).abs().max().item()
        res["moba_grad_relerr"] = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-6)
                                      for a, b in zip(grads[0], grads[1]))
    ok = all(v < 0.05 for v in res.values())
    res = {k: float(f"{v:.3g}") for k, v in res.items()}
    print(f"[selftest {'OK' if ok else 'FAILED'}] {json.dumps(res)}", file=sys.stderr, flush=True)
    return ok, res


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official-src", required=True, help="RWKV-X checkout (containing pretrain/) or its pretrain/")
    ap.add_argument("--ctx", default="4096,65536", help="comma-separated context lengths")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported), after 1 warm-up step")
    ap.add_argument("--micro-bsz", type=int, default=1)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="n_layer 2, n_embd 128, vocab 512, 2 MoBA blocks, chunk 16")
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--n-moba", type=int, default=4)
    ap.add_argument("--moba-chunk", type=int, default=2048)
    ap.add_argument("--moba-topk", type=int, default=3)
    ap.add_argument("--grad-cp", type=int, default=1)
    ap.add_argument("--longce", action="store_true", help="use the official LongCE loss (stage 2b only)")
    ap.add_argument("--selftest", action="store_true", help="check the flash_attn shim and the MoBA path first")
    ap.add_argument("--oom-fallback", default="", help="comma-separated smaller contexts to try if one OOMs")
    ap.add_argument("--json-out", default="", help="also append the JSON lines here (default $OUT/train_official.jsonl)")
    args = ap.parse_args()
    if args.tiny:
        args.n_layer, args.n_embd, args.vocab, args.n_moba, args.moba_chunk = 2, 128, 512, 2, 16
    ctxs = [int(c) for c in args.ctx.split(",") if c]
    json_out = args.json_out or (os.path.join(os.environ["OUT"], "train_official.jsonl") if os.environ.get("OUT") else "")
    json_out = os.path.abspath(json_out) if json_out else ""

    src = os.path.abspath(args.official_src)
    if os.path.isdir(os.path.join(src, "pretrain")):
        src = os.path.join(src, "pretrain")
    if not os.path.isfile(os.path.join(src, "src", "model.py")):
        sys.exit(f"no src/model.py under {src}")

    # environment exactly as pretrain/train.py sets it
    os.environ["RWKV_MY_TESTING"] = "x070"
    os.environ["RWKV_CTXLEN"] = str(max(ctxs))
    os.environ["RWKV_HEAD_SIZE_A"] = "64"
    os.environ["RWKV_TRAIN_TYPE"] = ""
    os.environ["RWKV_FLOAT_MODE"] = "bf16"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/tpeer_torch_ext")

    import torch
    import pytorch_lightning  # noqa: F401  (import the real one before the stubs exist)

    dev = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True

    install_stubs()
    cwd = os.getcwd()
    os.chdir(src)  # model.py compiles 'cuda/wkv7_cuda.cu' relative to the working directory
    sys.path.insert(0, src)
    t0 = time.perf_counter()
    saved_fd = os.dup(1)
    os.dup2(2, 1)  # keep stdout for the JSON lines: the extension build is verbose
    try:
        if args.device == "cpu":
            import torch.utils.cpp_extension as cpe
            real_load = cpe.load
            cpe.load = lambda *a, **k: None
            try:
                import src.model as M
            finally:
                cpe.load = real_load
            M.RUN_CUDA_RWKV7g = _ref_rwkv7
        else:
            import src.model as M
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
    os.chdir(cwd)
    print(f"[official code imported from {src} in {time.perf_counter() - t0:.1f} s (wkv7 kernel build included)]",
          file=sys.stderr, flush=True)

    st_res = None
    if args.selftest:
        ok, st_res = selftest(dev, M)
        if not ok:
            sys.exit("selftest failed")

    # --- the model, as train.py builds it (random init: no --load_model / --load_pretrain) ---
    ns = types.SimpleNamespace(
        n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab, ctx_len=max(ctxs),
        dim_att=args.n_embd, dim_ffn=int((args.n_embd * 3.5) // 32 * 32), head_size_a=64, head_size_divisor=8,
        dropout=0, grad_cp=args.grad_cp, use_longce=args.longce, my_testing="x070", train_type="",
        weight_decay=0.001, lr_init=1e-5, lr_final=1e-5, betas=(0.9, 0.99), adam_eps=1e-18, micro_bsz=args.micro_bsz,
        n_moba_layer=args.n_moba, moba_chunk_size=args.moba_chunk, moba_topk=args.moba_topk, pre_ffn=0, head_qk=0,
        my_pos_emb=0, tiny_att_dim=0, my_qa_mask=0, layerwise_lr=0, precision="bf16", accelerator="gpu",
        strategy="deepspeed_stage_1", devices=1, num_nodes=1)
    ns.n_head = ns.dim_att // ns.head_size_a
    cfg = types.SimpleNamespace(n_moba_layer=args.n_moba, n_head=ns.n_head, n_embd=args.n_embd,
                                moba_chunk_size=args.moba_chunk, moba_topk=args.moba_topk)
    rwkv = M.RWKV(ns)
    model = M.RWKVHybrid(rwkv, ns, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    # DeepSpeed bf16 engine: module.bfloat16() on the device
    model = model.to(dev).bfloat16().train()

    # --- ZeRO-1 bf16 optimizer emulation: fp32 masters + fp32 Adam state, clip 1.0, AdamW ---
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone() for p in params]
    for m in masters:
        m.grad = torch.zeros_like(m)
    groups = [{"params": [m for p, m in zip(params, masters) if len(p.squeeze().shape) < 2], "weight_decay": 0.0},
              {"params": [m for p, m in zip(params, masters) if len(p.squeeze().shape) >= 2], "weight_decay": 0.001}]
    opt = torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.99), eps=1e-18, fused=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(x, y, phases):
        ta = time.perf_counter()
        loss = model.training_step((x, y), 0)  # forward + CE (or LongCE) + L2Wrap, as Lightning calls it
        sync()
        tb = time.perf_counter()
        loss.backward()
        sync()
        tc = time.perf_counter()
        with torch.no_grad():
            for p, m in zip(params, masters):
                m.grad.copy_(p.grad)
                p.grad = None
            torch.nn.utils.clip_grad_norm_(masters, 1.0, foreach=True)
            opt.step()
            torch._foreach_copy_([p.data for p in params], masters)
        sync()
        td = time.perf_counter()
        phases.append((tb - ta, tc - tb, td - tc))
        return float(loss.detach())

    notes_base = (
        "official howard-hou/RWKV-X pretrain code (RWKVHybrid.training_step: CE+L2Wrap"
        + (", LongCE" if args.longce else "")
        + f"; grad_cp={args.grad_cp}; official wkv7 CUDA kernel"
        + ("" if dev.type == "cuda" else " replaced by a torch reference (CPU)")
        + "); bf16 module + fp32 master weights, clip 1.0, torch AdamW(fused) on fp32 masters (emulates"
        " DeepSpeed ZeRO-1 bf16 FusedAdam); deepspeed stubbed (checkpointing.checkpoint -> torch reentrant"
        " checkpoint); flash_attn varlen fwd/bwd replaced by torch aten FlashAttention-2 varlen kernels"
        " (same math, non-deterministic bwd); no Lightning/DataLoader overhead; random init, random tokens"
        f"; micro_bsz {args.micro_bsz}; L{args.n_layer} D{args.n_embd} V{args.vocab} moba {args.n_moba}x"
        f" chunk {args.moba_chunk} topk {args.moba_topk}; {n_params / 1e6:.1f}M params"
        + (f"; device {torch.cuda.get_device_name()}" if dev.type == "cuda" else "; CPU smoke"))

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if json_out:
            with open(json_out, "a") as f:
                f.write(line + "\n")

    fallback = [int(c) for c in args.oom_fallback.split(",") if c]
    queue = list(ctxs)
    while queue:
        T = queue.pop(0)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        g = torch.Generator(device="cpu").manual_seed(T)
        toks = torch.randint(0, args.vocab, (args.micro_bsz, T + 1), generator=g).to(dev)
        x, y = toks[:, :-1].contiguous(), toks[:, 1:].contiguous()
        try:
            phases = []
            sync()
            tw = time.perf_counter()
            loss0 = step(x, y, phases)
            sync()
            warm_ms = (time.perf_counter() - tw) * 1e3
            times = []
            for _ in range(args.steps):
                sync()
                ts = time.perf_counter()
                loss = step(x, y, phases)
                sync()
                times.append(time.perf_counter() - ts)
        except torch.cuda.OutOfMemoryError as e:
            del x, y, toks
            opt.zero_grad(set_to_none=False)
            for p in params:
                p.grad = None
            gc.collect()
            torch.cuda.empty_cache()
            peak = torch.cuda.max_memory_allocated() / 1e9
            emit({"peer": "official-rwkvx-train", "ctx": T, "tokens_per_s": None, "peak_mem_gb": round(peak, 2),
                  "step_ms": None, "oom": True,
                  "notes": f"OOM at micro_bsz {args.micro_bsz}: {str(e).splitlines()[0][:200]}; " + notes_base})
            print(f"[ctx {T}] OUT OF MEMORY (peak before failure {peak:.1f} GB)", file=sys.stderr, flush=True)
            queue = [c for c in fallback if c < T and c not in ctxs][:1] + queue
            continue
        med = statistics.median(times)
        tps = args.micro_bsz * T / med
        peak = torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved() / 1e9 if dev.type == "cuda" else None
        ph = phases[1:]
        fwd, bwd, optm = [statistics.median(p[i] for p in ph) * 1e3 for i in range(3)]
        rec = {"peer": "official-rwkvx-train", "ctx": T, "tokens_per_s": round(tps, 1),
               "peak_mem_gb": round(peak, 3) if peak is not None else None, "step_ms": round(med * 1e3, 2),
               "fwd_ms": round(fwd, 2), "bwd_ms": round(bwd, 2), "opt_ms": round(optm, 2),
               "warmup_ms": round(warm_ms, 1), "step_ms_all": [round(t * 1e3, 2) for t in times],
               "peak_reserved_gb": round(reserved, 3) if reserved is not None else None,
               "loss_first": round(loss0, 4), "loss_last": round(loss, 4), "micro_bsz": args.micro_bsz,
               "notes": notes_base + (f"; selftest {json.dumps(st_res)}" if st_res else "")}
        emit(rec)
        print(f"[ctx {T}] official RWKV-X train: {tps:,.0f} tokens/s, step {med * 1e3:.1f} ms "
              f"(fwd {fwd:.1f} / bwd {bwd:.1f} / opt {optm:.1f}), peak "
              + (f"{peak:.2f} GB allocated ({reserved:.2f} GB reserved)" if peak is not None else "n/a (CPU)")
              + f", loss {loss0:.3f} -> {loss:.3f}", file=sys.stderr, flush=True)
        del x, y, toks


if __name__ == "__main__":
    main()
