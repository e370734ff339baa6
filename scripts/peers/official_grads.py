#!/usr/bin/env python3
"""Training gradients of rwkvx against PyTorch autograd of the OFFICIAL RWKV-X training code
(howard-hou/RWKV-X, pretrain/src/model.py: RWKVHybrid.forward + training_step, i.e. CE + L2Wrap) on a golden
case (model.pth + model.safetensors + case.json with "tokens" and "config" {n_embd, n_rwkv, n_moba, vocab,
chunk, topk}). Verification tooling only: rwkvx never needs Python.

Usage:
  official_grads.py CASE_DIR --official-src DIR --rwkvx build/rwkvx            # runs `rwkvx grad` itself
  official_grads.py CASE_DIR --official-src DIR --grads G.safetensors [--rwkvx-loss L]
  official_grads.py CASE_DIR --official-src DIR --device cuda --rwkvx build/rwkvx   # bf16, official kernel

The official sources are NOT part of this repository; --official-src is a checkout of RWKV-X (the folder
holding pretrain/, or pretrain/ itself). The model is built as scripts/peers/train_official.py builds it
(its deepspeed / flash_attn stubs, the environment variables train.py sets), loaded from the case's
model.pth, with moba_chunk_size / moba_topk from case.json, and run through the official
RWKVHybrid.training_step((tokens[:-1], tokens[1:])) with batch 1, then loss.backward().

--device cpu (default): the exact oracle, everything in float64:
  * the module is cast to float64 (model.double(); the bf16 weights of a case convert exactly);
  * the wkv7 CUDA kernel is replaced by a per-step torch version of the same recurrence, in the input dtype
    (train_official.py's _ref_rwkv7 computes in fp32 and returns bf16; this one keeps fp64);
  * the MoBA attention (src.model.moba_attn_varlen) is replaced by a plain masked softmax over the MoBA mask
    with the official selection semantics: per head and query, the top-(topk-1) complete past chunks by
    q . mean(k of the chunk) (only chunks that end at or before the query; the official code gates every
    chunk but the last of the sequence), plus the query's own chunk, causally; when topk-1 or the number of
    complete chunks is 0, plain causal attention over the whole sequence (the official corner case). No
    gradient flows through the selection (the official code only uses it to index). The official
    moba_attn_varlen is still run on every MoBA layer's actual q, k, v (through the flash_attn shim, made
    dtype-preserving here) and compared with the replacement, forward and backward (the "official moba
    check" line). It cannot run in fp64 (MixedAttention's output buffer is hard-wired fp32, and it casts q
    to fp32 for the gate), so it runs on fp32 copies: agreement to fp32 rounding (~1e-6) confirms the
    selection semantics.
--device cuda: as training really runs: module.bfloat16() on the GPU, the official wkv7 CUDA kernel (built
  by model.py at import), the official moba_attn_varlen on the flash_attn shim (torch's vendored
  FlashAttention-2 varlen kernels), tf32 allowed. Compare with `rwkvx grad --device cuda` (bf16 products);
  expect bf16-level agreement (~1e-2), not fp32's.

Deliberate departures from the literal official forward (both documented in the JSON "notes"):
  * no left padding: RWKVHybrid.forward left-pads the input with token 261 to a multiple of CHUNK_LEN (16)
    (spec system.md §4.3); `rwkvx grad` computes the unpadded loss (batch 1, no padding), so the padding is
    turned off here (src.model.CHUNK_LEN = 1 for the padding arithmetic). On cuda the official kernel still
    needs T % 16 == 0: its inputs are right-padded with zeros and its outputs cut back, which changes
    nothing for the real positions (the recurrence is causal; the padded outputs get zero gradient).
    The rwkvx trainer itself pads as officially (pad_multiple 16, docs/training.md).
  * n_moba == 0 (a plain RWKV-7 case): RWKVHybrid.__init__ -> init_moba_from_rwkv divides by n_moba_layer
    (ZeroDivisionError in the official code), so that copy is skipped; it would be overwritten by the
    loaded weights anyway. get_block_exe_order handles n_moba == 0 itself. The case's plain RWKV-7 names
    (emb.weight, blocks.*) are loaded under rwkv.* and compared without the prefix.
  * grad_cp 0 by default (--grad-cp 1 runs deepspeed.checkpointing through the stub's re-entrant torch
    checkpoint; same math).
Also replaced when missing from the Python environment: pytorch_lightning (LightningModule = nn.Module,
rank_zero_info = print to stderr) and einops (the two rearrange patterns moba_efficient.py uses).

Output: a table (stderr unless --table-stdout) of every tensor: max|ref|, max|rwkvx - ref|, their ratio;
the loss; then one JSON line on stdout:
  {"case", "worst_rel_err", "worst_tensor", "global_rel_err", "loss_official", "loss_rwkvx", "n_tensors", ...}
worst_rel_err = max over tensors of max|delta|/max|ref|; global_rel_err = max|delta| / max|ref| over all.
Exit status 1 if a tensor is missing on either side or shapes differ, 2 if --tol is given and exceeded.
"""
import argparse
import importlib.machinery
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import train_official as TO  # noqa: E402  (its stubs, shim and CPU recurrence; imports only the stdlib)


