// custody-keyd as a real process over a fresh SoftHSM2 lab, driven by gRPC clients with the
// lab's identities: concurrency with exactly-once auditing, access control, bad input, a token
// that drops its sessions, and a graceful stop.
#include <arpa/inet.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "custody/v1/key_service.grpc.pb.h"
#include "custody/v1/testing.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "keyservice/audit_log.h"
#include "keyservice/batching_signer.h"
#include "keyservice/client.h"
#include "keyservice/config.h"
#include "keyservice/limits.h"
#include "keyservice/stream_signer.h"
#include "tests/support/keyd_process.h"
#include "tests/support/lab.h"
#include "tests/support/verify.h"

namespace custody {
namespace {

using custody::v1::KeyService;
using custody::v1::SignRequest;
using custody::v1::SignResponse;

class KeydTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto lab = testing::Lab::Create();
    ASSERT_TRUE(lab.ok()) << lab.status();
    lab_ = std::move(*lab).release();
    // The lab's config, with one more name the proxy may sign with but that does not exist,
    // so NOT_FOUND can be told apart from PERMISSION_DENIED.
    auto config = ReadFile(lab_->Env("CUSTODY_KEYD_CONFIG"));
    ASSERT_TRUE(config.ok());
    const std::string patched =
        absl::StrReplaceAll(*config, {{"\"lab-ed25519\"]", "\"lab-ed25519\", \"missing-*\"]"}});
    ASSERT_NE(patched, *config) << "lab keyd.yaml changed shape; update this test";
    config_path_ = lab_->Path("keyd-test.yaml");
    testing::WriteFile(config_path_, patched);
    auto keyd = testing::KeydProcess::Start({"--config", config_path_, "--enable-test-hooks"},
                                            lab_->Path("keyd.log"));
    ASSERT_TRUE(keyd.ok()) << keyd.status();
    keyd_ = std::move(*keyd).release();
  }
  static void TearDownTestSuite() {
    delete keyd_;
    keyd_ = nullptr;
    delete lab_;
    lab_ = nullptr;
  }

  void SetUp() override {
    ASSERT_NE(keyd_, nullptr);
    ASSERT_NE(lab_, nullptr);
  }

  static std::shared_ptr<grpc::Channel> Channel(const std::string& identity) {
    auto settings = keyservice::SettingsForIdentity({}, identity);
    EXPECT_TRUE(settings.ok()) << settings.status();
    auto channel = keyservice::MakeChannel(*settings);
    EXPECT_TRUE(channel.ok()) << channel.status();
    return *channel;
  }

  static std::unique_ptr<KeyService::Stub> Stub(const std::string& identity) {
    return KeyService::NewStub(Channel(identity));
  }

  static grpc::Status Sign(KeyService::Stub& stub, const SignRequest& req, SignResponse* resp) {
    grpc::ClientContext ctx;
    // Generous: sanitizer builds move a 5 MiB request slowly.
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    return stub.Sign(&ctx, req, resp);
  }

  static SignRequest MessageRequest(const std::string& key, v1::SignatureScheme scheme,
                                    const std::string& message) {
    SignRequest req;
    req.set_key_name(key);
    req.set_scheme(scheme);
    req.set_message(message);
    return req;
  }

  static std::string Spki(const std::string& key) {
    return testing::CertificatePublicKey(lab_->Path("certs/" + key + ".crt"));
  }

  // AuditLines returns the audit log's records.
  static std::vector<std::string> AuditLines() {
    auto content = ReadFile(lab_->Env("CUSTODY_AUDIT_LOG"));
    EXPECT_TRUE(content.ok());
    std::vector<std::string> lines = absl::StrSplit(*content, '\n', absl::SkipEmpty());
    return lines;
  }

  // SetFault sets keyd's fault injector (test hooks, admin identity); false on failure.
  static bool SetFault(v1::KeyServiceTesting::Stub& admin, const v1::Fault& fault) {
    grpc::ClientContext ctx;
    v1::SetFaultRequest req;
    *req.mutable_fault() = fault;
    v1::SetFaultResponse resp;
    return admin.SetFault(&ctx, req, &resp).ok();
  }
  // ReleaseHeld lets held signatures go; returns how many were held, nullopt on failure.
  static std::optional<uint32_t> ReleaseHeld(v1::KeyServiceTesting::Stub& admin) {
    grpc::ClientContext ctx;
    v1::ReleaseHeldResponse out;
    if (!admin.ReleaseHeld(&ctx, {}, &out).ok()) {
      return std::nullopt;
    }
    return out.released();
  }
  static bool Serving() { return testing::WaitForHealthy("proxy", absl::Seconds(5)).ok(); }

  static testing::Lab* lab_;
  static testing::KeydProcess* keyd_;
  static std::string config_path_;
};
testing::Lab* KeydTest::lab_ = nullptr;
testing::KeydProcess* KeydTest::keyd_ = nullptr;
std::string KeydTest::config_path_;

