// The one place that chooses a compute backend and loads a model for the user-facing commands
// (generate, chat, serve): the model comes with a fingerprint of its checkpoint, which state files
// and caches use to tell models apart.
#pragma once
#include <memory>
#include <string>

#include "model/model.h"

namespace rwkvx {

// "cpu": the fast CPU backend (SIMD, threads, weights in stored precision, or int8 with `int8`);
// "reference": the fp32 reference loops (the oracle; slow); "cuda": the CUDA backend when this build has it
// and a GPU is present, else the CPU backend with a one-line notice on stderr. Anything else throws
// rwkvx::Error. `int8` on a device without int8 weights is an error, not silently ignored.
// cuda_device: the GPU index for --device cuda (one process per GPU: LOCAL_RANK).
std::unique_ptr<Backend> make_backend(const std::string& device, bool int8 = false, int cuda_device = 0);

struct LoadedModel {
  std::unique_ptr<Model> model;
  std::string path;         // checkpoint path ("" when built from memory)
  std::string fingerprint;  // fingerprint_checkpoint() of the weights, 16 hex digits
};

// Model::load plus the fingerprint. Throws rwkvx::Error naming the file on any problem.
LoadedModel load_model(const std::string& path, const ModelOptions& options, Backend& backend);
LoadedModel load_model(const TensorStore& store, const ModelOptions& options, Backend& backend);

// Identity of a checkpoint's weights, cheap enough to compute at every load: a 64-bit hash of every
// tensor's name, dtype and shape plus a sample of its bytes (all of it below 64 KiB, else 16 windows
// of 4 KiB spread evenly over the tensor). Two different trainings or random seeds of one shape differ
// in every window; a file re-saved in another format (.pth vs .safetensors, same dtype) keeps it.
std::string fingerprint_checkpoint(const TensorStore& store);

}  // namespace rwkvx
