// Context-parallel prefill on the CUDA backend without NCCL: W ranks run in turn on one GPU through an
// in-memory link (device copies); the last rank's logits must equal Model::forward over the whole
// sequence bit for bit (same windows, same kernels, same state). The NCCL path is exercised by
// scripts/bench_context_parallel.sh on 2 GPUs. Without a GPU the test skips.
#include <gtest/gtest.h>

#include <cstring>

#include "backend/cuda/cuda_backend.h"
#include "runtime/context_parallel.h"
#include "support/memory_link.h"
#include "support/random_model.h"

namespace rwkvx {
namespace {

TEST(CudaContextParallel, RanksInTurnEqualTheWholeForward) {
  std::string why;
  if (!cuda_device_available(&why)) GTEST_SKIP() << "no CUDA device (" << why << ")";
  auto be = make_cuda_backend({});
  for (DType kv : {DType::f32, DType::bf16}) {
    RandomModelSpec s;
    s.n_embd = 128, s.n_rwkv = 4, s.n_sparse = 2, s.seed = 31, s.dtype = DType::bf16;
    ModelOptions opt;
    opt.chunk = 64, opt.top_k = 3, opt.kv_dtype = kv, opt.max_rows_per_call = 256;
    auto model = test::load_random_model(s, opt, *be);
    const int64_t T = 1100;
    const std::vector<int32_t> ids = test::random_tokens(T, s.n_vocab, 9);
    State whole = model->new_state(1);
    const std::vector<float> ref =
        test::host(*be, model->forward(ids.data(), SeqBatch::single(T), whole, LogitsMode::last));
    for (int W = 1; W <= 4; ++W) {
      SCOPED_TRACE("world " + std::to_string(W) + (kv == DType::bf16 ? ", bf16 KV" : ""));
      test::Mailbox box;
      std::vector<float> got;
      for (int r = 0; r < W; ++r) {
        test::MemoryLink link(*be, r, box);
        State st = model->new_state(1);
        Tensor l = context_parallel_prefill(*model, ids.data(), T, r, W, &link, st, nullptr, W == 3 ? 1.2 : 0.0);
        if (r == W - 1) {
          got = test::host(*be, l);
          if (kv == DType::f32) {
            EXPECT_EQ(test::state_diff(*be, st, whole), 0.0);  // to_host: fp32 only
          }
        }
      }
      ASSERT_EQ(got.size(), ref.size());
      EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0);
    }
  }
}

}  // namespace
}  // namespace rwkvx