TEST_F(KeydTest, EveryKeyAndSchemeSignsAndVerifiesAgainstItsCertificate) {
  auto stub = Stub("proxy");
  const std::map<std::string, std::vector<v1::SignatureScheme>> cases = {
      {"lab-ec256", {v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256}},
      {"lab-ec384", {v1::SIGNATURE_SCHEME_ECDSA_SECP384R1_SHA384}},
      {"lab-rsa2048",
       {v1::SIGNATURE_SCHEME_RSA_PSS_RSAE_SHA256, v1::SIGNATURE_SCHEME_RSA_PSS_RSAE_SHA384,
        v1::SIGNATURE_SCHEME_RSA_PSS_RSAE_SHA512, v1::SIGNATURE_SCHEME_RSA_PKCS1_SHA256,
        v1::SIGNATURE_SCHEME_RSA_PKCS1_SHA384, v1::SIGNATURE_SCHEME_RSA_PKCS1_SHA512}},
      {"lab-ed25519", {v1::SIGNATURE_SCHEME_ED25519}},
  };
  for (const auto& [key, schemes] : cases) {
    for (v1::SignatureScheme scheme : schemes) {
      SCOPED_TRACE(key + " " + v1::SignatureScheme_Name(scheme));
      SignResponse resp;
      const std::string message = "TLS 1.3, server CertificateVerify " + key;
      grpc::Status st = Sign(*stub, MessageRequest(key, scheme, message), &resp);
      ASSERT_TRUE(st.ok()) << st.error_message();
      EXPECT_EQ(resp.version(), 1u);
      EXPECT_FALSE(resp.request_id().empty());
      EXPECT_TRUE(testing::VerifyMessageSignature(
          Spki(key), static_cast<hsm::SignatureScheme>(scheme), message, resp.signature()));
    }
  }
}

TEST_F(KeydTest, ConcurrentSignaturesAllVerifyAndEachIsAuditedExactlyOnce) {
  constexpr int kThreads = 16;
  constexpr int kPerThread = 500;
  const std::string spki = Spki("lab-ec256");
  const std::size_t lines_before = AuditLines().size();
  std::vector<std::vector<std::string>> ids(kThreads);
  std::atomic<int> failures{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto stub = Stub("proxy");  // One channel per thread: 16 concurrent connections.
      for (int i = 0; i < kPerThread; ++i) {
        const std::string message = absl::StrCat("thread ", t, " signature ", i);
        SignResponse resp;
        grpc::Status st =
            Sign(*stub,
                 MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, message),
                 &resp);
        if (!st.ok() ||
            !testing::VerifyMessageSignature(spki, hsm::SignatureScheme::kEcdsaSecp256r1Sha256,
                                             message, resp.signature())) {
          failures++;
          continue;
        }
        ids[t].push_back(resp.request_id());
      }
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  ASSERT_EQ(failures.load(), 0);

  std::map<std::string, int> seen;
  const std::vector<std::string> lines = AuditLines();
  for (std::size_t i = lines_before; i < lines.size(); ++i) {
    const std::string& line = lines[i];
    const auto pos = line.find("\"id\":\"");
    ASSERT_NE(pos, std::string::npos) << line;
    const auto end = line.find('"', pos + 6);
    seen[line.substr(pos + 6, end - pos - 6)]++;
  }
  int total = 0;
  for (const auto& per_thread : ids) {
    for (const std::string& id : per_thread) {
      ASSERT_EQ(seen[id], 1) << "request " << id << " audited " << seen[id] << " times";
      ++total;
    }
  }
  EXPECT_EQ(total, kThreads * kPerThread);
  EXPECT_EQ(lines.size() - lines_before, static_cast<std::size_t>(kThreads * kPerThread));
}

TEST_F(KeydTest, CallerWithoutClientCertificateCannotConnect) {
  grpc::SslCredentialsOptions opts;
  opts.pem_root_certs = *ReadFile(lab_->Env("CUSTODY_CA"));
  auto channel = grpc::CreateChannel(lab_->Env("CUSTODY_KEYD_ADDR"), grpc::SslCredentials(opts));
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse resp;
  grpc::Status st = stub->Check(&ctx, {}, &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::UNAVAILABLE) << st.error_message();
  EXPECT_TRUE(Serving());
}

