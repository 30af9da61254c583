// TLS signature schemes and what each one asks of the HSM: the hash, the key types it suits, and
// the one place where signature encodings are converted (DigestInfo for RSA PKCS#1 v1.5, raw
// r||s to DER for ECDSA).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace custody::hsm {

// KeyType is the algorithm of a key pair in the token.
enum class KeyType { kEcP256, kEcP384, kEcP521, kRsa, kEd25519 };

// SignatureScheme values are the TLS SignatureScheme code points (RFC 8446, 4.2.3).
enum class SignatureScheme : uint16_t {
  kRsaPkcs1Sha256 = 0x0401,
  kRsaPkcs1Sha384 = 0x0501,
  kRsaPkcs1Sha512 = 0x0601,
  kEcdsaSecp256r1Sha256 = 0x0403,
  kEcdsaSecp384r1Sha384 = 0x0503,
  kEcdsaSecp521r1Sha512 = 0x0603,
  kRsaPssRsaeSha256 = 0x0804,
  kRsaPssRsaeSha384 = 0x0805,
  kRsaPssRsaeSha512 = 0x0806,
  kEd25519 = 0x0807,
};

enum class HashAlg { kNone, kSha256, kSha384, kSha512 };
enum class SignFamily { kEcdsa, kRsaPkcs1, kRsaPss, kEd25519 };

// SchemeInfo describes one scheme.
struct SchemeInfo {
  SignatureScheme scheme;
  const char* name;  // TLS name, e.g. "ecdsa_secp256r1_sha256".
  SignFamily family;
  HashAlg hash;
};

// AllSchemes lists every scheme custody signs with.
absl::Span<const SchemeInfo> AllSchemes();

// FindScheme returns the scheme with TLS code point `code`, or nullopt.
std::optional<SchemeInfo> FindScheme(uint16_t code);

// FindSchemeByName returns the scheme with TLS name `name` (e.g. "rsa_pss_rsae_sha256").
std::optional<SchemeInfo> FindSchemeByName(std::string_view name);

// KeyTypeName is a short name for logs and CLIs ("ec-p256", "rsa", "ed25519").
const char* KeyTypeName(KeyType type);

// SchemeSuitsKey says whether `scheme` can be made with a key of `type`. ECDSA schemes suit every
// EC curve, as in TLS 1.2 where they name the hash only.
bool SchemeSuitsKey(const SchemeInfo& scheme, KeyType type);

// SchemesForKey lists the schemes a key of `type` can make.
std::vector<SignatureScheme> SchemesForKey(KeyType type);

// HashLength is the digest size of `hash` in bytes (0 for kNone).
std::size_t HashLength(HashAlg hash);

// Hash computes the digest of `message` with `hash`.
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> Hash(HashAlg hash,
                                                        absl::Span<const uint8_t> message);

// DigestInfoPrefix is the DER DigestInfo header (RFC 8017, 9.2 note 1) that precedes a digest
// signed with CKM_RSA_PKCS.
absl::Span<const uint8_t> DigestInfoPrefix(HashAlg hash);

// EcdsaRawToDer converts a PKCS#11 CKM_ECDSA signature (r||s, each half the same length) to the
// DER ECDSA-Sig-Value that TLS carries.
[[nodiscard]] absl::StatusOr<std::vector<uint8_t>> EcdsaRawToDer(absl::Span<const uint8_t> raw);

}  // namespace custody::hsm
