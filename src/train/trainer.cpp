// The `rwkvx train` loop: data, stage, optimizer, schedule, checkpoints, exact-resume states, loss log.
// Determinism: every sequence's gradient is computed into zeroed buffers and the batch gradient is their
// sum in batch order, and the ops split their work by shape alone (train/ops/parallel.h), so the result
// depends on neither `threads` nor `parallel_sequences`, and a resumed run (fp32 weights, AdamW
// moments and the step restored; the data position is a function of the step) repeats the uninterrupted
// one bit for bit.
// Data parallel (WORLD_SIZE > 1, device cuda; docs/training.md "Data-parallel training"): one process per
// GPU; `micro_bsz` stays the global batch, rank r trains the samples b ≡ r (mod world) of each step, the
// gradients are summed over the ranks into each tensor's ZeRO-1 owner (dist/cuda/dist_adamw.h), and rank
// 0 alone writes loss.csv, checkpoints and states (the same files as one process writes, so a state
// resumes on any GPU count).
#include "train/trainer.h"

#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/atomic_file.h"
#include "core/error.h"
#include "model/formats/pth_writer.h"
#include "model/formats/safetensors_writer.h"
#include "runtime/tokenizer.h"
#include "train/data/binidx.h"
#include "train/data/sampler.h"
#include "train/data/sft_data.h"
#include "train/dist/dist.h"
#include "train/loss_plot.h"
#include "core/thread_pool.h"
#include "train/ops/fast.h"
#include "train/ops/parallel.h"
#include "train/optimizer.h"
#include "train/schedule.h"
#include "train/train_model.h"
#ifdef RWKVX_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "train/cuda/cuda_train_model.h"
#include "train/dist/cuda/dist_adamw.h"
#include "train/dist/cuda/nccl_comm.h"
#endif

namespace rwkvx::train {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

constexpr const char* kStateFormat = "rwkvx-train-state";
constexpr int kStateVersion = 1;

struct LossRow {
  int64_t step = 0, tokens = 0;
  double loss = 0, lr = 0, grad_norm = 0;
};

std::string fmt_g(double x) {
  char b[40];
  std::snprintf(b, sizeof b, "%.17g", x);
  return b;
}

// Where the batches come from: pretraining windows or SFT samples, addressed by the global sample index
// real_step · B + b (spec §4.2 / §4.9: rank 0 of 1).
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual void sample(uint64_t global_sample, std::vector<int32_t>& x, std::vector<int32_t>& y) const = 0;
};

class PretrainSource : public BatchSource {
 public:
  PretrainSource(BinIdxDataset d, PretrainSampling s, int64_t max_id)
      : data_(std::move(d)), s_(s), max_id_(max_id) {}
  void sample(uint64_t g, std::vector<int32_t>& x, std::vector<int32_t>& y) const override {
    const uint64_t per_epoch = s_.samples_per_epoch();
    TokenWindow w = pretrain_sample(data_, s_, g / per_epoch, g % per_epoch, 0, max_id_);
    x = std::move(w.x), y = std::move(w.y);
  }

 private:
  BinIdxDataset data_;
  PretrainSampling s_;
  int64_t max_id_;
};

class SftSource : public BatchSource {
 public:
  SftSource(std::vector<SftSample> samples, int64_t ctx_len, uint64_t seed)
      : samples_(std::move(samples)), ctx_len_(ctx_len), seed_(seed), p_(sft_prime(samples_.size())) {}
  void sample(uint64_t g, std::vector<int32_t>& x, std::vector<int32_t>& y) const override {
    sft_window(samples_[sft_sample_index(g, samples_.size(), p_, seed_)], ctx_len_, x, y);
  }
  uint64_t prime() const { return p_; }

 private:
  std::vector<SftSample> samples_;
  int64_t ctx_len_;
  uint64_t seed_, p_;
};

// ---- files -----------------------------------------------------------------------------------------

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicFile f(path);
  f.write(text.data(), text.size());
  f.commit();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot read");
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string csv_header() { return "step,tokens,loss,lr,grad_norm\n"; }
std::string csv_row(const LossRow& r) {
  return std::to_string(r.step) + "," + std::to_string(r.tokens) + "," + fmt_g(r.loss) + "," + fmt_g(r.lr) + "," +
         fmt_g(r.grad_norm) + "\n";
}