TEST_F(KeydTest, IntruderIsDeniedAndTheRefusalIsAudited) {
  auto stub = Stub("intruder");
  SignResponse resp;
  grpc::Status st = Sign(
      *stub, MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(resp.signature().empty());
  const std::string last = AuditLines().back();
  EXPECT_NE(last.find("\"caller\":\"intruder\""), std::string::npos) << last;
  EXPECT_NE(last.find("\"outcome\":\"PERMISSION_DENIED\""), std::string::npos) << last;

  grpc::ClientContext ctx;
  v1::GetKeyRequest get;
  get.set_name("lab-ec256");
  v1::Key key;
  EXPECT_EQ(stub->GetKey(&ctx, get, &key).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  grpc::ClientContext list_ctx;
  v1::ListKeysResponse list;
  ASSERT_TRUE(stub->ListKeys(&list_ctx, {}, &list).ok());
  EXPECT_EQ(list.keys_size(), 0);
}

TEST_F(KeydTest, ProxyMayNotSignWithTheCaKey) {
  auto stub = Stub("proxy");
  SignResponse resp;
  grpc::Status st = Sign(
      *stub, MessageRequest("lab-ca", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"), &resp);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::PERMISSION_DENIED);
}

TEST_F(KeydTest, BadInputGetsAClearErrorAndTheServerKeepsServing) {
  auto stub = Stub("proxy");
  struct Case {
    std::string name;
    SignRequest req;
    grpc::StatusCode want;
    std::string message_has;
  };
  std::vector<Case> cases;
  cases.push_back({"unknown key",
                   MessageRequest("missing-key", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"),
                   grpc::StatusCode::NOT_FOUND, "missing-key"});
  {
    SignRequest r = MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m");
    r.set_version(7);
    cases.push_back({"unknown version", r, grpc::StatusCode::NOT_FOUND, "version 7"});
  }
  {
    SignRequest r;
    r.set_key_name("lab-ec256");
    r.set_scheme(v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256);
    r.set_digest(std::string(31, 'd'));
    cases.push_back({"short digest", r, grpc::StatusCode::INVALID_ARGUMENT, "31 bytes"});
    r.set_digest(std::string(48, 'd'));
    cases.push_back({"long digest", r, grpc::StatusCode::INVALID_ARGUMENT, "48 bytes"});
  }
  cases.push_back({"scheme not matching key",
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_RSA_PSS_RSAE_SHA256, "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "does not suit"});
  cases.push_back({"ed25519 scheme on rsa key",
                   MessageRequest("lab-rsa2048", v1::SIGNATURE_SCHEME_ED25519, "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "does not suit"});
  {
    SignRequest r;
    r.set_key_name("lab-ed25519");
    r.set_scheme(v1::SIGNATURE_SCHEME_ED25519);
    r.set_digest(std::string(32, 'd'));
    cases.push_back({"digest for ed25519", r, grpc::StatusCode::INVALID_ARGUMENT, "message"});
  }
  cases.push_back({"unknown scheme",
                   MessageRequest("lab-ec256", static_cast<v1::SignatureScheme>(0x0999), "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "scheme"});
  cases.push_back({"empty message",
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, ""),
                   grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  {
    SignRequest r;
    r.set_key_name("lab-ec256");
    r.set_scheme(v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256);
    cases.push_back({"no input", r, grpc::StatusCode::INVALID_ARGUMENT, "empty"});
  }
  cases.push_back({"message over the limit",
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256,
                                  std::string(keyservice::kDefaultMaxMessageBytes + 1, 'x')),
                   grpc::StatusCode::INVALID_ARGUMENT, "over the limit"});
  cases.push_back({"message over the transport limit",
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256,
                                  std::string(5 << 20, 'x')),
                   grpc::StatusCode::RESOURCE_EXHAUSTED, ""});
  cases.push_back({"no key name",
                   MessageRequest("", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "key_name"});
  cases.push_back({"key name with a newline",
                   MessageRequest("lab-ec256\n{\"forged\":1}",
                                  v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "key_name"});
  cases.push_back(
      {"key name too long",
       MessageRequest(std::string(129, 'k'), v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"),
       grpc::StatusCode::INVALID_ARGUMENT, "key_name"});
  cases.push_back({"scheme beyond 16 bits aliasing a valid one",
                   MessageRequest("lab-ec256", static_cast<v1::SignatureScheme>(0x10403), "m"),
                   grpc::StatusCode::INVALID_ARGUMENT, "scheme"});
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    SignResponse resp;
    grpc::Status st = Sign(*stub, c.req, &resp);
    EXPECT_EQ(st.error_code(), c.want) << st.error_message();
    EXPECT_NE(st.error_message().find(c.message_has), std::string::npos) << st.error_message();
    EXPECT_TRUE(resp.signature().empty());
  }
  // Refusals are audited, but never with a malformed name.
  for (const std::string& line : AuditLines()) {
    EXPECT_EQ(line.find("forged"), std::string::npos) << line;
    EXPECT_EQ(line.find(std::string(129, 'k')), std::string::npos);
  }
  // A message exactly at the limit is fine.
  SignResponse resp;
  EXPECT_TRUE(Sign(*stub,
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256,
                                  std::string(keyservice::kDefaultMaxMessageBytes, 'x')),
                   &resp)
                  .ok());
  EXPECT_TRUE(Serving());
}

TEST_F(KeydTest, RandomBytesToThePortCloseOnlyThatConnection) {
  auto addr = keyservice::ParseHostPort(lab_->Env("CUSTODY_KEYD_ADDR"));
  ASSERT_TRUE(addr.ok());
  std::mt19937 rng(1234);
  for (int round = 0; round < 20; ++round) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(addr->port);
    ::inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)), 0);
    std::string junk(1 + rng() % 16384, '\0');
    for (char& ch : junk) {
      ch = static_cast<char>(rng());
    }
    if (round % 4 == 0) {
      junk[0] = 0x16;  // Looks like a TLS handshake record, then nonsense.
      junk[1] = 0x03;
    }
    (void)!::send(fd, junk.data(), junk.size(), MSG_NOSIGNAL);
    ::close(fd);
  }
  ASSERT_TRUE(Serving());
  auto stub = Stub("proxy");
  SignResponse resp;
  EXPECT_TRUE(Sign(*stub,
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "m"),
                   &resp)
                  .ok());
}

TEST_F(KeydTest, NextSignatureSucceedsAfterTheTokenDropsEverySession) {
  auto admin = v1::KeyServiceTesting::NewStub(Channel("admin"));
  auto stub = Stub("proxy");
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    grpc::ClientContext ctx;
    v1::CloseAllSessionsResponse out;
    ASSERT_TRUE(admin->CloseAllSessions(&ctx, {}, &out).ok());
    SignResponse resp;
    grpc::Status st = Sign(
        *stub, MessageRequest("lab-rsa2048", v1::SIGNATURE_SCHEME_RSA_PSS_RSAE_SHA256, "after"),
        &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_TRUE(testing::VerifyMessageSignature(
        Spki("lab-rsa2048"), hsm::SignatureScheme::kRsaPssRsaeSha256, "after", resp.signature()));
  }
  // Only admins may pull that lever.
  auto proxy_testing = v1::KeyServiceTesting::NewStub(Channel("proxy"));
  grpc::ClientContext ctx;
  v1::CloseAllSessionsResponse out;
  EXPECT_EQ(proxy_testing->CloseAllSessions(&ctx, {}, &out).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
}

// SignBatch: every request is checked, signed and audited as if sent alone; the outcomes come in
// the requests' order (the audit records in the order the signatures were made).
TEST_F(KeydTest, SignBatchAnswersEachRequestAndAuditsEachOnce) {
  auto stub = Stub("proxy");
  v1::SignBatchRequest batch;
  *batch.add_requests() =
      MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "first");
  *batch.add_requests() =
      MessageRequest("lab-ca", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "not yours");
  *batch.add_requests() = MessageRequest("lab-ed25519", v1::SIGNATURE_SCHEME_ED25519, "third");
  *batch.add_requests() = MessageRequest("missing-key", v1::SIGNATURE_SCHEME_ED25519, "x");
  const std::size_t before = AuditLines().size();
  grpc::ClientContext ctx;
  v1::SignBatchResponse resp;
  ASSERT_TRUE(stub->SignBatch(&ctx, batch, &resp).ok());
  ASSERT_EQ(resp.outcomes_size(), 4);
  EXPECT_EQ(resp.outcomes(0).code(), 0);
  EXPECT_TRUE(testing::VerifyMessageSignature(Spki("lab-ec256"),
                                              hsm::SignatureScheme::kEcdsaSecp256r1Sha256, "first",
                                              resp.outcomes(0).response().signature()));
  EXPECT_EQ(resp.outcomes(1).code(), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_TRUE(resp.outcomes(1).response().signature().empty());
  EXPECT_EQ(resp.outcomes(2).code(), 0);
  EXPECT_TRUE(testing::VerifyMessageSignature(Spki("lab-ed25519"), hsm::SignatureScheme::kEd25519,
                                              "third", resp.outcomes(2).response().signature()));
  EXPECT_EQ(resp.outcomes(3).code(), grpc::StatusCode::NOT_FOUND);
  const std::vector<std::string> lines = AuditLines();
  ASSERT_EQ(lines.size() - before, 4u);
  const std::vector<std::string> batch_lines(lines.begin() + before, lines.end());
  auto count = [&](const std::string& needle) {
    return std::count_if(batch_lines.begin(), batch_lines.end(), [&](const std::string& line) {
      return line.find(needle) != std::string::npos;
    });
  };
  EXPECT_EQ(count(resp.outcomes(0).response().request_id()), 1);
  EXPECT_EQ(count(resp.outcomes(2).response().request_id()), 1);
  EXPECT_EQ(count("\"key\":\"lab-ca\""), 1);
  EXPECT_EQ(count("PERMISSION_DENIED"), 1);
  EXPECT_EQ(count("NOT_FOUND"), 1);

  for (int size : {0, keyservice::kMaxSignBatch + 1}) {
    v1::SignBatchRequest bad;
    for (int i = 0; i < size; ++i) {
      *bad.add_requests() = batch.requests(0);
    }
    grpc::ClientContext bad_ctx;
    v1::SignBatchResponse bad_resp;
    EXPECT_EQ(stub->SignBatch(&bad_ctx, bad, &bad_resp).error_code(),
              grpc::StatusCode::INVALID_ARGUMENT)
        << size;
  }
}

// BatchingSigner under concurrency: every signature verifies and arrives once.
TEST_F(KeydTest, BatchingSignerSignsManyConcurrentRequests) {
  constexpr int kRequests = 2000;
  const std::string spki = Spki("lab-ec384");
  std::atomic<int> good{0};
  std::atomic<int> bad{0};
  {
    keyservice::BatchingSigner signer({Channel("proxy")}, /*max_in_flight=*/2, absl::Seconds(30));
    for (int i = 0; i < kRequests; ++i) {
      const std::string message = absl::StrCat("batched ", i);
      signer.Sign(MessageRequest("lab-ec384", v1::SIGNATURE_SCHEME_ECDSA_SECP384R1_SHA384, message),
                  [&, message](const grpc::Status& st, const v1::SignResponse& resp) {
                    const bool ok =
                        st.ok() && testing::VerifyMessageSignature(
                                       spki, hsm::SignatureScheme::kEcdsaSecp384r1Sha384, message,
                                       resp.signature());
                    (ok ? good : bad)++;
                  });
    }
  }  // The destructor waits for every call.
  EXPECT_EQ(good.load(), kRequests);
  EXPECT_EQ(bad.load(), 0);
}

// SignStream on the wire: items are answered by id (a refusal is that item's outcome, audited),
// and a malformed message (no items, too many, an id already pending) ends the call with
// INVALID_ARGUMENT after the items read before it are answered.
TEST_F(KeydTest, SignStreamAnswersItemsByIdAndRefusesMalformedMessages) {
  auto stub = Stub("proxy");
  const std::size_t before = AuditLines().size();
  {
    grpc::ClientContext ctx;
    auto stream = stub->SignStream(&ctx);
    v1::SignStreamRequest message;
    auto add = [&](uint64_t id, const SignRequest& req) {
      v1::SignStreamItem* item = message.add_items();
      item->set_id(id);
      *item->mutable_request() = req;
      item->set_timeout_ms(30000);
    };
    add(7, MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "seven"));
    add(9, MessageRequest("lab-ca", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "not yours"));
    add(3, MessageRequest("lab-ed25519", v1::SIGNATURE_SCHEME_ED25519, "three"));
    ASSERT_TRUE(stream->Write(message));
    std::map<uint64_t, v1::SignOutcome> outcomes;
    v1::SignStreamResponse resp;
    while (outcomes.size() < 3 && stream->Read(&resp)) {
      for (const auto& r : resp.results()) {
        EXPECT_TRUE(outcomes.emplace(r.id(), r.outcome()).second) << "id " << r.id() << " twice";
      }
    }
    ASSERT_EQ(outcomes.size(), 3u);
    EXPECT_EQ(outcomes[7].code(), 0);
    EXPECT_TRUE(testing::VerifyMessageSignature(Spki("lab-ec256"),
                                                hsm::SignatureScheme::kEcdsaSecp256r1Sha256,
                                                "seven", outcomes[7].response().signature()));
    EXPECT_EQ(outcomes[9].code(), grpc::StatusCode::PERMISSION_DENIED);
    EXPECT_EQ(outcomes[3].code(), 0);
    EXPECT_TRUE(testing::VerifyMessageSignature(Spki("lab-ed25519"), hsm::SignatureScheme::kEd25519,
                                                "three", outcomes[3].response().signature()));
    const std::vector<std::string> lines = AuditLines();
    ASSERT_EQ(lines.size() - before, 3u);
    // The stream stays open for more; a clean half-close ends it OK.
    message.Clear();
    add(11, MessageRequest("lab-ec384", v1::SIGNATURE_SCHEME_ECDSA_SECP384R1_SHA384, "eleven"));
    ASSERT_TRUE(stream->Write(message));
    ASSERT_TRUE(stream->Read(&resp));
    ASSERT_EQ(resp.results_size(), 1);
    EXPECT_EQ(resp.results(0).id(), 11u);
    EXPECT_EQ(resp.results(0).outcome().code(), 0);
    stream->WritesDone();
    EXPECT_FALSE(stream->Read(&resp));
    EXPECT_TRUE(stream->Finish().ok());
  }
  for (int size : {0, keyservice::kMaxSignBatch + 1}) {
    grpc::ClientContext ctx;
    auto stream = stub->SignStream(&ctx);
    v1::SignStreamRequest bad;
    for (int i = 0; i < size; ++i) {
      v1::SignStreamItem* item = bad.add_items();
      item->set_id(static_cast<uint64_t>(i));
      *item->mutable_request() =
          MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "x");
    }
    stream->Write(bad);
    v1::SignStreamResponse resp;
    while (stream->Read(&resp)) {
    }
    const grpc::Status st = stream->Finish();
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << size << st.error_message();
  }
  // The service keeps serving.
  SignResponse resp;
  EXPECT_TRUE(Sign(*stub,
                   MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "ok"),
                   &resp)
                  .ok());
}

// StreamSigner under concurrency, from several threads over two streams: every signature
// verifies and each request is answered exactly once.
TEST_F(KeydTest, StreamSignerSignsManyConcurrentRequests) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 500;
  const std::string spki = Spki("lab-ec384");
  std::atomic<int> good{0};
  std::atomic<int> bad{0};
  {
    keyservice::StreamSigner signer(Channel("proxy"), /*lanes=*/2);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < kPerThread; i += 5) {
          std::vector<keyservice::StreamSigner::Request> batch;
          for (int j = i; j < i + 5; ++j) {
            const std::string message = absl::StrCat("streamed ", t, " ", j);
            batch.push_back(
                {MessageRequest("lab-ec384", v1::SIGNATURE_SCHEME_ECDSA_SECP384R1_SHA384, message),
                 absl::Now() + absl::Seconds(60),
                 [&, message](const grpc::Status& st, const v1::SignResponse& resp) {
                   const bool ok = st.ok() && testing::VerifyMessageSignature(
                                                  spki, hsm::SignatureScheme::kEcdsaSecp384r1Sha384,
                                                  message, resp.signature());
                   (ok ? good : bad)++;
                 }});
          }
          signer.SignMany(std::move(batch));
        }
      });
    }
    for (auto& t : threads) {
      t.join();
    }
    const absl::Time give_up = absl::Now() + absl::Seconds(120);
    while (good + bad < kThreads * kPerThread && absl::Now() < give_up) {
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
  EXPECT_EQ(good.load(), kThreads * kPerThread);
  EXPECT_EQ(bad.load(), 0);
}

// A signature held by keyd past the request's deadline is answered DEADLINE_EXCEEDED (by the
// deadline, give or take the expiry tick: the client does not wait for keyd), and the stream
// that let it expire is replaced: the next request on the same single lane is signed.
TEST_F(KeydTest, StreamSignerAnswersByTheDeadlineAndRecovers) {
  auto admin = v1::KeyServiceTesting::NewStub(Channel("admin"));
  keyservice::StreamSigner signer(Channel("proxy"), /*lanes=*/1);
  const auto request =
      MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "stuck");
  struct Outcome {
    std::mutex mu;
    std::condition_variable cv;
    std::optional<grpc::Status> status;
  };
  auto sign = [&](absl::Duration timeout, Outcome& out) {
    std::vector<keyservice::StreamSigner::Request> one;
    one.push_back(
        {request, absl::Now() + timeout, [&out](const grpc::Status& st, const v1::SignResponse&) {
           std::lock_guard<std::mutex> lock(out.mu);
           out.status = st;
           out.cv.notify_all();
         }});
    signer.SignMany(std::move(one));
  };
  auto wait = [](Outcome& out) {
    std::unique_lock<std::mutex> lock(out.mu);
    out.cv.wait_for(lock, std::chrono::seconds(60), [&] { return out.status.has_value(); });
    return out.status.value_or(grpc::Status(grpc::StatusCode::UNKNOWN, "no answer"));
  };
  v1::Fault held;
  held.set_hold(true);
  ASSERT_TRUE(SetFault(*admin, held));
  Outcome first;
  sign(absl::Milliseconds(500), first);
  EXPECT_EQ(wait(first).error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  ASSERT_TRUE(SetFault(*admin, v1::Fault()));
  Outcome second;
  sign(absl::Seconds(30), second);
  const grpc::Status st = wait(second);
  EXPECT_TRUE(st.ok()) << st.error_message();
  ASSERT_TRUE(ReleaseHeld(*admin).has_value());
}

// keyd's Unix socket: a caller with keyd's uid signs as the socket's identity (the policy still
// applies, and the audit record names the socket); a caller with another uid is refused at
// connect and audited (checked when the test runs as root and can become another uid).
TEST_F(KeydTest, UnixSocketCallersAreKnownByUid) {
  const std::string socket = lab_->Env("CUSTODY_KEYD_SOCKET");
  ASSERT_FALSE(socket.empty()) << "the lab has no keyd Unix socket";
  keyservice::ClientSettings settings;
  settings.address = socket;
  auto channel = keyservice::MakeChannel(settings);
  ASSERT_TRUE(channel.ok()) << channel.status();
  auto stub = KeyService::NewStub(*channel);
  SignResponse resp;
  const grpc::Status st = Sign(
      *stub, MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "by uid"),
      &resp);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_TRUE(testing::VerifyMessageSignature(
      Spki("lab-ec256"), hsm::SignatureScheme::kEcdsaSecp256r1Sha256, "by uid", resp.signature()));
  const std::string record = AuditLines().back();
  EXPECT_NE(record.find("\"caller\":\"proxy\",\"peer\":\"" + socket + " (fd:"), std::string::npos)
      << record;
  // The socket's identity is the proxy's: the CA key stays out of reach.
  EXPECT_EQ(Sign(*stub, MessageRequest("lab-ca", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "no"),
                 &resp)
                .error_code(),
            grpc::StatusCode::PERMISSION_DENIED);

  if (::geteuid() != 0) {
    std::cout << "not root: the refusal of another uid is not exercised here\n";
    return;
  }
  // Let the file system through (socket 0666, its folders searchable), so that only keyd's uid
  // check stands between the other uid and the service.
  const std::string path = socket.substr(std::string("unix:").size());
  std::vector<std::pair<std::string, mode_t>> opened;  // Folders made searchable, old modes.
  for (std::string dir = path.substr(0, path.rfind('/')); dir.size() > 1;
       dir = dir.substr(0, std::max<std::size_t>(1, dir.rfind('/')))) {
    struct stat st {};
    ASSERT_EQ(::stat(dir.c_str(), &st), 0) << dir;
    if ((st.st_mode & 0001) == 0) {
      opened.emplace_back(dir, st.st_mode & 07777);
      ASSERT_EQ(::chmod(dir.c_str(), (st.st_mode & 07777) | 0001), 0) << dir;
    }
  }
  ASSERT_EQ(::chmod(path.c_str(), 0666), 0);
  const std::size_t before = AuditLines().size();
  const pid_t child = ::fork();
  if (child == 0) {
    // As nobody: connect, then expect keyd to close the connection without a word.
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) {
      ::_exit(2);
    }
    const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::_exit(3);
    }
    char byte = 0;
    ::_exit(::read(fd, &byte, 1) == 0 ? 0 : 4);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ::chmod(path.c_str(), 0660);
  for (const auto& [dir, mode] : opened) {
    ::chmod(dir.c_str(), mode);
  }
  ASSERT_TRUE(WIFEXITED(status));
  // 0: connected, then closed by keyd without a word (3: could not connect; 4: got bytes).
  ASSERT_EQ(WEXITSTATUS(status), 0);
  const std::vector<std::string> lines = AuditLines();
  ASSERT_EQ(lines.size(), before + 1);
  EXPECT_NE(lines.back().find("\"action\":\"connect\""), std::string::npos) << lines.back();
  EXPECT_NE(lines.back().find("uid=65534"), std::string::npos) << lines.back();
  EXPECT_NE(lines.back().find("PERMISSION_DENIED"), std::string::npos) << lines.back();
}

// The fault injector (test hooks): corrupt, failing, slow and held signatures, then normal.
TEST_F(KeydTest, FaultInjectionDrivesFailuresAndHolds) {
  auto admin = v1::KeyServiceTesting::NewStub(Channel("admin"));
  auto set_fault = [&](const v1::Fault& fault) { return SetFault(*admin, fault); };
  auto stub = Stub("proxy");
  const auto request =
      MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "faulty");
  const std::string spki = Spki("lab-ec256");
  auto verifies = [&](const SignResponse& resp) {
    return testing::VerifyMessageSignature(spki, hsm::SignatureScheme::kEcdsaSecp256r1Sha256,
                                           "faulty", resp.signature());
  };

  v1::Fault corrupt;
  corrupt.set_corrupt(true);
  ASSERT_TRUE(set_fault(corrupt));
  SignResponse resp;
  ASSERT_TRUE(Sign(*stub, request, &resp).ok());
  EXPECT_FALSE(verifies(resp));

  v1::Fault failing;
  failing.set_fail_code(static_cast<int>(grpc::StatusCode::UNAVAILABLE));
  ASSERT_TRUE(set_fault(failing));
  EXPECT_EQ(Sign(*stub, request, &resp).error_code(), grpc::StatusCode::UNAVAILABLE);

  v1::Fault held;
  held.set_hold(true);
  ASSERT_TRUE(set_fault(held));
  grpc::Status held_status;
  SignResponse held_resp;
  std::thread signer([&] { held_status = Sign(*stub, request, &held_resp); });
  uint32_t released = 0;
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (released == 0 && absl::Now() < give_up) {  // Until the signature is waiting.
    auto out = ReleaseHeld(*admin);
    ASSERT_TRUE(out.has_value());
    released = *out;
  }
  signer.join();
  EXPECT_EQ(released, 1u);
  EXPECT_TRUE(held_status.ok()) << held_status.error_message();
  EXPECT_TRUE(verifies(held_resp));

  ASSERT_TRUE(set_fault(v1::Fault()));
  ASSERT_TRUE(Sign(*stub, request, &resp).ok());
  EXPECT_TRUE(verifies(resp));
  // Only admins set faults.
  auto proxy_testing = v1::KeyServiceTesting::NewStub(Channel("proxy"));
  grpc::ClientContext ctx;
  v1::SetFaultRequest req;
  v1::SetFaultResponse out;
  EXPECT_EQ(proxy_testing->SetFault(&ctx, req, &out).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
}

// An HSM that is slow per signature (here 10 ms, injected) gets a batch's requests signed at
// once over several sessions, not one after the other: with every signature held, all four of
// one batch are in flight together (keyd's own gauge says so), and all four sign on release.
TEST_F(KeydTest, SlowHsmBatchIsSignedInParallel) {
  auto admin = v1::KeyServiceTesting::NewStub(Channel("admin"));
  auto set_fault = [&](const v1::Fault& fault) { return SetFault(*admin, fault); };
  auto stub = Stub("proxy");
  const auto request =
      MessageRequest("lab-ec256", v1::SIGNATURE_SCHEME_ECDSA_SECP256R1_SHA256, "slow");
  // keyd learns the HSM's cost from the signatures it makes.
  v1::Fault slow;
  slow.set_delay_ms(10);
  ASSERT_TRUE(set_fault(slow));
  for (int i = 0; i < 20; ++i) {
    SignResponse resp;
    ASSERT_TRUE(Sign(*stub, request, &resp).ok());
  }
  v1::Fault held;
  held.set_hold(true);
  ASSERT_TRUE(set_fault(held));
  v1::SignBatchRequest batch;
  for (int i = 0; i < 4; ++i) {
    *batch.add_requests() = request;
  }
  grpc::Status batch_status;
  v1::SignBatchResponse batch_resp;
  std::thread caller([&] {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    batch_status = stub->SignBatch(&ctx, batch, &batch_resp);
  });
  const std::string metrics_url =
      absl::StrCat("http://", lab_->Env("CUSTODY_KEYD_METRICS_ADDR"), "/metrics");
  bool all_four = false;
  const absl::Time give_up = absl::Now() + absl::Seconds(20);
  while (!all_four && absl::Now() < give_up) {
    std::string out;
    testing::RunCommand(absl::StrCat("curl -sf ", metrics_url), &out);
    all_four = out.find("\ncustody_keyd_signs_in_flight 4\n") != std::string::npos;
    if (!all_four) {
      absl::SleepFor(absl::Milliseconds(20));
    }
  }
  EXPECT_TRUE(all_four) << "the batch's four signatures were not in flight together";
  ASSERT_TRUE(set_fault(v1::Fault()));
  ASSERT_TRUE(ReleaseHeld(*admin).has_value());
  caller.join();
  ASSERT_TRUE(batch_status.ok()) << batch_status.error_message();
  ASSERT_EQ(batch_resp.outcomes_size(), 4);
  for (const auto& outcome : batch_resp.outcomes()) {
    EXPECT_EQ(outcome.code(), 0) << outcome.message();
  }
}

// Server reflection lists the services (so grpcurl-style tools work). The request is
// hand-encoded: ServerReflectionRequest{list_services: "*"} is field 7, a string.
TEST_F(KeydTest, ServerReflectionListsTheKeyService) {
  grpc::GenericStub stub(Channel("proxy"));
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag = nullptr;
  bool ok = false;
  auto step = [&](intptr_t want) {
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(tag), want);
    return ok;
  };
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(step(1));
  const std::string request("\x3a\x01*", 3);
  grpc::Slice slice(request);
  grpc::ByteBuffer out(&slice, 1);
  call->Write(out, reinterpret_cast<void*>(2));
  ASSERT_TRUE(step(2));
  grpc::ByteBuffer in;
  call->Read(&in, reinterpret_cast<void*>(3));
  ASSERT_TRUE(step(3));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(in.Dump(&slices).ok());
  std::string response;
  for (const auto& sl : slices) {
    response.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
  }
  EXPECT_NE(response.find("custody.v1.KeyService"), std::string::npos);
  EXPECT_NE(response.find("grpc.health.v1.Health"), std::string::npos);
  call->WritesDone(reinterpret_cast<void*>(4));
  step(4);
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  step(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(KeydTest, HealthFollowsTheStandardProtocol) {
  using grpc::health::v1::HealthCheckRequest;
  using grpc::health::v1::HealthCheckResponse;
  auto health = grpc::health::v1::Health::NewStub(Channel("proxy"));
  auto check = [&](const std::string& service, HealthCheckResponse* out) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    HealthCheckRequest req;
    req.set_service(service);
    return health->Check(&ctx, req, out);
  };
  for (const std::string service : {"", "custody.v1.KeyService"}) {
    HealthCheckResponse resp;
    const grpc::Status st = check(service, &resp);
    ASSERT_TRUE(st.ok()) << "'" << service << "': " << st.error_message();
    EXPECT_EQ(resp.status(), HealthCheckResponse::SERVING) << "'" << service << "'";
  }
  HealthCheckResponse unknown;
  EXPECT_EQ(check("no.such.Service", &unknown).error_code(), grpc::StatusCode::NOT_FOUND);

  // Watch answers at once with the current status (SERVICE_UNKNOWN for an unknown name) and
  // ends when the client cancels.
  for (const auto& [service, want] :
       std::vector<std::pair<std::string, HealthCheckResponse::ServingStatus>>{
           {"", HealthCheckResponse::SERVING},
           {"no.such.Service", HealthCheckResponse::SERVICE_UNKNOWN}}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    HealthCheckRequest req;
    req.set_service(service);
    auto reader = health->Watch(&ctx, req);
    HealthCheckResponse first;
    ASSERT_TRUE(reader->Read(&first)) << "'" << service << "'";
    EXPECT_EQ(first.status(), want) << "'" << service << "'";
    ctx.TryCancel();
    HealthCheckResponse more;
    while (reader->Read(&more)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }

  // The health service adds no polling threads (gRPC's built-in one, on the callback API,
  // starts one per CPU, and they wake for every signing message).
  const std::string tasks = absl::StrCat("/proc/", keyd_->pid(), "/task");
  int threads = 0;
  for (const auto& entry : std::filesystem::directory_iterator(tasks)) {
    auto comm = ReadFile(entry.path().string() + "/comm");
    ASSERT_TRUE(comm.ok());
    EXPECT_EQ(comm->find("nexting"), std::string::npos) << "thread " << *comm;
    ++threads;
  }
  EXPECT_GT(threads, 1);
}

// Defined last, so it runs last: it stops the shared key service.
TEST_F(KeydTest, SigtermStopsGracefullyAndTheAuditLogVerifies) {
  // A health watcher hears NOT_SERVING and its call ends: it does not hold the shutdown up.
  auto health = grpc::health::v1::Health::NewStub(Channel("proxy"));
  grpc::ClientContext watch_ctx;
  watch_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  auto watch = health->Watch(&watch_ctx, {});
  grpc::health::v1::HealthCheckResponse first;
  ASSERT_TRUE(watch->Read(&first));
  EXPECT_EQ(first.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  std::vector<grpc::health::v1::HealthCheckResponse::ServingStatus> later;
  std::thread watcher([&] {
    grpc::health::v1::HealthCheckResponse r;
    while (watch->Read(&r)) {
      later.push_back(r.status());
    }
  });
  EXPECT_EQ(keyd_->Stop(), 0);
  watcher.join();
  EXPECT_EQ(later, std::vector{grpc::health::v1::HealthCheckResponse::NOT_SERVING});
  EXPECT_NE(watch->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_NE(keyd_->Log().find("custody-keyd: stopped"), std::string::npos) << keyd_->Log();
  auto summary = keyservice::VerifyAuditLog(lab_->Env("CUSTODY_AUDIT_LOG"));
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->records, AuditLines().size());
}

}  // namespace
}  // namespace custody
