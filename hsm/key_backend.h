// KeyBackend: where private keys live and signatures are made. The key service talks to this
// interface only. Pkcs11KeyBackend is the real one; tests bring fakes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "hsm/signature_scheme.h"

namespace custody::hsm {

// KeyVersionInfo is the public side of one key version: never any private material.
struct KeyVersionInfo {
  std::string name;
  uint32_t version = 0;
  KeyType type = KeyType::kEcP256;
  uint32_t bits = 0;
  std::vector<uint8_t> public_key_der;                  // SubjectPublicKeyInfo.
  std::vector<std::vector<uint8_t>> certificate_chain;  // DER, leaf first, no self-signed root.
  int64_t not_after = 0;                                // Leaf notAfter, Unix seconds; 0 if none.
};

// SignInput is what is signed: a digest made with the scheme's hash, or, for Ed25519, the
// message itself. Build it with PrepareSignInput.
struct SignInput {
  SchemeInfo scheme;
  std::vector<uint8_t> data;
};

// PrepareSignInput checks a caller's input against `scheme` and returns what the backend signs:
// a digest of the right length as is, a message hashed with the scheme's hash, or the message
// for Ed25519 (which signs messages, not digests). INVALID_ARGUMENT for a digest of the wrong
// length, a digest for Ed25519, an empty input, or a message over `max_message_bytes`.
[[nodiscard]] absl::StatusOr<SignInput> PrepareSignInput(const SchemeInfo& scheme, bool is_message,
                                                         absl::Span<const uint8_t> input,
                                                         std::size_t max_message_bytes);

struct SignResult {
  std::vector<uint8_t> signature;  // As TLS carries it (DER for ECDSA).
  uint32_t version = 0;            // The key version that signed.
};

class KeyBackend {
 public:
  virtual ~KeyBackend() = default;

  // ListKeys returns every usable key version, by name then version. Thread-safe.
  virtual std::vector<KeyVersionInfo> ListKeys() const = 0;

  // HasKey says whether a key named `name` is served. Thread-safe.
  virtual bool HasKey(const std::string& name) const = 0;

  // Sign signs `input` with key `name`, version `version` (0: the highest). NOT_FOUND for an
  // unknown key or version, INVALID_ARGUMENT when the scheme does not suit the key,
  // UNAVAILABLE when the HSM failed even after one recovery, DEADLINE_EXCEEDED when no session
  // came free by `deadline`. Thread-safe; blocks the caller for the HSM's time.
  [[nodiscard]] virtual absl::StatusOr<SignResult> Sign(const std::string& name, uint32_t version,
                                                        const SignInput& input,
                                                        absl::Time deadline) = 0;

  // Refresh re-reads the key inventory from its source; on failure the old one stays.
  [[nodiscard]] virtual absl::Status Refresh() = 0;

  // SimulateTokenReset drops every HSM session under the backend (test hook).
  [[nodiscard]] virtual absl::Status SimulateTokenReset() = 0;
};

}  // namespace custody::hsm
