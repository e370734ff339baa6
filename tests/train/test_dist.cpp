// Data-parallel training without a GPU (train/dist/dist.h): the environment, the batch split, the ZeRO-1
// owners, the overlap's options and buckets, and the file rendezvous.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <thread>

#include <unistd.h>

#include "core/error.h"
#include "train/dist/dist.h"

using namespace rwkvx;
using namespace rwkvx::train::dist;
namespace fs = std::filesystem;

namespace {

DistEnv env_of(std::map<std::string, std::string> vars) {
  return dist_env_from([&](const char* n) -> const char* {
    auto it = vars.find(n);
    return it == vars.end() ? nullptr : it->second.c_str();
  });
}

std::string error_of(std::map<std::string, std::string> vars) {
  try {
    env_of(std::move(vars));
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

fs::path temp_dir(const std::string& name) {
  const fs::path d = fs::temp_directory_path() / ("rwkvx_test_dist_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

}  // namespace

TEST(Dist, EnvSingleProcessByDefault) {
  EXPECT_FALSE(env_of({}).distributed());
  EXPECT_FALSE(env_of({{"WORLD_SIZE", "1"}}).distributed());
}

TEST(Dist, EnvReadsTheLauncherVariables) {
  const DistEnv e = env_of({{"WORLD_SIZE", "4"}, {"RANK", "2"}, {"LOCAL_RANK", "3"},
                            {"RWKVX_DIST_INIT", "file:///tmp/x/rdv"}, {"RWKVX_DIST_TIMEOUT", "9"}});
  EXPECT_TRUE(e.distributed());
  EXPECT_EQ(e.world, 4);
  EXPECT_EQ(e.rank, 2);
  EXPECT_EQ(e.local_rank, 3);
  EXPECT_EQ(e.init, "/tmp/x/rdv");
  EXPECT_EQ(e.timeout_s, 9);
  // LOCAL_RANK defaults to RANK.
  EXPECT_EQ(env_of({{"WORLD_SIZE", "2"}, {"RANK", "1"}, {"RWKVX_DIST_INIT", "file:///r"}}).local_rank, 1);
}

TEST(Dist, EnvErrorsNameTheVariable) {
  EXPECT_NE(error_of({{"WORLD_SIZE", "2"}, {"RWKVX_DIST_INIT", "file:///r"}}).find("RANK is not set"),
            std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "2"}, {"RANK", "0"}}).find("RWKVX_DIST_INIT is not set"), std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "2"}, {"RANK", "0"}}).find("launch_dp.sh"), std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "2"}, {"RANK", "2"}, {"RWKVX_DIST_INIT", "file:///r"}}).find("RANK='2'"),
            std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "two"}}).find("WORLD_SIZE='two'"), std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "2"}, {"RANK", "0"}, {"RWKVX_DIST_INIT", "tcp://host:29500"}})
                .find("only the file rendezvous"),
            std::string::npos);
}

TEST(Dist, EnvForceRunsOneRankDistributed) {
  EXPECT_FALSE(env_of({{"WORLD_SIZE", "1"}, {"RWKVX_DIST_FORCE", "0"}}).distributed());
  const DistEnv e = env_of({{"WORLD_SIZE", "1"}, {"RWKVX_DIST_FORCE", "1"}, {"RWKVX_DIST_INIT", "file:///tmp/r"}});
  EXPECT_TRUE(e.distributed());
  EXPECT_EQ(e.world, 1);
  EXPECT_EQ(e.rank, 0);  // RANK defaults to 0
  EXPECT_EQ(e.init, "/tmp/r");
  EXPECT_NE(error_of({{"WORLD_SIZE", "1"}, {"RWKVX_DIST_FORCE", "1"}}).find("RWKVX_DIST_INIT is not set"),
            std::string::npos);
  EXPECT_NE(error_of({{"WORLD_SIZE", "1"}, {"RWKVX_DIST_FORCE", "yes"}}).find("RWKVX_DIST_FORCE='yes'"),
            std::string::npos);
  // WORLD_SIZE unset: one process, whatever RWKVX_DIST_FORCE says.
  EXPECT_FALSE(env_of({{"RWKVX_DIST_FORCE", "1"}}).distributed());
}

TEST(Dist, OverlapOptionsFromTheEnvironment) {
  auto opts = [](std::map<std::string, std::string> vars) {
    return overlap_options_from([&](const char* n) -> const char* {
      auto it = vars.find(n);
      return it == vars.end() ? nullptr : it->second.c_str();
    });
  };
  EXPECT_TRUE(opts({}).on);
  EXPECT_EQ(opts({}).bucket_bytes, int64_t(25) << 20);
  EXPECT_FALSE(opts({{"RWKVX_DIST_OVERLAP", "0"}}).on);
  EXPECT_TRUE(opts({{"RWKVX_DIST_OVERLAP", "1"}}).on);
  EXPECT_EQ(opts({{"RWKVX_DIST_BUCKET_MB", "4"}}).bucket_bytes, int64_t(4) << 20);
  EXPECT_EQ(opts({{"RWKVX_DIST_BUCKET_MB", "0"}}).bucket_bytes, 0);
  EXPECT_THROW(opts({{"RWKVX_DIST_OVERLAP", "on"}}), Error);
  EXPECT_THROW(opts({{"RWKVX_DIST_BUCKET_MB", "-1"}}), Error);
}

