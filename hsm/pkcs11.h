// The PKCS#11 module: loading, slot look-up, and the one place where a CK_RV becomes a Status.
#pragma once

#include <p11-kit/pkcs11.h>

#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace custody::hsm {

// RvName is the PKCS#11 name of `rv` ("CKR_PIN_INCORRECT"), or its hex value.
std::string RvName(CK_RV rv);

// RvToStatus converts a PKCS#11 return value to a status whose message is "`what`: CKR_...".
// Token or session trouble maps to UNAVAILABLE, a logged-out token or a bad PIN to
// FAILED_PRECONDITION, bad mechanism input to INVALID_ARGUMENT.
absl::Status RvToStatus(CK_RV rv, const std::string& what);

// IsSessionLost says whether `rv` means the session (or the login behind it) is gone, so the
// session must be discarded and the operation retried on a fresh, logged-in one.
bool IsSessionLost(CK_RV rv);

// IsObjectStale says whether `rv` means an object handle no longer names an object (the token
// was restarted or the object re-created): look the object up again.
bool IsObjectStale(CK_RV rv);

// Pkcs11Module is a loaded and initialized PKCS#11 module (dlopen + C_Initialize with OS
// locking, so it may be used from many threads). C_Finalize and dlclose on destruction.
// Thread-safe.
class Pkcs11Module {
 public:
  // Load opens the module at `path`. FAILED_PRECONDITION names the path when it is not a
  // PKCS#11 module.
  [[nodiscard]] static absl::StatusOr<std::shared_ptr<Pkcs11Module>> Load(const std::string& path);

  ~Pkcs11Module();
  Pkcs11Module(const Pkcs11Module&) = delete;
  Pkcs11Module& operator=(const Pkcs11Module&) = delete;

  // fn is the module's function list; valid for the module's lifetime.
  CK_FUNCTION_LIST* fn() const { return fn_; }

  // FindSlotByTokenLabel returns the slot whose token carries `label`. NOT_FOUND lists the
  // labels that exist.
  [[nodiscard]] absl::StatusOr<CK_SLOT_ID> FindSlotByTokenLabel(const std::string& label) const;

 private:
  Pkcs11Module(void* handle, CK_FUNCTION_LIST* fn) : handle_(handle), fn_(fn) {}
  void* handle_;
  CK_FUNCTION_LIST* fn_;
};

}  // namespace custody::hsm