// Rows of an existing loss.csv up to `max_step` (a resume drops the rows of steps it repeats).
std::vector<LossRow> read_loss_csv(const std::string& path, int64_t max_step) {
  std::vector<LossRow> rows;
  std::ifstream in(path);
  std::string line;
  if (!std::getline(in, line)) return rows;
  while (std::getline(in, line)) {
    LossRow r;
    if (std::sscanf(line.c_str(), "%" SCNd64 ",%" SCNd64 ",%lf,%lf,%lf", &r.step, &r.tokens, &r.loss, &r.lr,
                    &r.grad_norm) != 5)
      throw Error(path + ": malformed row '" + line + "' (expected step,tokens,loss,lr,grad_norm)");
    if (r.step <= max_step) rows.push_back(r);
  }
  return rows;
}

std::string state_dir_name(int64_t step) {
  char b[32];
  std::snprintf(b, sizeof b, "state-%08" PRId64, step);
  return b;
}

// The state directory a --resume argument names: a state dir, its state.json, or a folder of state-* dirs
// (the newest complete one).
std::string find_state(const std::string& arg) {
  fs::path p(arg);
  std::error_code ec;
  if (!fs::exists(p, ec)) throw Error("--resume " + arg + ": no such file or directory");
  if (fs::is_regular_file(p, ec)) {
    if (p.filename() != "state.json") throw Error("--resume " + arg + ": expected a state directory or its state.json");
    return p.parent_path().string();
  }
  if (fs::exists(p / "state.json", ec)) return p.string();
  std::string best;
  for (const auto& e : fs::directory_iterator(p, ec)) {
    const std::string name = e.path().filename().string();
    const bool complete = e.is_directory() && name.starts_with("state-") && !name.ends_with(".tmp") &&
                          fs::exists(e.path() / "state.json");
    if (complete && name > best) best = name;
  }
  if (best.empty()) throw Error("--resume " + arg + ": no training state found (expected state-*/state.json)");
  return (p / best).string();
}

// ---- the run ---------------------------------------------------------------------------------------

class Run {
 public:
  Run(const TrainConfig& c, const TrainRunOptions& o) : c_(c), o_(o) {}
  TrainResult go();

 private:
  void info(const std::string& s) const {
    if (o_.log && env_.rank == 0) o_.log(s);
  }
  bool writer() const { return env_.rank == 0; }  // the one process that writes files
  void load_model_and_state();
  void open_data();
  int64_t plan_steps() const;
  ScheduleValue schedule(int64_t g) const;
  double train_step(int64_t g, double& grad_norm);
  void sync_from_gpu(bool moments);  // device cuda: the GPU's weights (and moments) into model_ and opt_
  void save_checkpoint(const std::string& stem);
  std::string save_state(int64_t step);
  void write_loss_files();

  const TrainConfig& c_;
  const TrainRunOptions& o_;
  dist::DistEnv env_;
  ModelOptions mo_;
  std::unique_ptr<TrainModel> model_;  // the parameters (on the CPU: the working copy)
  std::unique_ptr<AdamW> opt_;
#ifdef RWKVX_HAVE_CUDA
  // device "cuda": the working copy and the optimizer live on the GPU; model_ and opt_ hold what was loaded
  // and receive the GPU's values and moments whenever a checkpoint or state is written.
  // Data parallel: the communicator (made first, destroyed last) and the ZeRO-1 optimizer instead of gpu_opt_.
  std::unique_ptr<dist::Communicator> comm_;
  std::unique_ptr<CudaTrainModel> gpu_;
  std::unique_ptr<CudaAdamW> gpu_opt_;
  std::unique_ptr<dist::DistAdamW> dist_opt_;
#endif
  std::vector<TrainModel> workers_;
  std::vector<std::unique_ptr<ThreadPool>> pools_;  // per sequence slot: the threads of its ops
  std::vector<std::vector<float>> acc_;
  std::unique_ptr<BatchSource> data_;
  LossOptions loss_;
  PretrainSchedule ps_;
  SftSchedule ss_;
  uint64_t prime_ = 0;
  int64_t data_tokens_ = 0;
  int64_t start_step_ = 0, tokens_seen_ = 0;
  std::vector<LossRow> rows_;
  std::string csv_path_, png_path_;
  std::unique_ptr<std::ofstream> csv_;
};