# ----------------------------------------------------------------------------------------------------
# stand-ins for packages the peer venv may lack (only installed if the import fails)
# ----------------------------------------------------------------------------------------------------

def _module(name):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__file__ = f"<stub {name} from official_grads.py>"
    return m


def ensure_lightning(notes):
    try:
        import pytorch_lightning  # noqa: F401
        return
    except ImportError:
        pass
    import torch.nn as nn
    pl = _module("pytorch_lightning")
    ut = _module("pytorch_lightning.utilities")
    stg = _module("pytorch_lightning.strategies")

    class LightningModule(nn.Module):
        pass

    class DeepSpeedStrategy:
        pass

    pl.LightningModule = LightningModule
    pl.__version__ = "2.0.0+stub"
    ut.rank_zero_info = lambda *a, **k: print(*a, file=sys.stderr)
    ut.rank_zero_only = lambda f: f
    stg.DeepSpeedStrategy = DeepSpeedStrategy
    pl.utilities, pl.strategies = ut, stg
    for m in (pl, ut, stg):
        sys.modules[m.__name__] = m
    notes.append("pytorch_lightning stubbed (LightningModule = nn.Module)")


def _rearrange(x, pattern):
    """einops.rearrange for plain names on the left and names or (groups) on the right."""
    lhs, rhs = [s.strip() for s in pattern.split("->")]
    names = lhs.split()
    assert all(re.fullmatch(r"\w+", n) for n in names) and len(names) == x.dim(), pattern
    groups = [m.group(1).split() if m.group(1) is not None else [m.group(2)]
              for m in re.finditer(r"\(([^)]*)\)|(\w+)", rhs)]
    order = [n for g in groups for n in g]
    assert sorted(order) == sorted(names), pattern
    y = x.permute(*[names.index(n) for n in order])
    size = dict(zip(names, x.shape))
    return y.reshape([math.prod(size[n] for n in g) for g in groups])


def ensure_einops(notes):
    try:
        import einops  # noqa: F401
        return
    except ImportError:
        pass
    e = _module("einops")
    e.rearrange = _rearrange
    sys.modules["einops"] = e
    notes.append("einops stubbed (rearrange by permute + reshape)")


# ----------------------------------------------------------------------------------------------------
# dtype-preserving CPU pieces (fp64 oracle)
# ----------------------------------------------------------------------------------------------------

def _cdt(dtype):
    import torch
    return torch.promote_types(dtype, torch.float32)  # fp64 stays fp64, bf16/fp16 compute in fp32


def ref_rwkv7_exact(q, w, k, v, a, b):
    """The wkv7 kernel's recurrence (cuda/wkv7_cuda.cu): S = S diag(exp(-exp(w))) + (S a) b^T + v k^T,
    y = S q, S[value, key] from zero, per head of 64; computed and returned in the inputs' dtype (fp32 at
    least)."""
    import torch
    B, T, HC = q.shape
    H, N = HC // 64, 64
    dt = _cdt(q.dtype)
    q, w, k, v, a, b = [t.to(dt).view(B, T, H, N) for t in (q, w, k, v, a, b)]
    decay = torch.exp(-torch.exp(w))
    S = torch.zeros(B, H, N, N, dtype=dt, device=q.device)
    ys = []
    for t in range(T):
        sa = torch.einsum("bhij,bhj->bhi", S, a[:, t])
        S = S * decay[:, t, :, None, :] + sa[..., None] * b[:, t, :, None, :] + v[:, t, :, :, None] * k[:, t, :, None, :]
        ys.append(torch.einsum("bhij,bhj->bhi", S, q[:, t]))
    return torch.stack(ys, 1).reshape(B, T, HC)


