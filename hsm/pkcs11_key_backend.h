// Pkcs11KeyBackend: keys that live in a PKCS#11 token. The token is the source of truth: keys
// are found by custody's naming convention (CKA_LABEL = key name, CKA_ID = "NAME/vN"), with
// their certificates stored next to them. Private keys are only ever used by handle, and only
// keys that were generated in the token and never left it are served: CKA_SENSITIVE,
// CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE true, CKA_EXTRACTABLE false.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

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
  // Open loads the module, finds the token, logs in and reads the key inventory. Keys without
  // the protection attributes above are refused (logged, not served).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<Pkcs11KeyBackend>> Open(
      const Pkcs11Options& options);

  std::vector<KeyVersionInfo> ListKeys() const override;
  bool HasKey(const std::string& name) const override;
  absl::StatusOr<SignResult> Sign(const std::string& name, uint32_t version, const SignInput& input,
                                  absl::Time deadline) override;
  absl::Status Refresh() override;
  // SimulateTokenReset calls C_CloseAllSessions on the slot behind the pool's back, as a token
  // reset would: pooled handles become invalid, the login is lost, object handles go stale.
  // It waits for the signatures in flight to finish first (SoftHSM2 is not safe otherwise).
  absl::Status SimulateTokenReset() override;

  // ReadKeyAttributes reads the protection attributes of a key's private object (for audits
  // and tests).
  [[nodiscard]] absl::StatusOr<KeyObjectAttributes> ReadKeyAttributes(const std::string& name,
                                                                      uint32_t version);

  SessionPool& sessions() { return *pool_; }

 private:
  struct Entry {
    KeyVersionInfo info;
    // The private key's handle, shared by every copy of the entry so that a handle found again
    // after a token reset serves later calls too.
    std::shared_ptr<std::atomic<CK_OBJECT_HANDLE>> private_key;
  };
  using Inventory = std::map<std::string, std::vector<Entry>, std::less<>>;  // Versions sorted.

  explicit Pkcs11KeyBackend(std::unique_ptr<SessionPool> pool) : pool_(std::move(pool)) {}

  absl::StatusOr<Inventory> LoadInventory();
  std::shared_ptr<const Inventory> Snapshot() const;
  // EntryRef is an inventory entry found for one call, without copying it (its certificate
  // chain and public key are kilobytes): the snapshot keeps it alive.
  struct EntryRef {
    std::shared_ptr<const Inventory> snapshot;
    const Entry* entry = nullptr;
  };
  absl::StatusOr<EntryRef> FindEntry(const std::string& name, uint32_t version) const;
  // SignOnce makes one attempt; the CK_RV tells the caller whether to recover and retry.
  CK_RV SignOnce(CK_SESSION_HANDLE s, const Entry& entry, const SignInput& input,
                 std::vector<uint8_t>* out);

  std::unique_ptr<SessionPool> pool_;
  // std::mutex, not absl::Mutex: the system Abseil is not instrumented for ThreadSanitizer.
  mutable std::mutex mu_;
  std::shared_ptr<const Inventory> inventory_;  // Guarded by mu_.
};

}  // namespace custody::hsm
