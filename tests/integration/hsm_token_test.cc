// The PKCS#11 layer against a fresh SoftHSM2 lab token: key protection attributes, signing for
// every scheme, recovery after the token drops every session, concurrency, and clear errors.
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "common/files.h"
#include "hsm/pkcs11_key_backend.h"
#include "tests/support/lab.h"
#include "tests/support/verify.h"

namespace custody {
namespace {

using hsm::Pkcs11KeyBackend;
using hsm::SignatureScheme;

const char* const kServedKeys[] = {"lab-ec256", "lab-ec384", "lab-rsa2048", "lab-ed25519"};

class HsmTokenTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto lab = testing::Lab::Create();
    ASSERT_TRUE(lab.ok()) << lab.status();
    lab_ = std::move(*lab).release();
  }
  static void TearDownTestSuite() {
    delete lab_;
    lab_ = nullptr;
  }

  static hsm::Pkcs11Options Options(std::size_t sessions = 4) {
    auto pin = ReadSecretFile(lab_->Env("CUSTODY_PIN_FILE"));
    EXPECT_TRUE(pin.ok()) << pin.status();
    return {lab_->Env("CUSTODY_PKCS11_MODULE"), "custody-lab", pin.value_or(""), sessions};
  }

  static std::unique_ptr<Pkcs11KeyBackend> Open(std::size_t sessions = 4) {
    auto backend = Pkcs11KeyBackend::Open(Options(sessions));
    EXPECT_TRUE(backend.ok()) << backend.status();
    return backend.ok() ? std::move(*backend) : nullptr;
  }

  static absl::StatusOr<hsm::SignResult> SignMessage(hsm::KeyBackend& backend,
                                                     const std::string& key, SignatureScheme s,
                                                     const std::string& message) {
    auto input = hsm::PrepareSignInput(
        *hsm::FindScheme(static_cast<uint16_t>(s)), /*is_message=*/true,
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(message.data()), message.size()),
        1 << 20);
    if (!input.ok()) {
      return input.status();
    }
    return backend.Sign(key, 0, *input, absl::Now() + absl::Seconds(10));
  }

  static std::string SpkiOf(const hsm::KeyBackend& backend, const std::string& name) {
    for (const auto& v : backend.ListKeys()) {
      if (v.name == name) {
        return std::string(v.public_key_der.begin(), v.public_key_der.end());
      }
    }
    return "";
  }

  static testing::Lab* lab_;
};
testing::Lab* HsmTokenTest::lab_ = nullptr;

TEST_F(HsmTokenTest, PrivateKeysAreSensitiveAndNeverExtractable) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  for (const char* name : {"lab-ec256", "lab-ec384", "lab-rsa2048", "lab-ed25519", "lab-ca"}) {
    SCOPED_TRACE(name);
    auto attrs = backend->ReadKeyAttributes(name, 1);
    ASSERT_TRUE(attrs.ok()) << attrs.status();
    EXPECT_TRUE(attrs->sensitive);
    EXPECT_FALSE(attrs->extractable);
    EXPECT_TRUE(attrs->always_sensitive);
    EXPECT_TRUE(attrs->never_extractable);
    // Reading the private value must be refused by the token.
    EXPECT_EQ(attrs->value_read_rv, static_cast<CK_RV>(CKR_ATTRIBUTE_SENSITIVE));
  }
}

TEST_F(HsmTokenTest, InventoryMatchesCertificates) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  for (const char* name : kServedKeys) {
    SCOPED_TRACE(name);
    const std::string cert_spki =
        testing::CertificatePublicKey(lab_->Path(std::string("certs/") + name + ".crt"));
    ASSERT_FALSE(cert_spki.empty());
    EXPECT_EQ(SpkiOf(*backend, name), cert_spki);
    for (const auto& v : backend->ListKeys()) {
      if (v.name == name) {
        EXPECT_EQ(v.version, 1u);
        ASSERT_EQ(v.certificate_chain.size(), 1u);  // Leaf only: the root is not sent in TLS.
        EXPECT_GT(v.not_after, absl::ToUnixSeconds(absl::Now()));
      }
    }
  }
}

