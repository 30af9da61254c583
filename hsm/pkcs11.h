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

// SessionFault is what a failed call's CK_RV says about the session it ran on, and so what
// recovery it needs before one retry.
enum class SessionFault {
  kNone,          // The session is fine: the error is about the input or the key. No retry.
  kSessionOnly,   // This session alone is unusable (an operation left active): close it.
  kSessionsGone,  // The token dropped every session (reset): forget them all, do not close
                  // their handles (the numbers may already name new sessions), log in anew.
  kLoginLost,     // The token logged out or failed: close every session, log in anew.
  kStaleObject,   // The object handle no longer names the object: look it up again.
};

// ClassifySessionFault maps a failed call's CK_RV to the recovery it needs. Every fault but
// kNone also invalidates the object handles the caller holds, after the token's sessions are
// all gone (PKCS#11 v2.40, 5.6: closing the last session logs out, and tokens such as SoftHSM2
// then drop their object handles).
SessionFault ClassifySessionFault(CK_RV rv);

// Pkcs11Module is a loaded and initialized PKCS#11 module (dlopen + C_Initialize with OS
// locking, so it may be used from many threads). C_Finalize (if this object initialized it) and
// dlclose on destruction.
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
  Pkcs11Module(void* handle, CK_FUNCTION_LIST* fn, bool finalize)
      : handle_(handle), fn_(fn), finalize_(finalize) {}
  void* handle_;
  CK_FUNCTION_LIST* fn_;
  // False when the module was already initialized by someone else in this process, who then
  // owns C_Finalize.
  bool finalize_;
};

}  // namespace custody::hsm
