#include "proxy/provider/provider.h"

#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/params.h>
#include <openssl/provider.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace custody::provider {
namespace {

const OSSL_ALGORITHM kKeymgmt[] = {{"EC:id-ecPublicKey:1.2.840.10045.2.1", "provider=custody",
                                    kEcKeymgmt, "custody EC keys held by the key service"},
                                   {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=custody",
                                    kRsaKeymgmt, "custody RSA keys held by the key service"},
                                   {"ED25519:1.3.101.112", "provider=custody", kEd25519Keymgmt,
                                    "custody Ed25519 keys held by the key service"},
                                   {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kSignature[] = {
    {"ECDSA", "provider=custody", kEcdsaSignature, "ECDSA in the key service's HSM"},
    {"RSA:rsaEncryption:1.2.840.113549.1.1.1", "provider=custody", kRsaSignature,
     "RSA (PKCS#1 v1.5, PSS) in the key service's HSM"},
    {"ED25519:1.3.101.112", "provider=custody", kEd25519Signature,
     "Ed25519 in the key service's HSM"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM kStore[] = {
    {"custody", "provider=custody", kCustodyStore, "custody:key=NAME[;version=N]"},
    {nullptr, nullptr, nullptr, nullptr}};

const OSSL_ALGORITHM* QueryOperation(void* /*provctx*/, int operation_id, int* no_cache) {
  *no_cache = 0;
  switch (operation_id) {
    case OSSL_OP_KEYMGMT:
      return kKeymgmt;
    case OSSL_OP_SIGNATURE:
      return kSignature;
    case OSSL_OP_STORE:
      return kStore;
    default:
      return nullptr;
  }
}

const OSSL_PARAM kGettable[] = {
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_NAME, OSSL_PARAM_UTF8_PTR, nullptr, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_VERSION, OSSL_PARAM_UTF8_PTR, nullptr, 0),
    OSSL_PARAM_DEFN(OSSL_PROV_PARAM_STATUS, OSSL_PARAM_INTEGER, nullptr, 0), OSSL_PARAM_END};

const OSSL_PARAM* GettableParams(void* /*provctx*/) { return kGettable; }

int GetParams(void* /*provctx*/, OSSL_PARAM params[]) {
  OSSL_PARAM* p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_NAME);
  if (p != nullptr && OSSL_PARAM_set_utf8_ptr(p, "custody: keys held by a key service") != 1) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_VERSION);
  if (p != nullptr && OSSL_PARAM_set_utf8_ptr(p, "0.1.0") != 1) {
    return 0;
  }
  p = OSSL_PARAM_locate(params, OSSL_PROV_PARAM_STATUS);
  return p == nullptr || OSSL_PARAM_set_int(p, 1) == 1;
}

void Teardown(void* provctx) { delete static_cast<ProviderContext*>(provctx); }

const OSSL_DISPATCH kProviderDispatch[] = {
    {OSSL_FUNC_PROVIDER_TEARDOWN, reinterpret_cast<void (*)()>(Teardown)},
    {OSSL_FUNC_PROVIDER_GETTABLE_PARAMS, reinterpret_cast<void (*)()>(GettableParams)},
    {OSSL_FUNC_PROVIDER_GET_PARAMS, reinterpret_cast<void (*)()>(GetParams)},
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, reinterpret_cast<void (*)()>(QueryOperation)},
    {0, nullptr}};

}  // namespace

int RaiseStatus(const absl::Status& status) {
  ERR_raise_data(ERR_LIB_PROV, ERR_R_INTERNAL_ERROR, "custody: %s", status.ToString().c_str());
  return 0;
}

int Init(const OSSL_CORE_HANDLE* /*handle*/, const OSSL_DISPATCH* /*in*/, const OSSL_DISPATCH** out,
         void** provctx, std::shared_ptr<KeySigner> signer, absl::Duration sign_timeout) {
  auto ctx = std::make_unique<ProviderContext>();
  ctx->sign_timeout = sign_timeout;
  if (signer != nullptr) {
    ctx->signer = std::move(signer);
  } else {
    // The key service is reached lazily: a program that loads the provider but never uses a
    // custody key needs no key service.
    absl::StatusOr<std::shared_ptr<KeySigner>> from_env = MakeGrpcKeySignerFromEnv();
    if (from_env.ok()) {
      ctx->signer = *std::move(from_env);
    } else {
      ctx->signer_status = from_env.status();
    }
  }
  *out = kProviderDispatch;
  *provctx = ctx.release();
  return 1;
}

namespace {

// OSSL_PROVIDER_add_builtin takes a plain function: LoadBuiltin hands the signer to it through
// this slot, under a lock, for the duration of one synchronous OSSL_PROVIDER_load.
std::mutex g_builtin_mu;
std::shared_ptr<KeySigner> g_builtin_signer;
absl::Duration g_builtin_timeout = kSignTimeout;

int BuiltinInit(const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in, const OSSL_DISPATCH** out,
                void** provctx) {
  return Init(handle, in, out, provctx, g_builtin_signer, g_builtin_timeout);
}

}  // namespace

absl::StatusOr<LoadedProviders> LoadBuiltin(OSSL_LIB_CTX* libctx,
                                             std::shared_ptr<KeySigner> signer,
                                             absl::Duration sign_timeout) {
  if (signer == nullptr) {
    return absl::InvalidArgumentError("the custody provider needs a key signer");
  }
  LoadedProviders loaded;
  loaded.default_provider.reset(OSSL_PROVIDER_load(libctx, "default"));
  if (loaded.default_provider == nullptr) {
    return OsslError(absl::StatusCode::kInternal, "loading the default provider");
  }
  std::lock_guard<std::mutex> lock(g_builtin_mu);
  g_builtin_signer = std::move(signer);
  g_builtin_timeout = sign_timeout;
  if (OSSL_PROVIDER_add_builtin(libctx, "custody", BuiltinInit) == 1) {
    loaded.custody.reset(OSSL_PROVIDER_load(libctx, "custody"));
  }
  g_builtin_signer.reset();
  if (loaded.custody == nullptr) {
    return OsslError(absl::StatusCode::kInternal, "loading the custody provider");
  }
  return loaded;
}

}  // namespace custody::provider

// The loadable module's entry point; exported explicitly since symbols are hidden.
extern "C" __attribute__((visibility("default"))) int OSSL_provider_init(
    const OSSL_CORE_HANDLE* handle, const OSSL_DISPATCH* in, const OSSL_DISPATCH** out,
    void** provctx) {
  return custody::provider::Init(handle, in, out, provctx, nullptr,
                                 custody::provider::kSignTimeout);
}