TEST_F(HsmTokenTest, SignsEverySchemeAndSignaturesVerify) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  int checked = 0;
  for (const char* name : kServedKeys) {
    const std::string spki = SpkiOf(*backend, name);
    for (const auto& v : backend->ListKeys()) {
      if (v.name != name) {
        continue;
      }
      for (SignatureScheme s : hsm::SchemesForKey(v.type)) {
        SCOPED_TRACE(std::string(name) + " " + hsm::FindScheme(static_cast<uint16_t>(s))->name);
        const std::string message = "custody handshake transcript " + std::to_string(checked);
        auto sig = SignMessage(*backend, name, s, message);
        ASSERT_TRUE(sig.ok()) << sig.status();
        const std::string sig_str(sig->signature.begin(), sig->signature.end());
        EXPECT_TRUE(testing::VerifyMessageSignature(spki, s, message, sig_str));
        EXPECT_FALSE(testing::VerifyMessageSignature(spki, s, message + "x", sig_str));
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 3 + 3 + 6 + 1);
}

TEST_F(HsmTokenTest, SchemeNotSuitingKeyIsInvalidArgument) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  auto sig = SignMessage(*backend, "lab-ec256", SignatureScheme::kRsaPssRsaeSha256, "m");
  EXPECT_EQ(sig.status().code(), absl::StatusCode::kInvalidArgument);
  sig = SignMessage(*backend, "lab-rsa2048", SignatureScheme::kEd25519, "m");
  EXPECT_EQ(sig.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(HsmTokenTest, UnknownKeyOrVersionIsNotFound) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  auto sig = SignMessage(*backend, "no-such-key", SignatureScheme::kEcdsaSecp256r1Sha256, "m");
  EXPECT_EQ(sig.status().code(), absl::StatusCode::kNotFound);
  auto input =
      hsm::PrepareSignInput(*hsm::FindSchemeByName("ecdsa_secp256r1_sha256"), true,
                            absl::MakeConstSpan(reinterpret_cast<const uint8_t*>("m"), 1), 100);
  ASSERT_TRUE(input.ok());
  auto v9 = backend->Sign("lab-ec256", 9, *input, absl::Now() + absl::Seconds(5));
  EXPECT_EQ(v9.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(HsmTokenTest, NextSignatureSucceedsAfterTokenDropsEverySession) {
  auto backend = Open();
  ASSERT_NE(backend, nullptr);
  const std::string spki = SpkiOf(*backend, "lab-ec256");
  for (int round = 0; round < 3; ++round) {
    SCOPED_TRACE(round);
    ASSERT_TRUE(
        SignMessage(*backend, "lab-ec256", SignatureScheme::kEcdsaSecp256r1Sha256, "a").ok());
    ASSERT_TRUE(backend->SimulateTokenReset().ok());
    auto sig = SignMessage(*backend, "lab-ec256", SignatureScheme::kEcdsaSecp256r1Sha256, "b");
    ASSERT_TRUE(sig.ok()) << sig.status();
    EXPECT_TRUE(
        testing::VerifyMessageSignature(spki, SignatureScheme::kEcdsaSecp256r1Sha256, "b",
                                        std::string(sig->signature.begin(), sig->signature.end())));
  }
}

// Resets while signatures are in flight: a call may fail (UNAVAILABLE) only if a second reset
// hits its one retry; nothing crashes or wedges, and signing works again afterwards.
TEST_F(HsmTokenTest, ResetsDuringConcurrentSigningNeverWedge) {
  auto backend = Open(/*sessions=*/4);
  ASSERT_NE(backend, nullptr);
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0};
  std::atomic<int> other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&] {
      while (!stop) {
        auto sig = SignMessage(*backend, "lab-ec256", SignatureScheme::kEcdsaSecp256r1Sha256, "m");
        if (sig.ok()) {
          ok++;
        } else if (sig.status().code() != absl::StatusCode::kUnavailable) {
          other++;
        }
      }
    });
  }
  // Each round waits for 50 more good signatures (bounded), then resets the token.
  auto progress = [&] {
    const int before = ok.load();
    const absl::Time give_up = absl::Now() + absl::Seconds(20);
    while (ok.load() < before + 50 && absl::Now() < give_up) {
      std::this_thread::yield();
    }
    return ok.load() >= before + 50;
  };
  bool healthy = true;
  for (int i = 0; i < 5 && healthy; ++i) {
    healthy = progress() && backend->SimulateTokenReset().ok();
  }
  healthy = healthy && progress();
  stop = true;
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_TRUE(healthy) << "signing stalled or a reset failed";
  EXPECT_EQ(other.load(), 0);
  EXPECT_TRUE(
      SignMessage(*backend, "lab-ed25519", SignatureScheme::kEd25519, "after the storm").ok());
  EXPECT_EQ(backend->sessions().in_use(), 0u);
}

