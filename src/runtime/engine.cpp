// Backend choice and model loading with a checkpoint fingerprint (see engine.h).
#include "runtime/engine.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "backend/cpu/cpu_backend.h"
#ifdef RWKVX_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#endif
#include "runtime/hash64.h"

namespace rwkvx {

std::unique_ptr<Backend> make_backend(const std::string& device, bool int8, int cuda_device) {
  if (int8 && device != "cpu") throw Error("--int8 is a fast CPU backend option (--device cpu), not " + device);
  if (device == "cpu") {
    CpuBackendOptions o;
    o.quantize_int8 = int8;
    return make_cpu_backend(o);
  }
  if (device == "reference") return make_reference_backend();
  if (device == "cuda") {
#ifdef RWKVX_HAVE_CUDA
    std::string why;
    if (cuda_device_available(&why)) {
      CudaBackendOptions o;
      o.device = cuda_device;
      const char* fast = std::getenv("RWKVX_CUDA_FAST_BF16");
      o.single_bf16_activations = fast && std::string(fast) == "1";
      const char* attn = std::getenv("RWKVX_CUDA_ATTN_BF16");
      o.single_bf16_attention = attn && std::string(attn) == "1";
      const char* step = std::getenv("RWKVX_CUDA_STEP_DECODER");
      const char* graph = std::getenv("RWKVX_CUDA_GRAPH");
      o.step_decoder = !(step && std::string(step) == "0");
      o.decode_graph = !(graph && std::string(graph) == "0");
      return make_cuda_backend(o);
    }
    std::fprintf(stderr, "rwkvx: --device cuda: no usable GPU (%s); running on the CPU backend instead\n", why.c_str());
#else
    std::fprintf(stderr, "rwkvx: --device cuda: this build has no CUDA backend (configure with -DRWKVX_CUDA=ON); "
                         "running on the CPU backend instead\n");
#endif
    return make_cpu_backend();
  }
  throw Error("unknown device '" + device + "': expected cpu, reference or cuda");
}

std::string fingerprint_checkpoint(const TensorStore& store) {
  constexpr size_t kWhole = 64 << 10, kWindow = 4 << 10, kWindows = 16;
  Hash64 h;
  h.update("rwkvx-checkpoint-fingerprint-v1");
  for (const auto& [name, t] : store.tensors) {  // std::map: name order
    h.update(name);
    h.update(dtype_name(t.dtype));
    h.update_u64(t.shape.size());
    for (int64_t d : t.shape) h.update_u64(uint64_t(d));
    const size_t n = t.nbytes();
    if (n <= kWhole) {
      h.update(t.data, n);
    } else {
      for (size_t i = 0; i < kWindows; ++i) h.update(t.data + (n - kWindow) / (kWindows - 1) * i, kWindow);
    }
  }
  return h.hex();
}

LoadedModel load_model(const TensorStore& store, const ModelOptions& options, Backend& backend) {
  LoadedModel m;
  m.path = store.path;
  m.fingerprint = fingerprint_checkpoint(store);
  m.model = Model::from_store(store, options, backend);
  return m;
}

LoadedModel load_model(const std::string& path, const ModelOptions& options, Backend& backend) {
  TensorStore store = load_checkpoint(path);
  LoadedModel m = load_model(store, options, backend);
  m.path = path;
  return m;
}

}  // namespace rwkvx