void Run::load_model_and_state() {
  mo_.chunk = c_.chunk_size;
  mo_.top_k = c_.top_k;
  std::string state_dir;
  json st;
  if (!o_.resume.empty()) {
    state_dir = find_state(o_.resume);
    const std::string sj = state_dir + "/state.json";
    try {
      st = json::parse(read_text(sj));
    } catch (const json::exception& e) {
      throw Error(sj + ": not valid JSON: " + e.what());
    }
    if (!st.is_object() || st.value("format", "") != kStateFormat || st.value("version", 0) != kStateVersion)
      throw Error(sj + ": not an rwkvx training state (format " + kStateFormat + " version " +
                  std::to_string(kStateVersion) + ")");
    // The settings that shape the trajectory must be the ones the state was trained with.
    const json& saved = st["config"];
    for (const auto& [k, v] : trajectory_keys(c_)) {
      if (!saved.contains(k) || !saved[k].is_string())
        throw Error(sj + ": the saved config has no '" + k + "'");
      if (saved[k].get<std::string>() != v)
        throw Error(c_.source + ": key '" + k + "' is " + v + " but the run being resumed (" + state_dir + ") used " +
                    saved[k].get<std::string>() + "; an exact resume needs the same value");
    }
    model_ = std::make_unique<TrainModel>(TrainModel::load(state_dir + "/weights.safetensors", mo_));
  } else {
    if (!fs::exists(c_.model)) throw Error(c_.source + ": key 'model': " + c_.model + ": no such file");
    model_ = std::make_unique<TrainModel>(TrainModel::load(c_.model, mo_));
  }
  TrainModel& m = *model_;
  if (c_.stage == TrainStage::stage1) {
    if (m.config().n_sparse == 0)
      throw Error(c_.model + ": stage1 trains only the sparse-attention blocks, and this model has none (an RWKV-7 "
                  "checkpoint?); make an RWKV-X model with `rwkvx expand` first");
    m.freeze_all_but_sparse();
  }
  m.recompute = c_.recompute;

  AdamWOptions ao;
  ao.beta1 = c_.beta1, ao.beta2 = c_.beta2, ao.eps = c_.eps, ao.weight_decay = c_.weight_decay;
  ao.grad_clip = c_.grad_clip, ao.groups = c_.groups;
  opt_ = std::make_unique<AdamW>(m, ao);

  if (!state_dir.empty()) {
    const std::string of = state_dir + "/optimizer.safetensors";
    const TensorStore os = load_checkpoint(of);
    size_t n_moments = 0;
    for (size_t i = 0; i < m.n_params(); ++i) {
      const TrainParam& p = m.param(i);
      if (!p.trainable) continue;
      for (int which = 0; which < 2; ++which) {
        const std::string name = (which == 0 ? "exp_avg." : "exp_avg_sq.") + p.name;
        const StoredTensor* t = os.find(name);
        if (!t) throw Error(of + ": missing '" + name + "' (was the state saved by another stage?)");
        std::vector<float> v = t->to_f32();
        std::vector<float>& dst = which == 0 ? opt_->exp_avg(i) : opt_->exp_avg_sq(i);
        if (t->dtype != DType::f32 || v.size() != dst.size())
          throw Error(of + ": '" + name + "' is " + std::string(dtype_name(t->dtype)) + " " + t->shape_str() +
                      ", expected f32 with " + std::to_string(dst.size()) + " values");
        dst = std::move(v);
        ++n_moments;
      }
    }
    if (n_moments != os.tensors.size())
      throw Error(of + ": holds moments of tensors that are frozen in stage " + stage_name(c_.stage));
    start_step_ = st.at("step").get<int64_t>();
    tokens_seen_ = st.at("tokens").get<int64_t>();
    opt_->set_steps(st.at("optimizer_steps").get<int64_t>());
    info("resuming from " + state_dir + " at step " + std::to_string(start_step_));
  }

  if (c_.device == "cuda") {
#ifdef RWKVX_HAVE_CUDA
    std::string why;
    if (cuda_device_available(&why)) {
      if (env_.distributed()) comm_ = std::make_unique<dist::Communicator>(env_);  // cudaSetDevice(LOCAL_RANK)
      CudaTrainOptions go;
      go.bf16_gemm = c_.bf16;
      gpu_ = std::make_unique<CudaTrainModel>(m, go);
      if (comm_) {
        dist_opt_ = std::make_unique<dist::DistAdamW>(*gpu_, ao, *comm_);
        dist_opt_->set_steps(opt_->steps());
      } else {
        gpu_opt_ = std::make_unique<CudaAdamW>(*gpu_, ao);
        gpu_opt_->set_steps(opt_->steps());
      }
      if (!state_dir.empty())
        for (size_t i = 0; i < m.n_params(); ++i) {
          if (!m.param(i).trainable) continue;
          if (dist_opt_) dist_opt_->set_moments(i, opt_->exp_avg(i), opt_->exp_avg_sq(i));
          else gpu_opt_->set_moments(i, opt_->exp_avg(i), opt_->exp_avg_sq(i));
        }
      info(std::string("device: cuda (") + (c_.bf16 ? "bf16" : "fp32") + " products, fp32 master weights)" +
           (comm_ ? ", data parallel over " + std::to_string(env_.world) +
                        " GPUs (NCCL; gradients summed into ZeRO-1 owners" +
                        (dist_opt_->overlap().on ? ", overlapped with the backward in buckets of " +
                                                       std::to_string(dist_opt_->overlap().bucket_bytes >> 20) + " MiB"
                                                 : std::string(" after the backward (RWKVX_DIST_OVERLAP=0)")) +
                        "; rank r trains samples b = r mod " + std::to_string(env_.world) + " of each step)"
                  : std::string()));
      return;
    }
    if (env_.distributed())
      throw Error("WORLD_SIZE=" + std::to_string(env_.world) + ": data-parallel training needs a GPU per rank (" +
                  why + ")");
    info("device: cuda requested, but no usable GPU (" + why + "): training on the CPU");
#else
    info("device: cuda requested, but this build has no CUDA backend (configure with -DRWKVX_CUDA=ON): training "
         "on the CPU");
#endif
  }
  // `parallel_sequences` slots, each a model copy with its share of `threads` for its ops (the remainder
  // goes to the first slots). Neither changes a result: ops split work by shape, never by thread count.
  const int64_t nt = std::min(c_.parallel_sequences, c_.micro_bsz);
  for (int64_t t = 1; t < nt; ++t) workers_.push_back(m);
  for (int64_t t = 0; t < nt; ++t)
    pools_.push_back(std::make_unique<ThreadPool>(int(c_.threads / nt + (t < c_.threads % nt ? 1 : 0))));
  acc_.resize(m.n_params());
  for (size_t i = 0; i < m.n_params(); ++i)
    if (m.param(i).trainable) acc_[i].assign(size_t(m.param(i).numel), 0.0f);
}

