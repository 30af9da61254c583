#include "common/malloc_tuning.h"

#include <gtest/gtest.h>

namespace custody {
namespace {

TEST(MallocTuningTest, UnsetOrEmptyGetsTheTcacheSize) {
  EXPECT_EQ(TunedMallocEnv(nullptr), "glibc.malloc.tcache_count=128");
  EXPECT_EQ(TunedMallocEnv(""), "glibc.malloc.tcache_count=128");
}

TEST(MallocTuningTest, OtherTunablesAreKept) {
  EXPECT_EQ(TunedMallocEnv("glibc.malloc.arena_max=2"),
            "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=128");
}

TEST(MallocTuningTest, AnOperatorsTcacheSizeIsLeftAsIs) {
  // Also what stops a second re-execution: the first one set it.
  EXPECT_EQ(TunedMallocEnv("glibc.malloc.tcache_count=7"), std::nullopt);
  EXPECT_EQ(TunedMallocEnv("glibc.malloc.arena_max=2:glibc.malloc.tcache_count=128"), std::nullopt);
}

}  // namespace
}  // namespace custody
