// The op contract's batching (SeqBatch + state slots), which batched decode and continuous batching
// build on: several sequences in one call, in any slot order, equal the same sequences run alone.
#include <gtest/gtest.h>

#include "support/random_model.h"

namespace rwkvx {
namespace {

TEST(Batching, MixedSequencesEqualSeparateRuns) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 2, s.n_sparse = 2, s.seed = 41;
  ModelOptions opt;
  opt.chunk = 4;
  opt.top_k = 2;
  auto m = test::load_random_model(s, opt, *be);
  const int64_t V = s.n_vocab;
  const std::vector<int64_t> len = {13, 1, 22};
  const std::vector<int32_t> slot = {2, 0, 1};
  std::vector<std::vector<int32_t>> seqs;
  for (size_t i = 0; i < len.size(); ++i) seqs.push_back(test::random_tokens(2 * len[i] + 5, V, 100 + i));

  // Alone: each sequence as a prefill of len[i] tokens, then 5 single-token steps, then the rest.
  std::vector<std::vector<float>> alone;
  for (size_t i = 0; i < seqs.size(); ++i) {
    State st = m->new_state();
    std::vector<int64_t> pieces = {len[i], 1, 1, 1, 1, 1, len[i]};
    alone.push_back(test::run_pieces(*m, st, seqs[i], pieces));
  }

  // Together: the same schedule, all sequences in each call, slots permuted.
  State st = m->new_state(3);
  std::vector<std::vector<float>> together(seqs.size());
  std::vector<int64_t> done(seqs.size(), 0);
  for (int step = 0; step < 7; ++step) {
    SeqBatch b;
    b.row_start = {0};
    std::vector<int32_t> ids;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int64_t n = (step == 0 || step == 6) ? len[i] : 1;
      ids.insert(ids.end(), seqs[i].begin() + done[i], seqs[i].begin() + done[i] + n);
      b.row_start.push_back(b.row_start.back() + n);
      b.slot.push_back(slot[i]);
    }
    std::vector<float> l = test::host(*be, m->forward(ids.data(), b, st, LogitsMode::all));
    for (size_t i = 0; i < seqs.size(); ++i) {
      const int64_t n = b.row_start[i + 1] - b.row_start[i];
      together[i].insert(together[i].end(), l.begin() + b.row_start[i] * V, l.begin() + (b.row_start[i] + n) * V);
      done[i] += n;
    }
  }
  for (size_t i = 0; i < seqs.size(); ++i) {
    EXPECT_LE(test::rel_max_err(together[i], alone[i]), 1e-6) << "sequence " << i;
    EXPECT_EQ(st.pos[size_t(slot[i])], int64_t(seqs[i].size()));
  }
}

// A call longer than max_rows_per_call runs as consecutive windows of rows; the windows cut sequences
// anywhere, so logits (all rows, or the last of each sequence) and states equal one big call.
TEST(Batching, LongCallsRunInWindowsLikeOneCall) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 128, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 43;
  ModelOptions whole, windows;
  whole.chunk = windows.chunk = 4;
  windows.max_rows_per_call = 5;
  auto a = test::load_random_model(s, whole, *be), b = test::load_random_model(s, windows, *be);
  const SeqBatch batch{{0, 13, 13, 14, 36}, {2, 3, 0, 1}};  // an empty sequence, a one-token one, long ones
  const std::vector<int32_t> ids = test::random_tokens(batch.n_rows(), s.n_vocab, 7);
  for (LogitsMode mode : {LogitsMode::all, LogitsMode::last}) {
    State sa = a->new_state(4), sb = b->new_state(4);
    std::vector<float> la = test::host(*be, a->forward(ids.data(), batch, sa, mode));
    std::vector<float> lb = test::host(*be, b->forward(ids.data(), batch, sb, mode));
    ASSERT_EQ(la.size(), lb.size());
    EXPECT_LE(test::rel_max_err(lb, la), 1e-6);
    EXPECT_EQ(sa.pos, sb.pos);
    for (size_t m = 0; m < sa.kv.size(); ++m)
      for (int slot = 0; slot < 4; ++slot) EXPECT_EQ(sa.kv[m][size_t(slot)].len, sb.kv[m][size_t(slot)].len);
  }
}

TEST(Batching, LastLogitsPerSequenceAndSlotReset) {
  auto be = make_reference_backend();
  RandomModelSpec s;
  s.n_embd = 64, s.n_rwkv = 2, s.n_sparse = 1, s.seed = 42;
  ModelOptions opt;
  opt.chunk = 3;
  auto m = test::load_random_model(s, opt, *be);
  std::vector<int32_t> a = test::random_tokens(9, s.n_vocab, 1), b = test::random_tokens(4, s.n_vocab, 2);
  State st = m->new_state(2);
  std::vector<int32_t> ids = a;
  ids.insert(ids.end(), b.begin(), b.end());
  SeqBatch batch{{0, 9, 13}, {1, 0}};
  std::vector<float> last = test::host(*be, m->forward(ids.data(), batch, st, LogitsMode::last));
  ASSERT_EQ(int64_t(last.size()), 2 * s.n_vocab);
  State sa = m->new_state();
  std::vector<float> full_a = test::run_pieces(*m, sa, a, {9});
  std::vector<float> want(full_a.end() - s.n_vocab, full_a.end()), got(last.begin(), last.begin() + s.n_vocab);
  EXPECT_LE(test::rel_max_err(got, want), 1e-6);
  // Resetting slot 1 makes it start a fresh sequence again; slot 0 is untouched.
  m->reset_slot(st, 1);
  EXPECT_EQ(st.pos[1], 0);
  EXPECT_EQ(st.pos[0], 4);
  std::vector<float> again = test::host(*be, m->forward(a.data(), SeqBatch::single(9, 1), st, LogitsMode::all));
  EXPECT_LE(test::rel_max_err(again, full_a), 1e-6);
}

}  // namespace
}  // namespace rwkvx