void Run::open_data() {
  const int64_t max_id = model_->config().n_vocab - 1;
  if (c_.stage == TrainStage::sft) {
    const Tokenizer tok = Tokenizer::load(c_.vocab.empty() ? default_vocab_path() : c_.vocab);
    std::vector<SftSample> samples = load_sft_jsonl(tok, c_.data);
    for (size_t k = 0; k < samples.size(); ++k)
      for (int32_t id : samples[k].ids)
        if (id > max_id)
          throw Error(c_.data + ": sample " + std::to_string(k) + " has token " + std::to_string(id) +
                      ", beyond the model's vocab of " + std::to_string(max_id + 1));
    const size_t n = samples.size();
    auto src = std::make_unique<SftSource>(std::move(samples), c_.ctx_len, c_.seed);
    prime_ = src->prime();
    data_ = std::move(src);
    info("data: " + c_.data + ": " + std::to_string(n) + " SFT samples (prime " + std::to_string(prime_) + ")");
    ss_.lr_init = c_.lr_init, ss_.lr_final = c_.lr_final, ss_.warmup_steps = c_.warmup_steps;
    ss_.epoch_steps = c_.epoch_steps, ss_.epoch_count = c_.epoch_count, ss_.epoch_begin = c_.epoch_begin;
    ss_.weight_decay = c_.weight_decay;
    return;
  }
  BinIdxDataset d = BinIdxDataset::open(c_.data);
  data_tokens_ = int64_t(d.n_tokens());
  PretrainSampling s;
  s.ctx_len = uint64_t(c_.ctx_len);
  s.epoch_steps = uint64_t(c_.epoch_steps);
  s.micro_bsz = uint64_t(c_.micro_bsz);
  s.magic_prime = c_.magic_prime != 0 ? c_.magic_prime : magic_prime(d.n_tokens(), s.ctx_len);
  if (s.magic_prime == 0)
    throw Error(c_.data + ": " + std::to_string(d.n_tokens()) + " tokens are too few for ctx_len " +
                std::to_string(c_.ctx_len) + " (the magic prime needs at least 3 windows of ctx_len + 1 tokens)");
  s.validate(d.n_tokens(), c_.data);
  prime_ = s.magic_prime;
  info("data: " + c_.data + ": " + std::to_string(d.n_tokens()) + " tokens, ctx_len " + std::to_string(c_.ctx_len) +
       ", magic_prime " + std::to_string(prime_));
  data_ = std::make_unique<PretrainSource>(std::move(d), s, max_id);
  ps_.lr_init = c_.lr_init, ps_.lr_final = c_.lr_final, ps_.warmup_steps = c_.warmup_steps;
  ps_.epoch_steps = c_.epoch_steps, ps_.epoch_count = c_.epoch_count, ps_.epoch_begin = c_.epoch_begin;
  ps_.exit_tokens = c_.tokens < 0 ? data_tokens_ : c_.tokens;
  ps_.ctx_len = c_.ctx_len, ps_.global_batch = c_.micro_bsz;
  ps_.weight_decay = c_.weight_decay, ps_.weight_decay_final = c_.weight_decay_final;
}

