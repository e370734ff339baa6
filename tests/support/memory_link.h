// An in-process CpLink for context-parallel tests: sends are queued backend copies in a shared mailbox,
// and ranks run one after another (0, 1, ...) so every recv finds its message. Works on any backend (host
// or device tensors).
#pragma once
#include <gtest/gtest.h>

#include <deque>
#include <map>
#include <utility>

#include "runtime/context_parallel.h"

namespace rwkvx::test {

using Mailbox = std::map<std::pair<int, int>, std::deque<Tensor>>;  // (from, to) → messages in order

class MemoryLink final : public CpLink {
 public:
  MemoryLink(Backend& be, int rank, Mailbox& box) : be_(be), rank_(rank), box_(box) {}
  void send(const Tensor& t, int peer) override {
    Tensor c = be_.alloc(t.dtype, {t.numel()});
    be_.copy(t, c);
    box_[{rank_, peer}].push_back(c);
  }
  void recv(Tensor& t, int peer) override {
    auto& q = box_[{peer, rank_}];
    ASSERT_FALSE(q.empty());
    ASSERT_EQ(q.front().numel(), t.numel());
    be_.copy(q.front(), t);
    q.pop_front();
  }

 private:
  Backend& be_;
  int rank_;
  Mailbox& box_;
};

}  // namespace rwkvx::test
