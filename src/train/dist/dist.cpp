// Data-parallel training without a GPU: environment, rendezvous, batch split, ZeRO-1 owners (dist.h).
#include "train/dist/dist.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "core/atomic_file.h"
#include "core/error.h"

namespace rwkvx::train::dist {
namespace {

namespace fs = std::filesystem;

// When this process started (static initialisation): rendezvous files written long before are stale.
const fs::file_time_type g_process_start = fs::file_time_type::clock::now();

constexpr char kMagic[8] = {'R', 'W', 'K', 'V', 'X', 'R', 'D', 'V'};

const char* kHow =
    "data-parallel training needs RANK, WORLD_SIZE, LOCAL_RANK and RWKVX_DIST_INIT=file:///path (shared by all "
    "ranks); scripts/launch_dp.sh N CMD... sets them";

int parse_int(const char* name, const char* v, int lo, int hi) {
  char* end = nullptr;
  errno = 0;
  const long x = std::strtol(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || x < lo || x > hi)
    throw Error(std::string(name) + "='" + v + "' is not an integer in [" + std::to_string(lo) + ", " +
                std::to_string(hi) + "]");
  return int(x);
}

}  // namespace

DistEnv dist_env_from(const std::function<const char*(const char*)>& get) {
  DistEnv e;
  const char* ws = get("WORLD_SIZE");
  if (!ws || !*ws) return e;
  e.world = parse_int("WORLD_SIZE", ws, 1, 4096);
  if (e.world == 1) {
    const char* f = get("RWKVX_DIST_FORCE");
    if (!f || !*f || parse_int("RWKVX_DIST_FORCE", f, 0, 1) == 0) return e;
    e.force = true;
  }
  const char* r = get("RANK");
  if ((!r || !*r) && !e.force)
    throw Error("WORLD_SIZE=" + std::to_string(e.world) + " but RANK is not set: " + kHow);
  e.rank = r && *r ? parse_int("RANK", r, 0, e.world - 1) : 0;
  const char* lr = get("LOCAL_RANK");
  e.local_rank = lr && *lr ? parse_int("LOCAL_RANK", lr, 0, 1023) : e.rank;
  const char* init = get("RWKVX_DIST_INIT");
  if (!init || !*init)
    throw Error("WORLD_SIZE=" + std::to_string(e.world) + (e.force ? " with RWKVX_DIST_FORCE=1" : "") +
                " but RWKVX_DIST_INIT is not set: " + kHow);
  const std::string s = init;
  if (!s.starts_with("file://") || s.size() <= 7)
    throw Error("RWKVX_DIST_INIT='" + s + "': only the file rendezvous is supported (file:///path/to/file)");
  e.init = s.substr(7);
  if (const char* t = get("RWKVX_DIST_TIMEOUT"); t && *t) e.timeout_s = parse_int("RWKVX_DIST_TIMEOUT", t, 1, 86400);
  return e;
}

DistEnv dist_env() {
  return dist_env_from([](const char* n) -> const char* { return std::getenv(n); });
}

std::vector<int64_t> local_samples(int64_t B, int rank, int world) {
  RWKVX_ASSERT(world >= 1 && rank >= 0 && rank < world, "local_samples: bad rank/world");
  std::vector<int64_t> v;
  for (int64_t b = rank; b < B; b += world) v.push_back(b);
  return v;
}

std::vector<int> assign_owners(const std::vector<int64_t>& sizes, int world) {
  RWKVX_ASSERT(world >= 1, "assign_owners: world < 1");
  std::vector<int> owner(sizes.size(), -1);
  std::vector<size_t> order;
  for (size_t i = 0; i < sizes.size(); ++i)
    if (sizes[i] > 0) order.push_back(i);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return sizes[a] > sizes[b]; });
  std::vector<int64_t> load(size_t(world), 0);
  for (size_t i : order) {
    const int r = int(std::min_element(load.begin(), load.end()) - load.begin());  // first minimum
    owner[i] = r;
    load[size_t(r)] += sizes[i];
  }
  return owner;
}

OverlapOptions overlap_options_from(const std::function<const char*(const char*)>& get) {
  OverlapOptions o;
  if (const char* v = get("RWKVX_DIST_OVERLAP"); v && *v) o.on = parse_int("RWKVX_DIST_OVERLAP", v, 0, 1) == 1;
  if (const char* v = get("RWKVX_DIST_BUCKET_MB"); v && *v)
    o.bucket_bytes = int64_t(parse_int("RWKVX_DIST_BUCKET_MB", v, 0, 1 << 20)) << 20;
  return o;
}

OverlapOptions overlap_options() {
  return overlap_options_from([](const char* n) -> const char* { return std::getenv(n); });
}

bool Buckets::add(size_t i, int64_t bytes) {
  open_.push_back(i);
  bytes_ += bytes;
  return bytes_ >= cap_;
}

std::vector<size_t> Buckets::take() {
  std::vector<size_t> b = std::move(open_);
  open_.clear();
  bytes_ = 0;
  return b;
}

void publish_rendezvous(const std::string& path, const void* data, size_t n) {
  std::error_code ec;
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent, ec);
  AtomicFile f(path);
  f.write(kMagic, sizeof kMagic);
  const uint64_t len = n;
  f.write(&len, sizeof len);
  f.write(data, n);
  f.commit();
}

std::vector<uint8_t> await_rendezvous(const std::string& path, size_t n, double timeout_s, int rank, int world) {
  const auto t0 = std::chrono::steady_clock::now();
  const auto not_before = g_process_start - std::chrono::seconds(60);
  bool saw_stale = false;
  for (;;) {
    std::error_code ec;
    const auto mtime = fs::last_write_time(path, ec);
    if (!ec) {
      if (mtime < not_before) {
        saw_stale = true;
      } else {
        std::ifstream in(path, std::ios::binary);
        std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        uint64_t len = 0;
        if (bytes.size() >= sizeof kMagic + sizeof len) std::memcpy(&len, bytes.data() + sizeof kMagic, sizeof len);
        if (bytes.size() < sizeof kMagic + sizeof len || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0 ||
            len != n || bytes.size() != sizeof kMagic + sizeof len + n)
          throw Error("RWKVX_DIST_INIT file " + path + " is not an rwkvx rendezvous file of " + std::to_string(n) +
                      " bytes (another job's file? choose a fresh path per job)");
        const char* p = bytes.data() + sizeof kMagic + sizeof len;
        return std::vector<uint8_t>(p, p + n);
      }
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (waited >= timeout_s)
      throw Error("rank " + std::to_string(rank) + " of " + std::to_string(world) + ": no rendezvous from rank 0 in " +
                  path + " after " + std::to_string(int(timeout_s)) + " s" +
                  (saw_stale ? " (the file there is older than this job: a stale one from an earlier run)" : "") +
                  "; is rank 0 running with the same RWKVX_DIST_INIT on a file system all ranks see? "
                  "(RWKVX_DIST_TIMEOUT sets the wait in seconds)");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

void remove_rendezvous(const std::string& path) {
  std::error_code ec;
  fs::remove(path, ec);
}

}  // namespace rwkvx::train::dist
