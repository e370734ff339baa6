// The CUDA backend (built with -DRWKVX_CUDA=ON): tensors in device memory, GEMMs through cuBLASLt, fused
// RWKV-7 and sparse-attention kernels. See cuda_internal.h for the class and the file layout.
#pragma once
#include <memory>
#include <string>

#include "backend/ops.h"

namespace rwkvx {

struct CudaBackendOptions {
  int device = 0;
  // GEMMs of more than 8 rows with bf16 weights (prefill) multiply activations split into two bf16 parts
  // (hi + lo, ~16 mantissa bits: golden cases match to ~1e-5, top-k chunk choices agree with fp32), and the
  // prefill attention tiles split Q, P and fp32 K/V the same way (three tensor-core products per term).
  // true: one bf16 rounding for both, half the GEMM work and a third of the attention work, ~1e-3 relative
  // error per product, which can flip near-tied top-k chunk choices (golden rwkvx-tiny: 7e-2); `--device
  // cuda` reads it from RWKVX_CUDA_FAST_BF16=1. Up to 8 rows (decode) always use fp32 activations.
  bool single_bf16_activations = false;
  // Only the prefill attention tiles round Q, P and K/V once to bf16 (as cuDNN/FlashAttention do); GEMM
  // activations stay split and the top-k gate stays fp64, so chunk choices agree with the reference.
  // `--device cuda` reads it from RWKVX_CUDA_ATTN_BF16=1.
  bool single_bf16_attention = false;
  // Prefill GEMMs with bf16 weights and split activations run as one GEMM over 2K against a second copy of
  // each weight laid out twice along K (made on first use, at most 1/8 of device memory: +1× the bf16
  // weight bytes), instead of two GEMMs whose second adds into the first's fp32 output. false: no copies.
  // `--device cuda` reads it from RWKVX_CUDA_WEIGHT_COPIES=0.
  bool split_gemm_weight_copies = true;
  // Decode steps (one row per sequence) of supported models run as one fused step (cuda_decode.cu): false =
  // op by op. `decode_graph`: the fused step's kernels are captured once per batch size as a CUDA graph and
  // replayed; false = launched one by one (same kernels, same results). Environment: RWKVX_CUDA_STEP_DECODER=0
  // and RWKVX_CUDA_GRAPH=0 turn them off for `--device cuda`.
  bool step_decoder = true;
  bool decode_graph = true;
  // WKV-7 over long sequences runs segment-parallel (cuda_rwkv7.cu): the rows of a sequence are cut into
  // segments of this many rows, which run at once. -1 = chosen from the size of the call and the GPU
  // (RWKVX_CUDA_WKV_SEGMENT overrides it), 0 = no segments (one sequential pass per sequence and head).
  int wkv_segment_rows = -1;
  // alloc_uninit fills its tensors with NaN (tests: an op that leaves part of its output unwritten shows).
  bool poison_uninit = false;
};

// True when a CUDA device can be used; otherwise false and `why` (if given) says what is missing.
bool cuda_device_available(std::string* why = nullptr);
// The CUDA backend. Throws rwkvx::Error when no device can be used.
std::unique_ptr<Backend> make_cuda_backend(const CudaBackendOptions& options = {});

}  // namespace rwkvx
