// The custody provider inside a program's own OpenSSL library context, against a real
// custody-keyd over a fresh lab: keys load through the custody: store, sign through the key
// service, answer OpenSSL's questions from their public half, and never give a private half out.
#include <gtest/gtest.h>
#include <openssl/core_names.h>
#include <openssl/pem.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>
#include <openssl/store.h>

#include "absl/strings/str_cat.h"
#include "common/ossl.h"
#include "tests/support/keyd_process.h"
#include "tests/support/lab.h"
#include "tests/support/verify.h"

extern "C" int OSSL_provider_init(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in,
                                  const OSSL_DISPATCH** out, void** provctx);

namespace custody {
namespace {

class ProviderTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto lab = testing::Lab::Create();
    ASSERT_TRUE(lab.ok()) << lab.status();
    lab_ = std::move(*lab).release();
    ::setenv("CUSTODY_IDENTITY", "proxy", 1);
    auto keyd = testing::KeydProcess::Start({"--config", lab_->Env("CUSTODY_KEYD_CONFIG")},
                                            lab_->Path("keyd.log"));
    ASSERT_TRUE(keyd.ok()) << keyd.status();
    keyd_ = std::move(*keyd).release();
    libctx_ = OSSL_LIB_CTX_new();
    ASSERT_EQ(OSSL_PROVIDER_add_builtin(libctx_, "custody", OSSL_provider_init), 1);
    default_ = OSSL_PROVIDER_load(libctx_, "default");
    custody_ = OSSL_PROVIDER_load(libctx_, "custody");
    ASSERT_NE(default_, nullptr);
    ASSERT_NE(custody_, nullptr);
  }
  static void TearDownTestSuite() {
    OSSL_PROVIDER_unload(custody_);
    OSSL_PROVIDER_unload(default_);
    OSSL_LIB_CTX_free(libctx_);
    delete keyd_;
    delete lab_;
  }

  // LoadKey loads "custody:key=NAME" through the store.
  static OsslPtr<EVP_PKEY> LoadKey(const std::string& name) {
    const std::string uri = "custody:key=" + name;
    OSSL_STORE_CTX* store = OSSL_STORE_open_ex(uri.c_str(), libctx_, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, nullptr);
    if (store == nullptr) {
      return nullptr;
    }
    OsslPtr<EVP_PKEY> pkey;
    while (pkey == nullptr && OSSL_STORE_eof(store) == 0) {
      OSSL_STORE_INFO* info = OSSL_STORE_load(store);
      if (info != nullptr && OSSL_STORE_INFO_get_type(info) == OSSL_STORE_INFO_PKEY) {
        pkey.reset(OSSL_STORE_INFO_get1_PKEY(info));
      }
      OSSL_STORE_INFO_free(info);
    }
    OSSL_STORE_close(store);
    return pkey;
  }

  static std::string SignWith(EVP_PKEY* pkey, const char* md, const std::string& message) {
    OsslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
    if (EVP_DigestSignInit_ex(ctx.get(), nullptr, md, libctx_, nullptr, pkey, nullptr) != 1) {
      return "";
    }
    std::size_t len = 0;
    const auto* in = reinterpret_cast<const unsigned char*>(message.data());
    if (EVP_DigestSign(ctx.get(), nullptr, &len, in, message.size()) != 1) {
      return "";
    }
    std::string sig(len, '\0');
    if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len, in,
                       message.size()) != 1) {
      return "";
    }
    sig.resize(len);
    return sig;
  }

  static testing::Lab* lab_;
  static testing::KeydProcess* keyd_;
  static OSSL_LIB_CTX* libctx_;
  static OSSL_PROVIDER* default_;
  static OSSL_PROVIDER* custody_;
};
testing::Lab* ProviderTest::lab_ = nullptr;
testing::KeydProcess* ProviderTest::keyd_ = nullptr;
OSSL_LIB_CTX* ProviderTest::libctx_ = nullptr;
OSSL_PROVIDER* ProviderTest::default_ = nullptr;
OSSL_PROVIDER* ProviderTest::custody_ = nullptr;

TEST_F(ProviderTest, StoreLoadedKeysSignThroughTheKeyService) {
  struct Case {
    const char* key;
    const char* md;
    hsm::SignatureScheme scheme;
  };
  for (const Case& c : {Case{"lab-ec256", "SHA256", hsm::SignatureScheme::kEcdsaSecp256r1Sha256},
                        Case{"lab-ec384", "SHA384", hsm::SignatureScheme::kEcdsaSecp384r1Sha384},
                        Case{"lab-rsa2048", "SHA256", hsm::SignatureScheme::kRsaPkcs1Sha256},
                        Case{"lab-ed25519", nullptr, hsm::SignatureScheme::kEd25519}}) {
    SCOPED_TRACE(c.key);
    OsslPtr<EVP_PKEY> pkey = LoadKey(c.key);
    ASSERT_NE(pkey, nullptr);
    const std::string sig = SignWith(pkey.get(), c.md, "provider test message");
    ClearOsslErrors();
    ASSERT_FALSE(sig.empty());
    EXPECT_TRUE(testing::VerifyMessageSignature(
        testing::CertificatePublicKey(lab_->Path(std::string("certs/") + c.key + ".crt")), c.scheme,
        "provider test message", sig));
  }
}