ScheduleValue Run::schedule(int64_t g) const {
  return c_.stage == TrainStage::sft ? sft_schedule(ss_, g) : pretrain_schedule(ps_, g);
}

// Steps of the whole run: the first of `steps`, the pretraining token budget (the schedule's exit), the
// last window the magic prime addresses (real_step = p / B − 1), or the SFT epochs.
int64_t Run::plan_steps() const {
  const int64_t offset = c_.epoch_begin * c_.epoch_steps;
  int64_t limit = c_.steps > 0 ? c_.steps : INT64_MAX;
  if (c_.stage == TrainStage::sft) {
    if (c_.epoch_count > 0) limit = std::min(limit, c_.epoch_count * c_.epoch_steps);
    return limit;
  }
  limit = std::min(limit, int64_t(prime_ / uint64_t(c_.micro_bsz)) - offset);
  if (ps_.exit_tokens != 0) {
    // The exit step is where (real_step − w)·ctx·B reaches |exit| − w·ctx·B; search near it.
    const double tps = double(c_.ctx_len) * double(c_.micro_bsz);
    int64_t g = std::max<int64_t>(0, int64_t(double(std::llabs(ps_.exit_tokens)) / tps) - offset - 2);
    while (g > 0 && pretrain_schedule(ps_, g - 1).exit) --g;
    while (g < limit && !pretrain_schedule(ps_, g).exit) ++g;
    limit = std::min(limit, g);
  }
  return std::max<int64_t>(limit, 0);
}