def _ref_varlen_fwd(q, k, v, cu_q, cu_k, scale, causal):
    """train_official._ref_varlen_fwd in the inputs' compute dtype (it always used fp32)."""
    import torch
    dt = _cdt(q.dtype)
    H = q.shape[1]
    out = torch.zeros(q.shape[0], H, v.shape[-1], dtype=dt, device=q.device)
    lse = torch.full((H, q.shape[0]), float("inf"), dtype=dt, device=q.device)
    for (qa, qb), (ka, kb) in zip(TO._segments(cu_q), TO._segments(cu_k)):
        if qb == qa or kb == ka:
            continue
        qs, ks, vs = q[qa:qb].to(dt), k[ka:kb].to(dt), v[ka:kb].to(dt)
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
    """train_official._ref_varlen_bwd in the inputs' compute dtype."""
    import torch
    dt = _cdt(q.dtype)
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=dt, device=q.device)
    dv = torch.zeros(v.shape, dtype=dt, device=q.device)
    lse = lse.to(dt)
    for (qa, qb), (ka, kb) in zip(TO._segments(cu_q), TO._segments(cu_k)):
        if qb == qa or kb == ka:
            continue
        qs, ks, vs = q[qa:qb].to(dt), k[ka:kb].to(dt), v[ka:kb].to(dt)
        do, o = dout[qa:qb].to(dt), out[qa:qb].to(dt)
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if causal:
            sq, sk = qb - qa, kb - ka
            i = torch.arange(sq, device=q.device)[:, None]
            j = torch.arange(sk, device=q.device)[None, :]
            s = s.masked_fill(j > i + (sk - sq), float("-inf"))
        p = torch.exp(s - lse[:, qa:qb, None])
        dv[ka:kb] += torch.einsum("hqk,qhd->khd", p, do)
        dp = torch.einsum("qhd,khd->hqk", do, vs)
        dsum = (do * o).sum(-1).t()[..., None]
        ds = p * (dp - dsum)
        dq[qa:qb] += torch.einsum("hqk,khd->qhd", ds, ks) * scale
        dk[ka:kb] += torch.einsum("hqk,qhd->khd", ds, qs) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class MobaOracle:
    """Masked-softmax MoBA with the official selection semantics (see the module docstring), plus a check
    of the official moba_attn_varlen on the same inputs."""

    def __init__(self, official_fn, check=True):
        self.official_fn = official_fn
        self.check = check
        self.min_margin = math.inf       # smallest gap between the last selected and the first unselected gate
        self.min_margin_rel = math.inf   # the same relative to the scores' magnitude at that query
        self.n_calls = 0
        self.check_out = 0.0             # official vs oracle: max|d out| / max|out|
        self.check_grad = 0.0            # official vs oracle: max|d grad| / max|grad| over q, k, v

    def mask(self, q, k, chunk, topk):
        import torch
        S, H, D = q.shape
        nchunk = (S + chunk - 1) // chunk
        nf = nchunk - 1  # the official code never gates the last chunk of a sequence
        kk = min(topk - 1, nf)
        pos = torch.arange(S, device=q.device)
        if kk <= 0:  # official corner case: flash_attn_varlen_func(..., causal=True) over the whole sequence
            return (pos[None, :] <= pos[:, None])[None].expand(H, S, S)
        cid = pos // chunk
        with torch.no_grad():
            allowed = (cid[None, :] == cid[:, None]) & (pos[None, :] <= pos[:, None])
            allowed = allowed[None].repeat(H, 1, 1)
            km = k[: nf * chunk].reshape(nf, chunk, H, D).to(_cdt(k.dtype)).mean(1)  # [nf, H, D]
            gate = torch.einsum("nhd,shd->hsn", km, q.to(km.dtype))
            vis = pos[:, None] >= ((torch.arange(nf, device=q.device) + 1) * chunk)[None, :]  # chunk ends <= s
            gate = gate.masked_fill(~vis[None], float("-inf"))
            top = torch.topk(gate, min(kk + 1, nf), dim=-1)
            sel = torch.zeros_like(gate, dtype=torch.bool).scatter_(-1, top.indices[..., :kk], True) & vis[None]
            if nf > kk:  # selection margin where a choice was made (more visible chunks than kk)
                nvis = vis.sum(-1)[None].expand(H, S)
                m = nvis > kk
                if m.any():
                    gap = (top.values[..., kk - 1] - top.values[..., kk])[m]
                    scale = top.values[..., 0].abs()[m].clamp_min(1e-30)
                    self.min_margin = min(self.min_margin, gap.min().item())
                    self.min_margin_rel = min(self.min_margin_rel, (gap / scale).min().item())
            sel = torch.cat([sel, torch.zeros_like(sel[..., :1])], -1)  # the last chunk: own chunk only
            allowed |= sel[:, :, cid]
        return allowed

    def attend(self, q, k, v, chunk, topk):
        import torch
        S, H, D = q.shape
        allowed = self.mask(q, k, chunk, topk)
        s = torch.einsum("shd,thd->hst", q, k) * D ** -0.5
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1)
        return torch.einsum("hst,thd->shd", p, v).contiguous()  # [S, H, D] like the official output

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk):
        import torch
        assert cu_seqlens.numel() == 2, "batch 1 only"
        self.n_calls += 1
        y = self.attend(q, k, v, moba_chunk_size, moba_topk)
        if self.check:
            with torch.enable_grad():
                g = torch.Generator(device="cpu").manual_seed(1234 + self.n_calls)
                dy = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.device, q.dtype)
                res = []
                # the official function is hard-wired to fp32 buffers (MixedAttention's output), so it runs
                # on fp32 copies; the oracle on the fp64 originals
                for f, dt in ((self.official_fn, torch.float32),
                              (lambda *a: self.attend(*a[:3], moba_chunk_size, moba_topk), q.dtype)):
                    qq, kk_, vv = [t.detach().to(dt).requires_grad_(True) for t in (q, k, v)]
                    out = f(qq, kk_, vv, cu_seqlens, max_seqlen, moba_chunk_size, moba_topk)
                    (out.to(torch.float64) * dy.to(torch.float64)).sum().backward()
                    res.append((out.detach().to(torch.float64), [t.grad.to(torch.float64) for t in (qq, kk_, vv)]))
            (o1, g1), (o2, g2) = res
            rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()  # noqa: E731
            self.check_out = max(self.check_out, rel(o1, o2))
            self.check_grad = max(self.check_grad, max(rel(a, b) for a, b in zip(g1, g2)))
        return y