TEST_F(HsmTokenTest, ConcurrentSigningFromManyThreadsAllVerify) {
  auto backend = Open(/*sessions=*/8);
  ASSERT_NE(backend, nullptr);
  const std::string spki = SpkiOf(*backend, "lab-ec256");
  std::atomic<int> good{0};
  std::atomic<int> bad{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 32; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        const std::string m = "t" + std::to_string(t) + "-" + std::to_string(i);
        auto sig = SignMessage(*backend, "lab-ec256", SignatureScheme::kEcdsaSecp256r1Sha256, m);
        const bool ok = sig.ok() && testing::VerifyMessageSignature(
                                        spki, SignatureScheme::kEcdsaSecp256r1Sha256, m,
                                        std::string(sig->signature.begin(), sig->signature.end()));
        (ok ? good : bad)++;
      }
    });
  }
  for (auto& th : threads) {
    th.join();
  }
  EXPECT_EQ(good.load(), 32 * 50);
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(backend->sessions().in_use(), 0u);
}

TEST_F(HsmTokenTest, SessionPoolBoundsConcurrencyAndHonoursDeadline) {
  auto backend = Open(/*sessions=*/2);
  ASSERT_NE(backend, nullptr);
  auto a = backend->sessions().Acquire(absl::Now() + absl::Seconds(5));
  auto b = backend->sessions().Acquire(absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(a.ok() && b.ok());
  auto c = backend->sessions().Acquire(absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kDeadlineExceeded);
  auto input =
      hsm::PrepareSignInput(*hsm::FindSchemeByName("ed25519"), true,
                            absl::MakeConstSpan(reinterpret_cast<const uint8_t*>("m"), 1), 100);
  ASSERT_TRUE(input.ok());
  auto sig = backend->Sign("lab-ed25519", 0, *input, absl::Now() + absl::Milliseconds(50));
  EXPECT_EQ(sig.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST_F(HsmTokenTest, WrongPinIsFailedPrecondition) {
  hsm::Pkcs11Options opts = Options();
  opts.pin = "0000000000";
  auto backend = Pkcs11KeyBackend::Open(opts);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(backend.status().message().find("CKR_PIN_INCORRECT"), absl::string_view::npos);
}

TEST_F(HsmTokenTest, UnknownTokenIsNotFoundAndListsTokens) {
  hsm::Pkcs11Options opts = Options();
  opts.token_label = "no-such-token";
  auto backend = Pkcs11KeyBackend::Open(opts);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(backend.status().message().find("custody-lab"), absl::string_view::npos);
}

TEST_F(HsmTokenTest, NonModuleIsFailedPrecondition) {
  hsm::Pkcs11Options opts = Options();
  opts.module_path = "/nonexistent/libpkcs11.so";
  auto backend = Pkcs11KeyBackend::Open(opts);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace custody