// One optimizer step at global step g: B sequences, gradients summed in batch order. Returns the loss.
double Run::train_step(int64_t g, double& grad_norm) {
#ifdef RWKVX_HAVE_CUDA
  if (gpu_) {
    // One sequence after another; each forward_backward adds its gradient (batch order, as on the CPU).
    // Data parallel: this rank's samples b ≡ rank (mod world); DistAdamW sums the ranks' gradients, the
    // last sequence's backward handing them over block by block (the overlap) when every rank has one.
    const uint64_t first = uint64_t(g + c_.epoch_begin * c_.epoch_steps) * uint64_t(c_.micro_bsz);
    gpu_->zero_grad();
    double loss = 0;
    std::vector<int32_t> x, y;
    const std::vector<int64_t> mine = dist::local_samples(c_.micro_bsz, env_.rank, env_.world);
    for (size_t k = 0; k < mine.size(); ++k) {
      data_->sample(first + uint64_t(mine[k]), x, y);
      if (dist_opt_ && k + 1 == mine.size() && c_.micro_bsz >= env_.world) dist_opt_->overlap_next_backward();
      loss += gpu_->forward_backward(x.data(), y.data(), int64_t(x.size()), loss_).loss;
    }
    const ScheduleValue sv = schedule(g);
    if (dist_opt_) {
      grad_norm = dist_opt_->step(sv.lr, sv.wd);
      return comm_->all_reduce_sum_host(loss);
    }
    grad_norm = gpu_opt_->step(sv.lr, sv.wd);
    return loss;
  }
#endif
  TrainModel& m = *model_;
  const int64_t B = c_.micro_bsz;
  const int64_t nt = int64_t(workers_.size()) + 1;
  const uint64_t base = uint64_t(g + c_.epoch_begin * c_.epoch_steps) * uint64_t(B);
  for (auto& a : acc_) std::fill(a.begin(), a.end(), 0.0f);
  double loss = 0;
  std::vector<double> part(static_cast<size_t>(nt));
  std::vector<std::string> err(static_cast<size_t>(nt));
  for (int64_t r0 = 0; r0 < B; r0 += nt) {
    const int64_t n = std::min(nt, B - r0);
    auto work = [&](int64_t j) {
      TrainModel& w = j == 0 ? m : workers_[size_t(j - 1)];
      OpThreadsScope scope(pools_[size_t(j)].get());
      try {
        std::vector<int32_t> x, y;
        data_->sample(base + uint64_t(r0 + j), x, y);
        w.zero_grad();
        part[size_t(j)] = w.forward_backward(x.data(), y.data(), int64_t(x.size()), loss_).loss;
      } catch (const std::exception& e) {
        err[size_t(j)] = e.what();
      }
    };
    std::vector<std::thread> threads;
    for (int64_t j = 1; j < n; ++j) threads.emplace_back(work, j);
    work(0);
    for (std::thread& t : threads) t.join();
    for (int64_t j = 0; j < n; ++j)
      if (!err[size_t(j)].empty()) throw Error(err[size_t(j)]);
    for (int64_t j = 0; j < n; ++j) {
      const TrainModel& w = j == 0 ? m : workers_[size_t(j - 1)];
      for (size_t i = 0; i < m.n_params(); ++i) {
        if (acc_[i].empty()) continue;
        const std::vector<float>& gi = w.grad(i);
        for (size_t e = 0; e < gi.size(); ++e) acc_[i][e] += gi[e];
      }
      loss += part[size_t(j)];
    }
  }
  for (size_t i = 0; i < m.n_params(); ++i)
    if (!acc_[i].empty()) m.grad(i) = acc_[i];
  const ScheduleValue sv = schedule(g);
  grad_norm = opt_->step(sv.lr, sv.wd);
  for (TrainModel& w : workers_)
    for (size_t i = 0; i < m.n_params(); ++i)
      if (m.param(i).trainable) w.value(i) = m.value(i);
  return loss;
}

void Run::sync_from_gpu(bool moments) {
#ifdef RWKVX_HAVE_CUDA
  if (!gpu_) return;
  gpu_->download_values(*model_);  // data parallel: the same values on every rank
  if (!moments) return;
  if (dist_opt_) {
    // Collective: each tensor's moments come from their owner (every rank takes part; rank 0 writes them).
    opt_->set_steps(dist_opt_->steps());
    for (size_t i = 0; i < model_->n_params(); ++i)
      if (model_->param(i).trainable) opt_->exp_avg(i) = dist_opt_->exp_avg(i), opt_->exp_avg_sq(i) = dist_opt_->exp_avg_sq(i);
    return;
  }
  opt_->set_steps(gpu_opt_->steps());
  for (size_t i = 0; i < model_->n_params(); ++i)
    if (model_->param(i).trainable) opt_->exp_avg(i) = gpu_opt_->exp_avg(i), opt_->exp_avg_sq(i) = gpu_opt_->exp_avg_sq(i);
#else
  (void)moments;
#endif
}

void Run::save_checkpoint(const std::string& stem) {
  sync_from_gpu(false);
  if (!writer()) return;
  const std::vector<TensorData> t = model_->to_tensor_data(c_.save_dtype);
  if (c_.save_pth) {
    PthWriteOptions po;
    po.archive_name = stem;  // torch.save names the archive after the file
    save_pth(c_.out_dir + "/" + stem + ".pth", t, po);
  }
  if (c_.save_safetensors) save_safetensors(c_.out_dir + "/" + stem + ".safetensors", t, sparse_metadata(model_->config()));
}

