// The custody OpenSSL 3 provider: keys whose private half is a reference to a key in the key
// service. Key management (EC, RSA, Ed25519), signatures (ECDSA, RSA PKCS#1 v1.5 and PSS,
// Ed25519) and a store loader for "custody:key=NAME[;version=N]" URIs, so any OpenSSL 3 program
// can use such keys. Each operation has its own file and dispatch table.
//
// Facts this rests on (measured on OpenSSL 3.0, see DESIGN.md): export refuses anything that
// includes the private half; import refuses a key without a key-service reference; EC key
// management answers "ECDSA" for the signature operation name.
#pragma once

#include <openssl/core.h>
#include <openssl/core_dispatch.h>

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "common/ossl.h"
#include "hsm/signature_scheme.h"
#include "proxy/provider/key_signer.h"

namespace custody::provider {

// ProviderContext is the provider's state, shared by every operation. Thread-safe.
struct ProviderContext {
  std::shared_ptr<KeySigner> signer;  // Null when the key service is not configured.
  absl::Status signer_status;         // Why `signer` is null.
  absl::Duration sign_timeout = kSignTimeout;
};

// RemoteKeyKind is the algorithm family of a remote key.
enum class RemoteKeyKind { kEc, kRsa, kEd25519 };

// RemoteKey is a key held by the key service: its name and version, and a copy of its public
// half (a default-provider EVP_PKEY). Reference counted: Ref/Unref.
struct RemoteKey {
  RemoteKeyKind kind = RemoteKeyKind::kEc;
  std::string name;      // Empty for a key that only has its public half.
  uint32_t version = 0;  // 0: the active version.
  hsm::KeyType type = hsm::KeyType::kEcP256;
  OsslPtr<EVP_PKEY> pub;
  ProviderContext* provider = nullptr;
  std::atomic<int> refs{1};

  void Ref() { refs.fetch_add(1, std::memory_order_relaxed); }
  void Unref() {
    if (refs.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      delete this;
    }
  }
};

// RaiseStatus puts `status` on the OpenSSL error queue (the provider's edge) and returns 0,
// the failure value of most provider functions.
int RaiseStatus(const absl::Status& status);

// CUSTODY_OSSL_FN makes one OSSL_DISPATCH entry.
#define CUSTODY_OSSL_FN(id, fn) \
  { id, reinterpret_cast<void (*)()>(fn) }

// Dispatch tables, one file each.
extern const OSSL_DISPATCH kEcKeymgmt[];
extern const OSSL_DISPATCH kRsaKeymgmt[];
extern const OSSL_DISPATCH kEd25519Keymgmt[];
extern const OSSL_DISPATCH kEcdsaSignature[];
extern const OSSL_DISPATCH kRsaSignature[];
extern const OSSL_DISPATCH kEd25519Signature[];
extern const OSSL_DISPATCH kCustodyStore[];

// Init is the provider's OSSL_provider_init, with the key service given (for the proxy, which
// links the provider in) or taken from the environment (signer null).
int Init(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in, const OSSL_DISPATCH** out,
         void** provctx, std::shared_ptr<KeySigner> signer, absl::Duration sign_timeout);

// LoadedProviders are the providers LoadBuiltin loaded; unload them (destroy this) before the
// library context is freed.
struct LoadedProviders {
  OsslPtr<OSSL_PROVIDER> custody;      // Declared first: unloaded last.
  OsslPtr<OSSL_PROVIDER> default_provider;
};

// LoadBuiltin loads the default provider and the custody provider, signing through `signer`
// with `sign_timeout` per signature, into `libctx` (for a program that links the provider in).
// Call once per library context.
[[nodiscard]] absl::StatusOr<LoadedProviders> LoadBuiltin(OSSL_LIB_CTX* libctx,
                                                          std::shared_ptr<KeySigner> signer,
                                                          absl::Duration sign_timeout);

}  // namespace custody::provider
