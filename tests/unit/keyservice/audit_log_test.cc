#include "keyservice/audit_log.h"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "common/files.h"

namespace custody::keyservice {
namespace {

std::string NewPath() {
  static int n = 0;
  std::string path = ::testing::TempDir() + "/audit-" + std::to_string(::getpid()) + "-" +
                     std::to_string(n++) + ".log";
  std::remove(path.c_str());
  return path;
}

AuditRecord Record(const std::string& key) {
  AuditRecord r;
  r.caller = "proxy";
  r.peer = "ipv4:127.0.0.1:1";
  r.action = "sign";
  r.key = key;
  r.version = 1;
  r.scheme = "ecdsa_secp256r1_sha256";
  r.outcome = "OK";
  r.latency_us = 42;
  return r;
}

void Overwrite(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::trunc | std::ios::binary) << content;
}

TEST(AuditLogTest, RecordsChainAndVerify) {
  const std::string path = NewPath();
  auto log = AuditLog::Open(path);
  ASSERT_TRUE(log.ok()) << log.status();
  std::set<std::string> ids;
  for (int i = 0; i < 10; ++i) {
    auto id = (*log)->Append(Record("k" + std::to_string(i)));
    ASSERT_TRUE(id.ok());
    ids.insert(*id);
  }
  EXPECT_EQ(ids.size(), 10u);
  auto summary = VerifyAuditLog(path);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->records, 10u);
}

TEST(AuditLogTest, ReopeningContinuesTheChain) {
  const std::string path = NewPath();
  {
    auto log = AuditLog::Open(path);
    ASSERT_TRUE(log.ok());
    ASSERT_TRUE((*log)->Append(Record("a")).ok());
  }
  {
    auto log = AuditLog::Open(path);
    ASSERT_TRUE(log.ok()) << log.status();
    ASSERT_TRUE((*log)->Append(Record("b")).ok());
  }
  auto summary = VerifyAuditLog(path);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->records, 2u);
}

TEST(AuditLogTest, EditingRemovingOrTruncatingIsDetected) {
  const std::string path = NewPath();
  {
    auto log = AuditLog::Open(path);
    ASSERT_TRUE(log.ok());
    for (const char* k : {"one", "two", "three", "four"}) {
      ASSERT_TRUE((*log)->Append(Record(k)).ok());
    }
  }
  const std::string original = *ReadFile(path);

  std::string edited = original;
  edited.replace(edited.find("\"two\""), 5, "\"TWO\"");
  Overwrite(path, edited);
  EXPECT_EQ(VerifyAuditLog(path).status().code(), absl::StatusCode::kDataLoss);

  std::string removed = original;
  const auto start = removed.find("{\"seq\":2");
  removed.erase(start, removed.find('\n', start) + 1 - start);
  Overwrite(path, removed);
  EXPECT_EQ(VerifyAuditLog(path).status().code(), absl::StatusCode::kDataLoss);

  Overwrite(path, original.substr(0, original.size() - 5));
  EXPECT_EQ(VerifyAuditLog(path).status().code(), absl::StatusCode::kDataLoss);
  // A log that does not verify is not appended to.
  EXPECT_EQ(AuditLog::Open(path).status().code(), absl::StatusCode::kFailedPrecondition);

  Overwrite(path, original);
  EXPECT_TRUE(VerifyAuditLog(path).ok());
}

// A write cut short (here by RLIMIT_FSIZE, as by a full disk) is cut back off the file, so the
// chain stays whole and later records append cleanly once there is room again.
TEST(AuditLogTest, AFailedWriteLeavesTheChainWhole) {
  const std::string path = NewPath();
  auto log = AuditLog::Open(path);
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE((*log)->Append(Record("before")).ok());
  const off_t size = static_cast<off_t>(ReadFile(path)->size());
  struct rlimit old_limit {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old_limit), 0);
  ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old_limit;
  small.rlim_cur = static_cast<rlim_t>(size + 40);  // Room for part of a record only.
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  auto failed = (*log)->Append(Record("cut-short"));
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old_limit), 0);
  EXPECT_EQ(failed.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(static_cast<off_t>(ReadFile(path)->size()), size);
  ASSERT_TRUE((*log)->Append(Record("after")).ok());
  auto summary = VerifyAuditLog(path);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->records, 2u);
}

TEST(AuditLogTest, FieldsAreEscapedJson) {
  const std::string path = NewPath();
  auto log = AuditLog::Open(path);
  ASSERT_TRUE(log.ok());
  AuditRecord r = Record("we\"ird\nkey\\");
  r.detail = "tab\there";
  ASSERT_TRUE((*log)->Append(r).ok());
  const std::string content = *ReadFile(path);
  EXPECT_NE(content.find(R"("key":"we\"ird\nkey\\")"), std::string::npos) << content;
  EXPECT_NE(content.find(R"("detail":"tab\there")"), std::string::npos) << content;
  EXPECT_EQ(std::count(content.begin(), content.end(), '\n'), 1);
  EXPECT_TRUE(VerifyAuditLog(path).ok());
}

TEST(AuditLogTest, ConcurrentAppendsKeepOneRecordEachAndTheChain) {
  const std::string path = NewPath();
  auto log = AuditLog::Open(path);
  ASSERT_TRUE(log.ok());
  std::vector<std::thread> threads;
  std::vector<std::vector<std::string>> ids(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 250; ++i) {
        auto id = (*log)->Append(Record("k"));
        if (id.ok()) {
          ids[t].push_back(*id);
        }
      }
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  std::set<std::string> all;
  for (const auto& v : ids) {
    all.insert(v.begin(), v.end());
  }
  EXPECT_EQ(all.size(), 2000u);
  auto summary = VerifyAuditLog(path);
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->records, 2000u);
}

}  // namespace
}  // namespace custody::keyservice
