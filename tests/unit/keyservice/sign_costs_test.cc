#include "keyservice/sign_costs.h"

#include <gtest/gtest.h>

#include <string>
#include <thread>
#include <vector>

#include "keyservice/key_service.h"

namespace custody::keyservice {
namespace {

TEST(SignCostsTest, NothingKnownCostsNothing) {
  SignCosts costs;
  EXPECT_EQ(costs.Of("lab-ec256").time_us, 0);
  EXPECT_EQ(costs.Of("lab-ec256").wait_us, 0);
}

TEST(SignCostsTest, EachKeyKeepsItsOwnAverage) {
  SignCosts costs;
  for (int i = 0; i < 50; ++i) {
    costs.Record("ec", {100, 0});
    costs.Record("rsa", {2000, 1500});
  }
  // One average over both would be about 1050 us: ECDSA batches would leave the reading thread,
  // RSA ones stay on it.
  EXPECT_EQ(costs.Of("ec").time_us, 100);
  EXPECT_EQ(costs.Of("ec").wait_us, 0);
  EXPECT_EQ(costs.Of("rsa").time_us, 2000);
  EXPECT_EQ(costs.Of("rsa").wait_us, 1500);
  EXPECT_TRUE(KeyServiceImpl::QuickToSign(costs.Of("ec")));
  SignCosts::Cost two_ec = costs.Of("ec");
  two_ec += costs.Of("ec");
  EXPECT_TRUE(KeyServiceImpl::QuickToSign(two_ec));
  EXPECT_FALSE(KeyServiceImpl::QuickToSign(costs.Of("rsa")));
  // A key not signed with yet is taken at the average over all keys.
  const SignCosts::Cost unknown = costs.Of("new-key");
  EXPECT_GT(unknown.time_us, 100);
  EXPECT_LT(unknown.time_us, 2000);
}

TEST(SignCostsTest, AKeysFirstSignatureIsItsAverageThenItFollowsRecentOnes) {
  SignCosts costs;
  for (int i = 0; i < 50; ++i) {
    costs.Record("ec", {100, 0});
  }
  costs.Record("rsa", {3000, 0});
  EXPECT_EQ(costs.Of("rsa").time_us, 3000) << "a new RSA key is not taken for a quick one";
  for (int i = 0; i < 100; ++i) {
    costs.Record("ec", {400, 0});  // The token got slower.
  }
  EXPECT_GT(costs.Of("ec").time_us, 390);
  EXPECT_LE(costs.Of("ec").time_us, 400);
}

TEST(SignCostsTest, ABackwardClockStepCountsAsZeroNotAsANegativeCost) {
  SignCosts costs;
  costs.Record("rsa", {-1000000, -1000000});
  EXPECT_EQ(costs.Of("rsa").time_us, 0);
  EXPECT_EQ(costs.Of("rsa").wait_us, 0);
}

TEST(SignCostsTest, SumAddsEachItemsKey) {
  SignCosts costs;
  costs.Record("ec", {100, 10});
  costs.Record("rsa", {2000, 1500});
  const std::vector<std::string> batch = {"ec", "rsa", "ec", "unknown"};
  const SignCosts::Cost total =
      costs.Sum(batch, [](const std::string& k) -> const std::string& { return k; });
  const SignCosts::Cost all = costs.Of("unknown");
  EXPECT_EQ(total.time_us, 100 + 2000 + 100 + all.time_us);
  EXPECT_EQ(total.wait_us, 10 + 1500 + 10 + all.wait_us);
}

TEST(SignCostsTest, KeysBeyondTheLimitCountInTheOverallAverageOnly) {
  SignCosts costs;
  for (std::size_t i = 0; i < SignCosts::kMaxKeys; ++i) {
    costs.Record("key-" + std::to_string(i), {100, 0});
  }
  costs.Record("one-too-many", {5000, 0});
  EXPECT_EQ(costs.Of("key-0").time_us, 100);
  EXPECT_EQ(costs.Of("one-too-many").time_us, costs.Of("never-seen").time_us);
}

TEST(SignCostsTest, RecordAndReadFromManyThreads) {
  SignCosts costs;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&costs, t] {
      const std::string key = "key-" + std::to_string(t % 2);
      for (int i = 0; i < 2000; ++i) {
        costs.Record(key, {100 * (t % 2 + 1), 0});
        (void)costs.Of(key);
      }
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_EQ(costs.Of("key-0").time_us, 100);
  EXPECT_EQ(costs.Of("key-1").time_us, 200);
}

}  // namespace
}  // namespace custody::keyservice
