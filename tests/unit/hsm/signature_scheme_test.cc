#include "hsm/signature_scheme.h"

#include <gtest/gtest.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "common/ossl.h"
#include "hsm/key_backend.h"
#include "tests/support/verify.h"

namespace custody::hsm {
namespace {

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(SignatureSchemeTest, CodePointsAndNamesRoundTrip) {
  EXPECT_EQ(AllSchemes().size(), 10u);
  for (const SchemeInfo& s : AllSchemes()) {
    EXPECT_EQ(FindScheme(static_cast<uint16_t>(s.scheme))->name, std::string(s.name));
    EXPECT_EQ(FindSchemeByName(s.name)->scheme, s.scheme);
  }
  EXPECT_EQ(static_cast<uint16_t>(FindSchemeByName("rsa_pss_rsae_sha256")->scheme), 0x0804);
  EXPECT_FALSE(FindScheme(0x0999).has_value());
  EXPECT_FALSE(FindSchemeByName("ecdsa_sha1").has_value());
}

TEST(SignatureSchemeTest, SchemesSuitTheirKeyTypesOnly) {
  EXPECT_EQ(SchemesForKey(KeyType::kRsa).size(), 6u);
  EXPECT_EQ(SchemesForKey(KeyType::kEcP256).size(), 3u);  // TLS 1.2: ECDSA names the hash only.
  EXPECT_EQ(SchemesForKey(KeyType::kEd25519),
            std::vector<SignatureScheme>{SignatureScheme::kEd25519});
  EXPECT_FALSE(SchemeSuitsKey(*FindSchemeByName("ed25519"), KeyType::kEcP256));
  EXPECT_FALSE(SchemeSuitsKey(*FindSchemeByName("rsa_pkcs1_sha256"), KeyType::kEd25519));
}

TEST(SignatureSchemeTest, DigestInfoPrefixIsTheDerOfDigestInfo) {
  for (HashAlg h : {HashAlg::kSha256, HashAlg::kSha384, HashAlg::kSha512}) {
    std::vector<uint8_t> der(DigestInfoPrefix(h).begin(), DigestInfoPrefix(h).end());
    der.resize(der.size() + HashLength(h), 0xab);
    const uint8_t* p = der.data();
    X509_SIG* sig = d2i_X509_SIG(nullptr, &p, static_cast<long>(der.size()));
    ASSERT_NE(sig, nullptr);
    EXPECT_EQ(p, der.data() + der.size());
    const X509_ALGOR* alg = nullptr;
    const ASN1_OCTET_STRING* digest = nullptr;
    X509_SIG_get0(sig, &alg, &digest);
    EXPECT_EQ(static_cast<std::size_t>(ASN1_STRING_length(digest)), HashLength(h));
    const ASN1_OBJECT* obj = nullptr;
    X509_ALGOR_get0(&obj, nullptr, nullptr, alg);
    const int nid = OBJ_obj2nid(obj);
    EXPECT_EQ(nid, h == HashAlg::kSha256   ? NID_sha256
                   : h == HashAlg::kSha384 ? NID_sha384
                                           : NID_sha512);
    X509_SIG_free(sig);
  }
}

// EcdsaRawToDer must produce what OpenSSL verifies, including halves with leading zero bytes.
TEST(SignatureSchemeTest, EcdsaRawToDerVerifies) {
  OsslPtr<EVP_PKEY> key(EVP_EC_gen("P-256"));
  ASSERT_NE(key, nullptr);
  const int spki_len = i2d_PUBKEY(key.get(), nullptr);
  std::string spki(static_cast<std::size_t>(spki_len), '\0');
  auto* sp = reinterpret_cast<unsigned char*>(spki.data());
  i2d_PUBKEY(key.get(), &sp);
  int leading_zero_cases = 0;
  // Sign until several halves began with a zero byte (1 in 128 signatures on average), bounded:
  // those are the cases a careless conversion gets wrong.
  int signatures = 0;
  for (int i = 0; (leading_zero_cases < 3 || i < 100) && i < 20000; ++i, ++signatures) {
    const std::string message = "m" + std::to_string(i);
    OsslPtr<EVP_MD_CTX> ctx(EVP_MD_CTX_new());
    ASSERT_EQ(EVP_DigestSignInit(ctx.get(), nullptr, EVP_sha256(), nullptr, key.get()), 1);
    std::size_t len = 0;
    ASSERT_EQ(EVP_DigestSign(ctx.get(), nullptr, &len, Bytes(message).data(), message.size()), 1);
    std::vector<uint8_t> der(len);
    ASSERT_EQ(EVP_DigestSign(ctx.get(), der.data(), &len, Bytes(message).data(), message.size()),
              1);
    const uint8_t* p = der.data();
    OsslPtr<ECDSA_SIG> sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(len)));
    std::vector<uint8_t> raw(64);
    BN_bn2binpad(ECDSA_SIG_get0_r(sig.get()), raw.data(), 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(sig.get()), raw.data() + 32, 32);
    leading_zero_cases += (raw[0] == 0 || raw[32] == 0) ? 1 : 0;
    auto converted = EcdsaRawToDer(raw);
    ASSERT_TRUE(converted.ok());
    EXPECT_TRUE(testing::VerifyMessageSignature(spki, SignatureScheme::kEcdsaSecp256r1Sha256,
                                                message,
                                                std::string(converted->begin(), converted->end())));
  }
  EXPECT_GE(leading_zero_cases, 3) << "after " << signatures << " signatures";
  EXPECT_FALSE(EcdsaRawToDer(std::vector<uint8_t>(63, 1)).ok());
  EXPECT_FALSE(EcdsaRawToDer({}).ok());
}

TEST(PrepareSignInputTest, HashesMessagesAndChecksDigests) {
  const SchemeInfo p256 = *FindSchemeByName("ecdsa_secp256r1_sha256");
  auto in = PrepareSignInput(p256, true, Bytes("hello"), 100);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(in->data, *Hash(HashAlg::kSha256, Bytes("hello")));

  EXPECT_TRUE(PrepareSignInput(p256, false, Bytes(std::string(32, 'd')), 100).ok());
  auto bad = PrepareSignInput(p256, false, Bytes(std::string(20, 'd')), 100);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("32-byte"), absl::string_view::npos);

  EXPECT_EQ(PrepareSignInput(p256, true, Bytes(""), 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PrepareSignInput(p256, true, Bytes(std::string(101, 'x')), 100).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(PrepareSignInput(p256, true, Bytes(std::string(100, 'x')), 100).ok());
}

TEST(PrepareSignInputTest, Ed25519SignsTheMessageAndRefusesDigests) {
  const SchemeInfo ed = *FindSchemeByName("ed25519");
  auto in = PrepareSignInput(ed, true, Bytes("hello"), 100);
  ASSERT_TRUE(in.ok());
  EXPECT_EQ(std::string(in->data.begin(), in->data.end()), "hello");
  auto digest = PrepareSignInput(ed, false, Bytes(std::string(32, 'd')), 100);
  EXPECT_EQ(digest.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace custody::hsm