# ----------------------------------------------------------------------------------------------------
# rwkvx side
# ----------------------------------------------------------------------------------------------------

def run_rwkvx(binary, case, out, device, fp32, extra):
    cmd = [binary, "grad", "--model", os.path.join(case, "model.safetensors"),
           "--tokens-json", os.path.join(case, "case.json"), "--out", out]
    if device == "cuda":
        cmd += ["--device", "cuda"] + (["--fp32"] if fp32 else [])
    cmd += extra
    print("[rwkvx] " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(p.stderr)
    if p.returncode != 0:
        sys.stderr.write(p.stdout)
        sys.exit(f"rwkvx grad failed with status {p.returncode}")
    print(f"[rwkvx] {p.stdout.strip()} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    m = re.search(r"loss ([-+0-9.eEinfa]+)", p.stdout)
    return float(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("case", help="golden case directory (model.pth, model.safetensors, case.json)")
    ap.add_argument("--official-src", required=True, help="RWKV-X checkout (containing pretrain/) or its pretrain/")
    ap.add_argument("--grads", default="", help="rwkvx gradients (.safetensors from `rwkvx grad`)")
    ap.add_argument("--rwkvx-loss", type=float, default=None, help="the loss `rwkvx grad` printed (with --grads)")
    ap.add_argument("--rwkvx", default="", help="rwkvx binary: run `rwkvx grad` on the case (instead of --grads)")
    ap.add_argument("--rwkvx-fp32", action="store_true", help="with --device cuda: `rwkvx grad --fp32`")
    ap.add_argument("--rwkvx-arg", action="append", default=[], help="extra argument for `rwkvx grad` (repeatable)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: fp64 oracle (torch recurrence, masked-softmax MoBA); cuda: bf16, official kernels")
    ap.add_argument("--grad-cp", type=int, default=0, help="the official --grad_cp (1: deepspeed checkpointing stub)")
    ap.add_argument("--no-moba-check", action="store_true", help="cpu: skip running the official moba_attn_varlen")
    ap.add_argument("--tol", type=float, default=None, help="exit 2 if worst_rel_err exceeds this")
    ap.add_argument("--table-stdout", action="store_true", help="print the table on stdout (default stderr)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if not args.grads and not args.rwkvx:
        ap.error("give --grads G.safetensors or --rwkvx BINARY")
    case = os.path.abspath(args.case)
    with open(os.path.join(case, "case.json")) as f:
        cj = json.load(f)
    cfgj = cj["config"]
    tokens = [int(t) for t in cj["tokens"]]
    T = len(tokens) - 1
    C, L, NM = int(cfgj["n_embd"]), int(cfgj["n_rwkv"]), int(cfgj["n_moba"])
    V, chunk, topk = int(cfgj["vocab"]), int(cfgj["chunk"]), int(cfgj["topk"])
    tout = sys.stdout if args.table_stdout else sys.stderr
    notes = []

    # the rwkvx gradients first (a failure there costs nothing of the slower official run)
    loss_rwkvx = args.rwkvx_loss
    tmpdir = None
    grads_path = args.grads
    if args.rwkvx:
        tmpdir = tempfile.TemporaryDirectory(prefix="official_grads_")
        grads_path = os.path.join(tmpdir.name, "rwkvx_grads.safetensors")
        loss_rwkvx = run_rwkvx(args.rwkvx, case, grads_path, args.device, args.rwkvx_fp32, args.rwkvx_arg)

    src = os.path.abspath(args.official_src)
    if os.path.isdir(os.path.join(src, "pretrain")):
        src = os.path.join(src, "pretrain")
    if not os.path.isfile(os.path.join(src, "src", "model.py")):
        sys.exit(f"no src/model.py under {src}")

    # environment exactly as pretrain/train.py sets it (as train_official.py does)
    os.environ["RWKV_MY_TESTING"] = "x070"
    os.environ["RWKV_CTXLEN"] = str(T)
    os.environ["RWKV_HEAD_SIZE_A"] = "64"
    os.environ["RWKV_TRAIN_TYPE"] = ""
    os.environ["RWKV_FLOAT_MODE"] = "bf16"
    os.environ["RWKV_JIT_ON"] = "1"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", "/tmp/tpeer_torch_ext")

    import torch
    import torch.nn.functional as F
    from official_rwkvx_cpu import load_safetensors  # beside this file: the plain safetensors reader

    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = args.device == "cpu"
    dev = torch.device(args.device)
    if not cpu:
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True

    ensure_lightning(notes)
    ensure_einops(notes)
    TO.install_stubs()
    # the shim's CPU path (used by the official moba_attn_varlen in the fp64 check) keeps fp64
    TO._ref_varlen_fwd, TO._ref_varlen_bwd = _ref_varlen_fwd, _ref_varlen_bwd

    cwd = os.getcwd()
    os.chdir(src)  # model.py compiles 'cuda/wkv7_cuda.cu' relative to the working directory
    sys.path.insert(0, src)
    t0 = time.perf_counter()
    saved_fd = os.dup(1)
    os.dup2(2, 1)  # keep stdout for the JSON line: the extension build is verbose
    try:
        if cpu:
            import torch.utils.cpp_extension as cpe
            real_load = cpe.load
            cpe.load = lambda *a, **k: None
            try:
                import src.model as M
            finally:
                cpe.load = real_load
        else:
            import src.model as M
    finally:
        sys.stdout.flush()
        os.dup2(saved_fd, 1)
        os.close(saved_fd)
    os.chdir(cwd)
    print(f"[official code imported from {src} in {time.perf_counter() - t0:.1f} s]", file=sys.stderr, flush=True)

    # no left padding (see the docstring): CHUNK_LEN only enters the padding arithmetic and the CUDA assert
    kernel_chunk = M.CHUNK_LEN
    M.CHUNK_LEN = 1
    notes.append(f"no left padding (official pads to a multiple of {kernel_chunk} with 261; rwkvx grad does not)")
    oracle = None
    if cpu:
        M.RUN_CUDA_RWKV7g = ref_rwkv7_exact
        oracle = MobaOracle(M.moba_attn_varlen, check=not args.no_moba_check)
        M.moba_attn_varlen = oracle
        notes.append("fp64 CPU: wkv7 kernel -> per-step torch recurrence in fp64; moba_attn_varlen -> fp64 "
                     "masked softmax with the official selection")
    else:
        official_kernel = M.RUN_CUDA_RWKV7g

        def padded_kernel(q, w, k, v, a, b):
            Tn = q.shape[1]
            p = (-Tn) % kernel_chunk
            if p:
                q, w, k, v, a, b = [F.pad(t, (0, 0, 0, p)).contiguous() for t in (q, w, k, v, a, b)]
            return official_kernel(q, w, k, v, a, b)[:, :Tn]

        M.RUN_CUDA_RWKV7g = padded_kernel
        notes.append(f"cuda bf16: official wkv7 kernel (inputs right-padded with zeros to a multiple of "
                     f"{kernel_chunk}), official moba_attn_varlen on the torch flash-attention shim")

    # --- the model, as train_official.py builds it, then the case's weights ---
    ns = types.SimpleNamespace(
        n_layer=L, n_embd=C, vocab_size=V, ctx_len=T,
        dim_att=C, dim_ffn=int((C * 3.5) // 32 * 32), head_size_a=64, head_size_divisor=8,
        dropout=0, grad_cp=args.grad_cp, use_longce=False, my_testing="x070", train_type="",
        weight_decay=0.001, lr_init=1e-5, lr_final=1e-5, betas=(0.9, 0.99), adam_eps=1e-18, micro_bsz=1,
        n_moba_layer=NM, moba_chunk_size=chunk, moba_topk=topk, pre_ffn=0, head_qk=0,
        my_pos_emb=0, tiny_att_dim=0, my_qa_mask=0, layerwise_lr=0, precision="bf16", accelerator="gpu",
        strategy="deepspeed_stage_1", devices=1, num_nodes=1)
    ns.n_head = ns.dim_att // ns.head_size_a
    mcfg = types.SimpleNamespace(n_moba_layer=NM, n_head=ns.n_head, n_embd=C, moba_chunk_size=chunk, moba_topk=topk)
    torch.manual_seed(0)
    rwkv = M.RWKV(ns)
    if NM == 0:
        real_init = M.RWKVHybrid.init_moba_from_rwkv
        M.RWKVHybrid.init_moba_from_rwkv = lambda self: None  # official: len(blocks) // 0
        try:
            model = M.RWKVHybrid(rwkv, ns, mcfg)
        finally:
            M.RWKVHybrid.init_moba_from_rwkv = real_init
        notes.append("n_moba 0: init_moba_from_rwkv skipped (ZeroDivisionError in the official code)")
    else:
        model = M.RWKVHybrid(rwkv, ns, mcfg)

    sd = torch.load(os.path.join(case, "model.pth"), map_location="cpu", weights_only=True)
    plain = not any(k.startswith("rwkv.") for k in sd)
    if plain:
        sd = {"rwkv." + k: v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True)
    # the file rwkvx reads must hold the same weights
    st = load_safetensors(os.path.join(case, "model.safetensors"))
    st = {("rwkv." + k if plain else k): v for k, v in st.items()}
    wdiff = max((st[k].double() - v.double()).abs().max().item() for k, v in sd.items()) if set(st) == set(sd) else None
    if wdiff is None:
        sys.exit("model.safetensors and model.pth hold different tensor names")
    if wdiff != 0:
        notes.append(f"model.safetensors differs from model.pth by max {wdiff:.3g}")
    model = model.to(dev)
    model = model.double() if cpu else model.bfloat16()
    model.train()

    x = torch.tensor(tokens[:-1], dtype=torch.long, device=dev)[None]
    y = torch.tensor(tokens[1:], dtype=torch.long, device=dev)[None]
    t0 = time.perf_counter()
    loss = model.training_step((x, y), 0)  # forward + CE + L2Wrap (identity on the value)
    loss.backward()
    if not cpu:
        torch.cuda.synchronize()
    t_off = time.perf_counter() - t0
    loss_official = float(loss.detach())
    print(f"[official] training_step + backward in {t_off:.1f} s ({'fp64 CPU' if cpu else 'bf16 CUDA'}), "
          f"T {T}, loss {loss_official:.12g}", file=sys.stderr, flush=True)

    ref = {}
    for n, p in model.named_parameters():
        key = n[len("rwkv."):] if plain else n
        ref[key] = (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu", torch.float64)

    got = load_safetensors(grads_path)
    got = {k: v.double() for k, v in got.items()}

    # --- comparison ---
    errors = []
    rows = []
    gmax_ref = gmax_d = 0.0
    for name, r in ref.items():
        if name not in got:
            errors.append(f"missing in rwkvx: {name}")
            continue
        g = got[name]
        if tuple(g.shape) != tuple(r.shape):
            errors.append(f"shape differs: {name} official {tuple(r.shape)} rwkvx {tuple(g.shape)}")
            continue
        mr = r.abs().max().item()
        md = (g - r).abs().max().item()
        rel = md / mr if mr > 0 else (0.0 if md == 0 else math.inf)
        gmax_ref, gmax_d = max(gmax_ref, mr), max(gmax_d, md)
        rows.append((name, tuple(r.shape), mr, md, rel))
    for name in got:
        if name not in ref:
            errors.append(f"not an official parameter: {name}")

    w = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':<{w}}  {'shape':<14} {'max|ref|':>10} {'max|d|':>10} {'rel':>10}", file=tout)
    for name, shp, mr, md, rel in rows:
        print(f"{name:<{w}}  {str(list(shp)):<14} {mr:10.3e} {md:10.3e} {rel:10.3e}", file=tout)
    worst = max(rows, key=lambda r: r[4]) if rows else None
    print(f"{len(rows)} tensors; worst {worst[4]:.3e} ({worst[0]}); global max|d|/max|ref| "
          f"{(gmax_d / gmax_ref if gmax_ref else 0):.3e}" if worst else "no tensors compared", file=tout)
    lrel = abs(loss_rwkvx - loss_official) / abs(loss_official) if loss_rwkvx is not None else None
    print(f"loss official {loss_official:.12g}  rwkvx {loss_rwkvx if loss_rwkvx is not None else 'n/a'}"
          + (f"  rel {lrel:.3e}" if lrel is not None else ""), file=tout)
    if oracle is not None and oracle.n_calls:
        print(f"official moba check ({oracle.n_calls} MoBA layers): official moba_attn_varlen vs fp64 masked "
              f"softmax: out {oracle.check_out:.3e}, grads {oracle.check_grad:.3e} (rel); smallest top-k "
              f"selection margin {oracle.min_margin:.3e} (rel {oracle.min_margin_rel:.3e})", file=tout)
    for e in errors:
        print("ERROR: " + e, file=sys.stderr)

    summary = {
        "case": os.path.basename(case.rstrip("/")),
        "worst_rel_err": worst[4] if worst else None,
        "worst_tensor": worst[0] if worst else None,
        "global_rel_err": gmax_d / gmax_ref if gmax_ref else None,
        "loss_official": loss_official,
        "loss_rwkvx": loss_rwkvx,
        "loss_rel_err": lrel,
        "n_tensors": len(rows),
        "T": T,
        "official": "fp64 CPU autograd" if cpu else "bf16 CUDA autograd (official kernels)",
        "errors": errors,
        "notes": "; ".join(notes),
    }
    if oracle is not None and oracle.n_calls:
        summary["moba_official_vs_oracle"] = {"out": oracle.check_out, "grad": oracle.check_grad}
        summary["moba_min_selection_margin"] = oracle.min_margin
        summary["moba_min_selection_margin_rel"] = oracle.min_margin_rel
    print(json.dumps(summary), flush=True)
    if tmpdir is not None:
        tmpdir.cleanup()
    if errors:
        sys.exit(1)
    if args.tol is not None and worst is not None and worst[4] > args.tol:
        sys.exit(2)


if __name__ == "__main__":
    main()
