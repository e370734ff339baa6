#include "backend/reference/reference_backend.h"

#include <cmath>
#include <cstring>

namespace rwkvx {

std::unique_ptr<Backend> make_reference_backend() { return std::make_unique<ref::ReferenceBackend>(); }

namespace ref {
namespace {

void check_same(const Tensor& a, const Tensor& b, const char* op) {
  RWKVX_ASSERT(a.numel() == b.numel(), std::string(op) + ": shapes " + a.shape_str() + " vs " + b.shape_str());
}

// 64-byte aligned host storage for a tensor of `shape`, contents undefined.
Tensor host_tensor(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t;
  t.dtype = dtype;
  t.device = Device::cpu;
  t.ndim = int(shape.size());
  RWKVX_ASSERT(t.ndim <= 4, "too many dimensions");
  int i = 0;
  for (int64_t d : shape) t.shape[i++] = d;
  const size_t bytes = std::max<size_t>(t.nbytes(), 1);
  void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (!p) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
  t.storage = std::shared_ptr<void>(p, std::free);
  t.data = p;
  return t;
}

}  // namespace

Tensor ReferenceBackend::alloc(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = host_tensor(dtype, shape);
  std::memset(t.data, 0, std::max<size_t>(t.nbytes(), 1));
  return t;
}

Tensor ReferenceBackend::alloc_uninit(DType dtype, std::initializer_list<int64_t> shape) {
  Tensor t = host_tensor(dtype, shape);
#ifndef NDEBUG
  // Builds with assertions (the tests' sanitizer build) fill it with NaN bytes, so an op that leaves part
  // of its output unwritten shows in every golden comparison.
  std::memset(t.data, 0xFF, std::max<size_t>(t.nbytes(), 1));
#endif
  return t;
}

Tensor ReferenceBackend::upload_weight(const StoredTensor& src, std::initializer_list<int64_t> shape) {
  Tensor t = alloc(DType::f32, shape);
  RWKVX_ASSERT(t.numel() == src.numel(), "upload_weight: " + src.name + " reshaped to a different size");
  convert_to_f32(src.dtype, src.data, t.f32(), size_t(t.numel()));
  return t;
}

void ReferenceBackend::to_host(const Tensor& src, float* dst) {
  RWKVX_ASSERT(src.dtype == DType::f32 || src.dtype == DType::bf16, "to_host: f32 or bf16 tensors only");
  convert_to_f32(src.dtype, src.data, dst, size_t(src.numel()));
}
void ReferenceBackend::from_host(const float* src, Tensor& dst) {
  if (dst.dtype == DType::bf16) {
    auto* d = static_cast<uint16_t*>(dst.data);
    for (int64_t i = 0; i < dst.numel(); ++i) d[i] = f32_to_bf16(src[i]);
    return;
  }
  std::memcpy(dst.f32(), src, dst.nbytes());
}
void ReferenceBackend::copy(const Tensor& src, Tensor& dst) {
  RWKVX_ASSERT(src.dtype == dst.dtype && src.numel() == dst.numel(), "copy: mismatched tensors");
  std::memcpy(dst.data, src.data, src.nbytes());
}
void ReferenceBackend::fill_zero(Tensor& t) { std::memset(t.data, 0, t.nbytes()); }

void ReferenceBackend::embedding(const Tensor& E, const int32_t* ids, int64_t n, Tensor& out) {
  const int64_t C = E.row_size();
  RWKVX_ASSERT(out.rows() == n && out.row_size() == C, "embedding: bad output shape");
  for (int64_t t = 0; t < n; ++t) {
    RWKVX_ASSERT(ids[t] >= 0 && ids[t] < E.rows(), "embedding: id out of range");
    std::memcpy(out.f32() + t * C, E.f32() + int64_t(ids[t]) * C, size_t(C) * 4);
  }
}

void ReferenceBackend::layer_norm(const Tensor& x, const Tensor& w, const Tensor& b, float eps, Tensor& out) {
  check_same(x, out, "layer_norm");
  const int64_t C = w.numel(), T = x.numel() / C;
  for (int64_t t = 0; t < T; ++t) {
    const float* xi = x.f32() + t * C;
    float* o = out.f32() + t * C;
    double mean = 0, var = 0;
    for (int64_t c = 0; c < C; ++c) mean += xi[c];
    mean /= double(C);
    for (int64_t c = 0; c < C; ++c) var += (xi[c] - mean) * (xi[c] - mean);
    var /= double(C);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (int64_t c = 0; c < C; ++c) o[c] = float((xi[c] - mean) * inv * w.f32()[c] + b.f32()[c]);
  }
}

void ReferenceBackend::linear(const Tensor& x, const Tensor& W, Tensor& out) {
  const int64_t T = x.rows(), in = x.row_size(), n_out = W.rows();
  RWKVX_ASSERT(W.row_size() == in && out.rows() == T && out.row_size() == n_out,
               "linear: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  for (int64_t t = 0; t < T; ++t) {
    const float* xi = x.f32() + t * in;
    for (int64_t o = 0; o < n_out; ++o) {
      const float* wr = W.f32() + o * in;
      double acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += double(xi[i]) * wr[i];
      out.f32()[t * n_out + o] = float(acc);
    }
  }
}

void ReferenceBackend::matmul(const Tensor& x, const Tensor& W, Tensor& out) {
  const int64_t T = x.rows(), in = x.row_size(), n_out = W.row_size();
  RWKVX_ASSERT(W.rows() == in && out.rows() == T && out.row_size() == n_out,
               "matmul: x " + x.shape_str() + " W " + W.shape_str() + " out " + out.shape_str());
  std::vector<double> acc(static_cast<size_t>(n_out));
  for (int64_t t = 0; t < T; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int64_t i = 0; i < in; ++i) {
      const double xv = x.f32()[t * in + i];
      const float* wr = W.f32() + i * n_out;
      for (int64_t o = 0; o < n_out; ++o) acc[size_t(o)] += xv * wr[o];
    }
    for (int64_t o = 0; o < n_out; ++o) out.f32()[t * n_out + o] = float(acc[size_t(o)]);
  }
}

void ReferenceBackend::tanh_(Tensor& x) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = std::tanh(x.f32()[i]);
}
void ReferenceBackend::sigmoid_(Tensor& x) {
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] = sigmoid(x.f32()[i]);
}
void ReferenceBackend::relu_square_(Tensor& x) {
  for (int64_t i = 0; i < x.numel(); ++i) {
    float v = std::max(x.f32()[i], 0.0f);
    x.f32()[i] = v * v;
  }
}
void ReferenceBackend::add_(Tensor& x, const Tensor& y) {
  check_same(x, y, "add_");
  for (int64_t i = 0; i < x.numel(); ++i) x.f32()[i] += y.f32()[i];
}