std::string Run::save_state(int64_t step) {
  sync_from_gpu(true);
  const TrainModel& m = *model_;
  const fs::path final_dir = fs::path(c_.out_dir) / state_dir_name(step);
  if (!writer()) return final_dir.string();
  const fs::path tmp = fs::path(c_.out_dir) / (state_dir_name(step) + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) throw Error(tmp.string() + ": cannot create: " + ec.message());
  save_safetensors((tmp / "weights.safetensors").string(), m.to_tensor_data(DType::f32), sparse_metadata(m.config()));
  std::vector<TensorData> moments;
  for (size_t i = 0; i < m.n_params(); ++i) {
    if (!m.param(i).trainable) continue;
    const int64_t n = m.param(i).numel;
    moments.push_back(make_tensor_data("exp_avg." + m.param(i).name, DType::f32, {n}, opt_->exp_avg(i)));
    moments.push_back(make_tensor_data("exp_avg_sq." + m.param(i).name, DType::f32, {n}, opt_->exp_avg_sq(i)));
  }
  save_safetensors((tmp / "optimizer.safetensors").string(), moments);
  json st;
  st["format"] = kStateFormat;
  st["version"] = kStateVersion;
  st["step"] = step;
  st["optimizer_steps"] = opt_->steps();
  st["tokens"] = tokens_seen_;
  // The data position: the next sample is (step + epoch_begin·epoch_steps)·micro_bsz; no other random state.
  st["next_sample"] = uint64_t(step + c_.epoch_begin * c_.epoch_steps) * uint64_t(c_.micro_bsz);
  st["model"] = c_.model;
  json cfg = json::object();
  for (const auto& [k, v] : trajectory_keys(c_)) cfg[k] = v;
  st["config"] = cfg;
  write_text_atomic((tmp / "state.json").string(), st.dump(2) + "\n");
  fs::remove_all(final_dir, ec);
  fs::rename(tmp, final_dir, ec);
  if (ec) throw Error(final_dir.string() + ": cannot rename the state into place: " + ec.message());
  // Older states beyond keep_states go (the newest up to this step are kept; states of later steps, left
  // by a run resumed from an earlier state, are not touched).
  if (c_.keep_states > 0) {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(c_.out_dir, ec)) {
      const std::string name = e.path().filename().string();
      if (e.is_directory() && name.starts_with("state-") && !name.ends_with(".tmp") &&
          name <= state_dir_name(step))
        names.push_back(name);
    }
    std::sort(names.begin(), names.end());
    for (size_t k = 0; k + size_t(c_.keep_states) < names.size(); ++k)
      fs::remove_all(fs::path(c_.out_dir) / names[k], ec);
  }
  return final_dir.string();
}

void Run::write_loss_files() {
  if (!writer()) return;
  std::vector<LossPoint> pts;
  for (const LossRow& r : rows_) pts.push_back({r.step, r.loss});
  write_loss_png(png_path_, pts);
}