TEST_F(ProviderTest, KeysAnswerFromTheirPublicHalf) {
  OsslPtr<EVP_PKEY> ec = LoadKey("lab-ec256");
  ASSERT_NE(ec, nullptr);
  EXPECT_EQ(EVP_PKEY_get_bits(ec.get()), 256);
  EXPECT_EQ(EVP_PKEY_get_security_bits(ec.get()), 128);
  EXPECT_GE(EVP_PKEY_get_size(ec.get()), 70);
  char group[32] = {};
  EXPECT_EQ(EVP_PKEY_get_utf8_string_param(ec.get(), OSSL_PKEY_PARAM_GROUP_NAME, group,
                                           sizeof(group), nullptr),
            1);
  EXPECT_STREQ(group, "prime256v1");
  OsslPtr<EVP_PKEY> rsa = LoadKey("lab-rsa2048");
  ASSERT_NE(rsa, nullptr);
  EXPECT_EQ(EVP_PKEY_get_bits(rsa.get()), 2048);
  EXPECT_EQ(EVP_PKEY_get_size(rsa.get()), 256);
}

TEST_F(ProviderTest, ThePrivateHalfIsNeverExported) {
  for (const char* name : {"lab-ec256", "lab-rsa2048", "lab-ed25519"}) {
    SCOPED_TRACE(name);
    OsslPtr<EVP_PKEY> pkey = LoadKey(name);
    ASSERT_NE(pkey, nullptr);
    OSSL_PARAM* params = nullptr;
    EXPECT_NE(EVP_PKEY_todata(pkey.get(), EVP_PKEY_KEYPAIR, &params), 1);
    OSSL_PARAM_free(params);
    BIGNUM* priv = nullptr;
    EXPECT_NE(EVP_PKEY_get_bn_param(pkey.get(), OSSL_PKEY_PARAM_PRIV_KEY, &priv), 1);
    BN_free(priv);
    EXPECT_LE(i2d_PrivateKey(pkey.get(), nullptr), 0);
    OsslPtr<BIO> bio(BIO_new(BIO_s_mem()));
    EXPECT_NE(
        PEM_write_bio_PrivateKey(bio.get(), pkey.get(), nullptr, nullptr, 0, nullptr, nullptr), 1);
    // The public half is fine to hand out.
    params = nullptr;
    EXPECT_EQ(EVP_PKEY_todata(pkey.get(), EVP_PKEY_PUBLIC_KEY, &params), 1);
    OSSL_PARAM_free(params);
    ClearOsslErrors();
  }
}

TEST_F(ProviderTest, LibsslAcceptsTheKeyForItsCertificate) {
  OsslPtr<EVP_PKEY> pkey = LoadKey("lab-ec256");
  ASSERT_NE(pkey, nullptr);
  SSL_CTX* ctx = SSL_CTX_new_ex(libctx_, nullptr, TLS_server_method());
  ASSERT_NE(ctx, nullptr);
  EXPECT_EQ(SSL_CTX_use_certificate_chain_file(ctx, lab_->Path("certs/lab-ec256.crt").c_str()), 1);
  EXPECT_EQ(SSL_CTX_use_PrivateKey(ctx, pkey.get()), 1);
  EXPECT_EQ(SSL_CTX_check_private_key(ctx), 1);
  SSL_CTX_free(ctx);
  // The wrong certificate is told apart.
  SSL_CTX* wrong = SSL_CTX_new_ex(libctx_, nullptr, TLS_server_method());
  ASSERT_EQ(SSL_CTX_use_certificate_chain_file(wrong, lab_->Path("certs/lab-ec384.crt").c_str()),
            1);
  SSL_CTX_use_PrivateKey(wrong, pkey.get());
  EXPECT_NE(SSL_CTX_check_private_key(wrong), 1);
  SSL_CTX_free(wrong);
  ClearOsslErrors();
}

TEST_F(ProviderTest, UnknownKeyFailsToLoadWithTheServiceReason) {
  EXPECT_EQ(LoadKey("lab-nope"), nullptr);  // The proxy may not read it: refused, not hung.
  ClearOsslErrors();
}

}  // namespace
}  // namespace custody