TEST(Dist, BucketsCloseAtTheCapInHandOverOrder) {
  Buckets b(100);
  EXPECT_TRUE(b.empty());
  EXPECT_FALSE(b.add(7, 40));
  EXPECT_FALSE(b.add(3, 59));
  EXPECT_TRUE(b.add(5, 1));  // 100 bytes: full
  EXPECT_EQ(b.take(), (std::vector<size_t>{7, 3, 5}));
  EXPECT_TRUE(b.empty());
  EXPECT_TRUE(b.add(9, 500));  // larger than the cap: a bucket of its own
  EXPECT_EQ(b.take(), (std::vector<size_t>{9}));
  EXPECT_FALSE(b.add(1, 10));
  EXPECT_EQ(b.take(), (std::vector<size_t>{1}));  // the open rest
  EXPECT_TRUE(b.take().empty());
  Buckets each(0);  // cap 0: every tensor its own bucket
  EXPECT_TRUE(each.add(4, 8));
  EXPECT_EQ(each.take(), (std::vector<size_t>{4}));
}

TEST(Dist, LocalSamplesCoverTheGlobalBatchOnce) {
  EXPECT_EQ(local_samples(8, 0, 1), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(local_samples(8, 1, 2), (std::vector<int64_t>{1, 3, 5, 7}));
  EXPECT_EQ(local_samples(5, 2, 3), (std::vector<int64_t>{2}));
  EXPECT_TRUE(local_samples(2, 3, 4).empty());
  for (int world : {1, 2, 3, 4, 8})
    for (int64_t B : {1, 5, 8, 16}) {
      std::vector<int> seen(size_t(B), 0);
      for (int r = 0; r < world; ++r)
        for (int64_t b : local_samples(B, r, world)) ++seen[size_t(b)];
      for (int s : seen) EXPECT_EQ(s, 1);
    }
}

TEST(Dist, OwnersAreGreedyBalancedAndDeterministic) {
  // Sizes 0 are frozen tensors: no owner.
  const std::vector<int64_t> sizes = {100, 0, 40, 60, 40, 10, 0, 50};
  const std::vector<int> o = assign_owners(sizes, 2);
  // By size: 100 (i0) → r0; 60 (i3) → r1; 50 (i7) → r1 (60 < 100); 40 (i2) → r0 (100 < 110);
  // 40 (i4) → r1 (110 < 140); 10 (i5) → r0 (140 < 150).
  EXPECT_EQ(o, (std::vector<int>{0, -1, 0, 1, 1, 0, -1, 1}));
  EXPECT_EQ(assign_owners(sizes, 2), o);
  const std::vector<int> one = assign_owners(sizes, 1);
  for (size_t i = 0; i < sizes.size(); ++i) EXPECT_EQ(one[i], sizes[i] > 0 ? 0 : -1);
  // More ranks than tensors: every tensor on its own rank, the rest own nothing.
  EXPECT_EQ(assign_owners({5, 7}, 4), (std::vector<int>{1, 0}));
}

TEST(Dist, RendezvousRoundTrip) {
  const fs::path d = temp_dir("rdv");
  const std::string path = (d / "sub" / "rendezvous").string();
  const uint8_t id[5] = {1, 2, 3, 250, 0};
  std::thread pub([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    publish_rendezvous(path, id, sizeof id);
  });
  const std::vector<uint8_t> got = await_rendezvous(path, sizeof id, 10, 1, 2);
  pub.join();
  EXPECT_EQ(got, std::vector<uint8_t>(id, id + 5));
  remove_rendezvous(path);
  EXPECT_FALSE(fs::exists(path));
  fs::remove_all(d);
}

TEST(Dist, RendezvousTimeoutSaysWhatToCheck) {
  const fs::path d = temp_dir("timeout");
  const std::string path = (d / "never").string();
  try {
    await_rendezvous(path, 128, 1, 3, 4);
    FAIL() << "no timeout";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("rank 3 of 4"), std::string::npos) << m;
    EXPECT_NE(m.find(path), std::string::npos) << m;
    EXPECT_NE(m.find("RWKVX_DIST_TIMEOUT"), std::string::npos) << m;
  }
  fs::remove_all(d);
}

TEST(Dist, RendezvousIgnoresStaleFilesAndRejectsForeignOnes) {
  const fs::path d = temp_dir("stale");
  const std::string path = (d / "rendezvous").string();
  const uint8_t id[4] = {9, 9, 9, 9};
  publish_rendezvous(path, id, sizeof id);
  fs::last_write_time(path, fs::file_time_type::clock::now() - std::chrono::hours(1));
  try {
    await_rendezvous(path, sizeof id, 1, 1, 2);
    FAIL() << "a stale file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("stale"), std::string::npos) << e.what();
  }
  publish_rendezvous(path, id, 3);  // fresh, but of another size
  EXPECT_THROW(await_rendezvous(path, sizeof id, 1, 1, 2), Error);
  fs::remove_all(d);
}