TrainResult Run::go() {
  env_ = dist::dist_env();
  if (env_.distributed()) {
#ifdef RWKVX_HAVE_CUDA
    if (c_.device != "cuda")
      throw Error("WORLD_SIZE=" + std::to_string(env_.world) + ": data-parallel training runs on GPUs only (" +
                  c_.source + ": set 'device' to cuda, or run one process)");
#else
    throw Error("WORLD_SIZE=" + std::to_string(env_.world) +
                ": data-parallel training needs the CUDA build (configure with -DRWKVX_CUDA=ON)");
#endif
  }
  std::error_code ec;
  fs::create_directories(c_.out_dir, ec);
  if (ec || !fs::is_directory(c_.out_dir))
    throw Error(c_.source + ": key 'out_dir': cannot create " + c_.out_dir + (ec ? ": " + ec.message() : ""));
  if (o_.resume.empty()) {
    // A fresh run would mix its states and loss.csv with an earlier run's.
    for (const auto& e : fs::directory_iterator(c_.out_dir, ec)) {
      const std::string name = e.path().filename().string();
      if (e.is_directory() && name.starts_with("state-") && !name.ends_with(".tmp"))
        throw Error(c_.source + ": key 'out_dir': " + c_.out_dir + " already holds a training run (" + name +
                    "); continue it with --resume " + c_.out_dir + " or choose another out_dir");
    }
  }
  load_model_and_state();
  open_data();
  TrainModel& m = *model_;

  loss_.kind = c_.loss;
  loss_.reduction = c_.stage == TrainStage::sft ? LossReduction::mean_valid : LossReduction::mean_all;
  loss_.l2wrap = c_.l2wrap;
  loss_.batch_size = c_.micro_bsz;
  loss_.pad_multiple = c_.pad_multiple;
  loss_.longce.truncated = c_.longce_truncated, loss_.longce.window = c_.longce_window;
  loss_.longce.cap = c_.longce_cap;

  int64_t n_trainable = 0, n_total = 0;
  for (size_t i = 0; i < m.n_params(); ++i) {
    n_total += m.param(i).numel;
    if (m.param(i).trainable) n_trainable += m.param(i).numel;
  }
  const int64_t total = plan_steps();
  info(std::string("model: ") + c_.model + ": " + (m.config().arch == ArchKind::rwkvx ? "RWKV-X" : "RWKV-7") + ", " +
       std::to_string(n_total) + " parameters, " + std::to_string(n_trainable) + " trainable (" +
       stage_name(c_.stage) + ")");
  info("plan: " + std::to_string(total) + " steps of " + std::to_string(c_.micro_bsz) + " x " +
       std::to_string(c_.ctx_len) + " tokens, loss " + (c_.loss == LossKind::ce ? "ce" : "longce") +
       (c_.recompute ? ", recompute" : "") + ", " +
       (pools_.empty() ? std::string("on the GPU")
                       : std::to_string(c_.threads) + " thread(s): " + std::to_string(pools_.size()) +
                             " sequence(s) at once, " + std::to_string(pools_[0]->size()) +
                             " thread(s) per sequence's ops (GEMM: " + fast::gemm_name() + ")"));

  csv_path_ = c_.out_dir + "/loss.csv";
  png_path_ = c_.out_dir + "/loss.png";
  if (start_step_ > 0) rows_ = read_loss_csv(csv_path_, start_step_);
  if (writer()) {
    std::string text = csv_header();
    for (const LossRow& r : rows_) text += csv_row(r);
    write_text_atomic(csv_path_, text);
    csv_ = std::make_unique<std::ofstream>(csv_path_, std::ios::app);
    if (!*csv_) throw Error(csv_path_ + ": cannot open for appending");
  }

  TrainResult res;
  const auto t0 = std::chrono::steady_clock::now();
  int64_t g = start_step_;
  int64_t run_tokens = 0;
  while (g < total) {
    bool stop = o_.stop && o_.stop->load();
#ifdef RWKVX_HAVE_CUDA
    if (comm_) stop = comm_->all_reduce_sum_host(stop ? 1.0 : 0.0) > 0;  // every rank stops at the same step
#endif
    if (stop) {
      res.stopped = true;
      break;
    }
    double grad_norm = 0;
    const double lr = schedule(g).lr;
    const double loss = train_step(g, grad_norm);
    ++g;
    tokens_seen_ += c_.micro_bsz * c_.ctx_len;
    run_tokens += c_.micro_bsz * c_.ctx_len;
    const LossRow row{g, tokens_seen_, loss, lr, grad_norm};
    rows_.push_back(row);
    if (csv_) {
      *csv_ << csv_row(row);
      csv_->flush();
      if (!*csv_) throw Error(csv_path_ + ": write failed");
    }
    if (o_.progress && writer()) {
      TrainProgress p;
      p.step = g, p.total_steps = total, p.run_steps = g - start_step_;
      p.loss = loss, p.lr = lr, p.grad_norm = grad_norm;
      p.elapsed_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      p.tokens_per_s = p.elapsed_s > 0 ? double(run_tokens) / p.elapsed_s : 0;
      p.eta_s = p.elapsed_s / double(p.run_steps) * double(total - g);
      o_.progress(p);
    }
    if (c_.save_every > 0 && g % c_.save_every == 0 && g < total) {
      save_checkpoint("rwkv-" + std::to_string(g));
      res.last_state = save_state(g);
      write_loss_files();
      info("saved rwkv-" + std::to_string(g) + " and " + res.last_state);
    }
  }
  const std::string stem = res.stopped ? "rwkv-" + std::to_string(g) : "rwkv-final";
  save_checkpoint(stem);
  res.last_state = save_state(g);
  write_loss_files();
  info("saved " + stem + " and " + res.last_state);
  res.steps = g;
  return res;
}

}  // namespace

TrainResult run_training(const TrainConfig& config, const TrainRunOptions& options) {
  Run run(config, options);
  return run.go();
}

}  // namespace rwkvx::train