void ReferenceBackend::token_shift(const Tensor& x, Tensor& shift, const SeqBatch& batch, Tensor& delta) {
  check_same(x, delta, "token_shift");
  const int64_t C = x.row_size();
  for (int64_t s = 0; s < batch.n_seq(); ++s) {
    const int64_t r0 = batch.row_start[size_t(s)], r1 = batch.row_start[size_t(s) + 1];
    float* prev_state = shift.f32() + int64_t(batch.slot[size_t(s)]) * C;
    for (int64_t t = r0; t < r1; ++t) {
      const float* prev = t == r0 ? prev_state : x.f32() + (t - 1) * C;
      for (int64_t c = 0; c < C; ++c) delta.f32()[t * C + c] = prev[c] - x.f32()[t * C + c];
    }
    if (r1 > r0) std::memcpy(prev_state, x.f32() + (r1 - 1) * C, size_t(C) * 4);
  }
}

void ReferenceBackend::shift_mix(const Tensor& x, const Tensor& delta, const Tensor& mu, Tensor& out) {
  check_same(x, delta, "shift_mix");
  check_same(x, out, "shift_mix");
  const int64_t C = mu.numel();
  for (int64_t i = 0; i < x.numel(); ++i) out.f32()[i] = x.f32()[i] + delta.f32()[i] * mu.f32()[i % C];
}

}  // namespace ref
}  // namespace rwkvx
