#include "hsm/pkcs11.h"

#include <dlfcn.h>

#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace custody::hsm {

std::string RvName(CK_RV rv) {
  switch (rv) {
#define CUSTODY_RV_(name) \
  case name:              \
    return #name
    CUSTODY_RV_(CKR_OK);
    CUSTODY_RV_(CKR_ARGUMENTS_BAD);
    CUSTODY_RV_(CKR_BUFFER_TOO_SMALL);
    CUSTODY_RV_(CKR_CRYPTOKI_ALREADY_INITIALIZED);
    CUSTODY_RV_(CKR_CRYPTOKI_NOT_INITIALIZED);
    CUSTODY_RV_(CKR_DATA_INVALID);
    CUSTODY_RV_(CKR_DATA_LEN_RANGE);
    CUSTODY_RV_(CKR_DEVICE_ERROR);
    CUSTODY_RV_(CKR_DEVICE_MEMORY);
    CUSTODY_RV_(CKR_DEVICE_REMOVED);
    CUSTODY_RV_(CKR_FUNCTION_FAILED);
    CUSTODY_RV_(CKR_GENERAL_ERROR);
    CUSTODY_RV_(CKR_HOST_MEMORY);
    CUSTODY_RV_(CKR_KEY_FUNCTION_NOT_PERMITTED);
    CUSTODY_RV_(CKR_KEY_HANDLE_INVALID);
    CUSTODY_RV_(CKR_KEY_SIZE_RANGE);
    CUSTODY_RV_(CKR_KEY_TYPE_INCONSISTENT);
    CUSTODY_RV_(CKR_MECHANISM_INVALID);
    CUSTODY_RV_(CKR_MECHANISM_PARAM_INVALID);
    CUSTODY_RV_(CKR_OBJECT_HANDLE_INVALID);
    CUSTODY_RV_(CKR_OPERATION_ACTIVE);
    CUSTODY_RV_(CKR_OPERATION_NOT_INITIALIZED);
    CUSTODY_RV_(CKR_PIN_INCORRECT);
    CUSTODY_RV_(CKR_PIN_LOCKED);
    CUSTODY_RV_(CKR_SESSION_CLOSED);
    CUSTODY_RV_(CKR_SESSION_COUNT);
    CUSTODY_RV_(CKR_SESSION_HANDLE_INVALID);
    CUSTODY_RV_(CKR_SLOT_ID_INVALID);
    CUSTODY_RV_(CKR_TOKEN_NOT_PRESENT);
    CUSTODY_RV_(CKR_TOKEN_NOT_RECOGNIZED);
    CUSTODY_RV_(CKR_USER_ALREADY_LOGGED_IN);
    CUSTODY_RV_(CKR_USER_NOT_LOGGED_IN);
    CUSTODY_RV_(CKR_USER_PIN_NOT_INITIALIZED);
    CUSTODY_RV_(CKR_ATTRIBUTE_SENSITIVE);
    CUSTODY_RV_(CKR_ATTRIBUTE_TYPE_INVALID);
#undef CUSTODY_RV_
    default:
      return absl::StrFormat("CKR_0x%08x", rv);
  }
}

SessionFault ClassifySessionFault(CK_RV rv) {
  switch (rv) {
    case CKR_OPERATION_ACTIVE:
    case CKR_BUFFER_TOO_SMALL:  // The one C_Sign error that leaves the operation active.
      return SessionFault::kSessionOnly;
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
      return SessionFault::kSessionsGone;
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_ERROR:
    case CKR_TOKEN_NOT_PRESENT:
      return SessionFault::kLoginLost;
    case CKR_KEY_HANDLE_INVALID:
    case CKR_OBJECT_HANDLE_INVALID:
      return SessionFault::kStaleObject;
    default:
      return SessionFault::kNone;
  }
}

absl::Status RvToStatus(CK_RV rv, const std::string& what) {
  if (rv == CKR_OK) {
    return absl::OkStatus();
  }
  const std::string msg = absl::StrCat(what, ": ", RvName(rv));
  switch (rv) {
    case CKR_PIN_INCORRECT:
    case CKR_PIN_LOCKED:
    case CKR_USER_PIN_NOT_INITIALIZED:
    case CKR_KEY_FUNCTION_NOT_PERMITTED:
      return absl::FailedPreconditionError(msg);
    case CKR_DATA_INVALID:
    case CKR_DATA_LEN_RANGE:
    case CKR_MECHANISM_INVALID:
    case CKR_MECHANISM_PARAM_INVALID:
    case CKR_KEY_TYPE_INCONSISTENT:
    case CKR_KEY_SIZE_RANGE:
      return absl::InvalidArgumentError(msg);
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
    case CKR_SESSION_COUNT:
      return absl::ResourceExhaustedError(msg);
    default:
      if (ClassifySessionFault(rv) != SessionFault::kNone) {
        return absl::UnavailableError(msg);
      }
      return absl::InternalError(msg);
  }
}

absl::StatusOr<std::shared_ptr<Pkcs11Module>> Pkcs11Module::Load(const std::string& path) {
  // RTLD_NODELETE: modules are never unmapped; some misbehave on unload (libp11 #123), and
  // leak reports must still be able to name the module.
  void* handle = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  if (handle == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot load PKCS#11 module ", path, ": ", ::dlerror()));
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle, "C_GetFunctionList"));
  CK_FUNCTION_LIST* fn = nullptr;
  if (get_list == nullptr || get_list(&fn) != CKR_OK || fn == nullptr) {
    ::dlclose(handle);
    return absl::FailedPreconditionError(
        absl::StrCat(path, " is not a PKCS#11 module (no usable C_GetFunctionList)"));
  }
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  const CK_RV rv = fn->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    ::dlclose(handle);
    return RvToStatus(rv, absl::StrCat("C_Initialize of ", path));
  }
  return std::shared_ptr<Pkcs11Module>(new Pkcs11Module(handle, fn, rv == CKR_OK));
}

Pkcs11Module::~Pkcs11Module() {
  if (finalize_) {
    fn_->C_Finalize(nullptr);
  }
  ::dlclose(handle_);
}

absl::StatusOr<CK_SLOT_ID> Pkcs11Module::FindSlotByTokenLabel(const std::string& label) const {
  CK_ULONG count = 0;
  CK_RV rv = fn_->C_GetSlotList(CK_TRUE, nullptr, &count);
  if (rv != CKR_OK) {
    return RvToStatus(rv, "C_GetSlotList");
  }
  std::vector<CK_SLOT_ID> slots(count);
  rv = fn_->C_GetSlotList(CK_TRUE, slots.data(), &count);
  if (rv != CKR_OK) {
    return RvToStatus(rv, "C_GetSlotList");
  }
  slots.resize(count);
  std::vector<std::string> seen;
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (fn_->C_GetTokenInfo(slot, &info) != CKR_OK) {
      continue;
    }
    // Token labels are blank-padded to 32 bytes.
    std::string token_label(reinterpret_cast<const char*>(info.label), sizeof(info.label));
    token_label = std::string(absl::StripTrailingAsciiWhitespace(token_label));
    if (token_label == label) {
      return slot;
    }
    seen.push_back(absl::StrCat("'", token_label, "'"));
  }
  return absl::NotFoundError(absl::StrCat(
      "no token labelled '", label,
      "'; tokens present: ", seen.empty() ? std::string("none") : absl::StrJoin(seen, ", ")));
}

}  // namespace custody::hsm
