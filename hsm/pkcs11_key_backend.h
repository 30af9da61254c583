// Pkcs11KeyBackend: keys that live in a PKCS#11 token. The token is the source of truth: keys
// are found by custody's naming convention (CKA_LABEL = key name, CKA_ID = "NAME/vN"), with
// their certificates stored next to them. Private keys are only ever used by handle.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "hsm/key_backend.h"
#include "hsm/pkcs11.h"
#include "hsm/session_pool.h"

namespace custody::hsm {

struct Pkcs11Options {
  std::string module_path;
  std::string token_label;
  std::string pin;  // The user PIN; kept only to log in again after a token reset.
  std::size_t sessions = 8;
};

// KeyObjectAttributes are the protection attributes of a private key object.
struct KeyObjectAttributes {
  bool sensitive = false;
  bool extractable = true;
  bool always_sensitive = false;
  bool never_extractable = false;
  // The CK_RV of reading the private value (CKA_VALUE, or CKA_PRIVATE_EXPONENT for RSA):
  // CKR_ATTRIBUTE_SENSITIVE for a protected key.
  CK_RV value_read_rv = CKR_OK;
};

class Pkcs11KeyBackend final : public KeyBackend {
 public:
  // Open loads the module, finds the token, logs in and reads the key inventory. Keys that are
  // not sensitive, or are extractable, are refused (logged, not served).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Pkcs11KeyBackend>> Open(
      const Pkcs11Options& options);

  std::vector<KeyVersionInfo> ListKeys() const override;
  absl::StatusOr<SignResult> Sign(const std::string& name, uint32_t version,
                                  const SignInput& input, absl::Time deadline) override;
  absl::Status Refresh() override;
  absl::Status SimulateTokenReset() override;

  // ReadKeyAttributes reads the protection attributes of a key's private object (for audits
  // and tests).
  [[nodiscard]] absl::StatusOr<KeyObjectAttributes> ReadKeyAttributes(const std::string& name,
                                                                       uint32_t version);

  SessionPool& sessions() { return *pool_; }

 private:
  struct Entry {
    KeyVersionInfo info;
    CK_OBJECT_HANDLE private_key = CK_INVALID_HANDLE;
  };
  using Inventory = std::map<std::string, std::vector<Entry>, std::less<>>;  // Versions sorted.

  explicit Pkcs11KeyBackend(std::unique_ptr<SessionPool> pool) : pool_(std::move(pool)) {}

  absl::StatusOr<Inventory> LoadInventory();
  absl::StatusOr<Entry> FindEntry(const std::string& name, uint32_t version) const;
  // SignOnce makes one attempt; the CK_RV tells the caller whether to recover and retry.
  CK_RV SignOnce(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, const SignInput& input,
                 std::vector<uint8_t>* out);

  std::unique_ptr<SessionPool> pool_;
  mutable absl::Mutex mu_;
  std::shared_ptr<const Inventory> inventory_ ABSL_GUARDED_BY(mu_);
};

}  // namespace custody::hsm
