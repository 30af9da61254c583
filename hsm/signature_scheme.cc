#include "hsm/signature_scheme.h"

#include <openssl/evp.h>

#include <array>

#include "common/ossl.h"

namespace custody::hsm {
namespace {

constexpr std::array<SchemeInfo, 10> kSchemes = {{
    {SignatureScheme::kEcdsaSecp256r1Sha256, "ecdsa_secp256r1_sha256", SignFamily::kEcdsa,
     HashAlg::kSha256},
    {SignatureScheme::kEcdsaSecp384r1Sha384, "ecdsa_secp384r1_sha384", SignFamily::kEcdsa,
     HashAlg::kSha384},
    {SignatureScheme::kEcdsaSecp521r1Sha512, "ecdsa_secp521r1_sha512", SignFamily::kEcdsa,
     HashAlg::kSha512},
    {SignatureScheme::kRsaPssRsaeSha256, "rsa_pss_rsae_sha256", SignFamily::kRsaPss,
     HashAlg::kSha256},
    {SignatureScheme::kRsaPssRsaeSha384, "rsa_pss_rsae_sha384", SignFamily::kRsaPss,
     HashAlg::kSha384},
    {SignatureScheme::kRsaPssRsaeSha512, "rsa_pss_rsae_sha512", SignFamily::kRsaPss,
     HashAlg::kSha512},
    {SignatureScheme::kRsaPkcs1Sha256, "rsa_pkcs1_sha256", SignFamily::kRsaPkcs1, HashAlg::kSha256},
    {SignatureScheme::kRsaPkcs1Sha384, "rsa_pkcs1_sha384", SignFamily::kRsaPkcs1, HashAlg::kSha384},
    {SignatureScheme::kRsaPkcs1Sha512, "rsa_pkcs1_sha512", SignFamily::kRsaPkcs1, HashAlg::kSha512},
    {SignatureScheme::kEd25519, "ed25519", SignFamily::kEd25519, HashAlg::kNone},
}};

// DigestInfo headers from RFC 8017, section 9.2, note 1.
constexpr uint8_t kSha256Prefix[] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                     0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20};
constexpr uint8_t kSha384Prefix[] = {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                     0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30};
constexpr uint8_t kSha512Prefix[] = {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01,
                                     0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40};

const EVP_MD* HashMd(HashAlg hash) {
  switch (hash) {
    case HashAlg::kSha256:
      return EVP_sha256();
    case HashAlg::kSha384:
      return EVP_sha384();
    case HashAlg::kSha512:
      return EVP_sha512();
    case HashAlg::kNone:
      break;
  }
  return nullptr;
}

}  // namespace

absl::Span<const SchemeInfo> AllSchemes() { return kSchemes; }

std::optional<SchemeInfo> FindScheme(uint16_t code) {
  for (const SchemeInfo& s : kSchemes) {
    if (static_cast<uint16_t>(s.scheme) == code) {
      return s;
    }
  }
  return std::nullopt;
}

std::optional<SchemeInfo> FindSchemeByName(std::string_view name) {
  for (const SchemeInfo& s : kSchemes) {
    if (name == s.name) {
      return s;
    }
  }
  return std::nullopt;
}

const char* KeyTypeName(KeyType type) {
  switch (type) {
    case KeyType::kEcP256:
      return "ec-p256";
    case KeyType::kEcP384:
      return "ec-p384";
    case KeyType::kEcP521:
      return "ec-p521";
    case KeyType::kRsa:
      return "rsa";
    case KeyType::kEd25519:
      return "ed25519";
  }
  return "unknown";
}

bool SchemeSuitsKey(const SchemeInfo& scheme, KeyType type) {
  switch (scheme.family) {
    case SignFamily::kEcdsa:
      return type == KeyType::kEcP256 || type == KeyType::kEcP384 || type == KeyType::kEcP521;
    case SignFamily::kRsaPkcs1:
    case SignFamily::kRsaPss:
      return type == KeyType::kRsa;
    case SignFamily::kEd25519:
      return type == KeyType::kEd25519;
  }
  return false;
}

std::vector<SignatureScheme> SchemesForKey(KeyType type) {
  std::vector<SignatureScheme> out;
  for (const SchemeInfo& s : kSchemes) {
    if (SchemeSuitsKey(s, type)) {
      out.push_back(s.scheme);
    }
  }
  return out;
}

std::size_t HashLength(HashAlg hash) {
  switch (hash) {
    case HashAlg::kSha256:
      return 32;
    case HashAlg::kSha384:
      return 48;
    case HashAlg::kSha512:
      return 64;
    case HashAlg::kNone:
      break;
  }
  return 0;
}

absl::StatusOr<std::vector<uint8_t>> Hash(HashAlg hash, absl::Span<const uint8_t> message) {
  const EVP_MD* md = HashMd(hash);
  if (md == nullptr) {
    return absl::InvalidArgumentError("this scheme has no hash");
  }
  std::vector<uint8_t> out(HashLength(hash));
  unsigned int len = 0;
  if (EVP_Digest(message.data(), message.size(), out.data(), &len, md, nullptr) != 1) {
    return OsslError(absl::StatusCode::kInternal, "EVP_Digest");
  }
  out.resize(len);
  return out;
}

absl::Span<const uint8_t> DigestInfoPrefix(HashAlg hash) {
  switch (hash) {
    case HashAlg::kSha256:
      return kSha256Prefix;
    case HashAlg::kSha384:
      return kSha384Prefix;
    case HashAlg::kSha512:
      return kSha512Prefix;
    case HashAlg::kNone:
      break;
  }
  return {};
}

absl::StatusOr<std::vector<uint8_t>> EcdsaRawToDer(absl::Span<const uint8_t> raw) {
  if (raw.empty() || raw.size() % 2 != 0 || raw.size() > 2 * 66) {
    return absl::InternalError("ECDSA signature from the token has an impossible length");
  }
  const int half = static_cast<int>(raw.size() / 2);
  OsslPtr<ECDSA_SIG> sig(ECDSA_SIG_new());
  OsslPtr<BIGNUM> r(BN_bin2bn(raw.data(), half, nullptr));
  OsslPtr<BIGNUM> s(BN_bin2bn(raw.data() + half, half, nullptr));
  if (sig == nullptr || r == nullptr || s == nullptr ||
      ECDSA_SIG_set0(sig.get(), r.get(), s.get()) != 1) {
    return OsslError(absl::StatusCode::kInternal, "building ECDSA_SIG");
  }
  // ECDSA_SIG_set0 took ownership of r and s.
  (void)r.release();
  (void)s.release();
  const int len = i2d_ECDSA_SIG(sig.get(), nullptr);
  if (len <= 0) {
    return OsslError(absl::StatusCode::kInternal, "i2d_ECDSA_SIG");
  }
  std::vector<uint8_t> der(static_cast<std::size_t>(len));
  uint8_t* p = der.data();
  i2d_ECDSA_SIG(sig.get(), &p);
  return der;
}

}  // namespace custody::hsm
