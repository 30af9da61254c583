// Key management for remote keys: the public half answers every question OpenSSL asks (bits,
// security bits, maximum signature size, curve), export gives public parts only, and load takes
// the reference the custody store hands over.
#include <openssl/core_names.h>
#include <openssl/core_object.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#include <cstring>

#include "absl/status/status.h"
#include "proxy/provider/provider.h"

namespace custody::provider {
namespace {

RemoteKey* AsKey(void* keydata) { return static_cast<RemoteKey*>(keydata); }

void* NewKey(void* provctx) {
  auto* key = new RemoteKey;
  key->provider = static_cast<ProviderContext*>(provctx);
  return key;
}

void FreeKey(void* keydata) {
  if (keydata != nullptr) {
    AsKey(keydata)->Unref();
  }
}

int Has(const void* keydata, int selection) {
  const auto* key = static_cast<const RemoteKey*>(keydata);
  if (key == nullptr) {
    return 0;
  }
  int ok = 1;
  if ((selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY) != 0) {
    ok = ok && key->pub != nullptr;
  }
  if ((selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) {
    ok = ok && !key->name.empty();  // The private half is the reference to the key service.
  }
  return ok;
}

int GetParams(void* keydata, OSSL_PARAM params[]) {
  RemoteKey* key = AsKey(keydata);
  if (key == nullptr || key->pub == nullptr) {
    return 0;
  }
  // The public key knows bits, security bits, maximum size, group and encoded point.
  if (EVP_PKEY_get_params(key->pub.get(), params) != 1) {
    ClearOsslErrors();
  }
  return 1;
}

const OSSL_PARAM kEcGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, nullptr, 0),
    OSSL_PARAM_END};
const OSSL_PARAM kRsaGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_DEFAULT_DIGEST, nullptr, 0), OSSL_PARAM_END};
const OSSL_PARAM kEdGettable[] = {
    OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, nullptr),
    OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, nullptr),
    OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, nullptr, 0), OSSL_PARAM_END};

const OSSL_PARAM* EcGettable(void* /*provctx*/) { return kEcGettable; }
const OSSL_PARAM* RsaGettable(void* /*provctx*/) { return kRsaGettable; }
const OSSL_PARAM* EdGettable(void* /*provctx*/) { return kEdGettable; }

// Export gives the public half only: the default provider may copy a key to compare it with a
// certificate (SSL_CTX_check_private_key), but it must never get, or believe it got, a private
// key it could then use in place of ours.
int Export(void* keydata, int selection, OSSL_CALLBACK* cb, void* cbarg) {
  RemoteKey* key = AsKey(keydata);
  if (key == nullptr || key->pub == nullptr || (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0) {
    return 0;
  }
  OSSL_PARAM* params = nullptr;
  if (EVP_PKEY_todata(key->pub.get(), EVP_PKEY_PUBLIC_KEY, &params) != 1) {
    ClearOsslErrors();
    return 0;
  }
  const int ok = cb(params, cbarg);
  OsslPtr<OSSL_PARAM> owned(params);
  return ok;
}

const OSSL_PARAM kEcPublicTypes[] = {OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, nullptr, 0),
                                     OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
                                     OSSL_PARAM_END};
const OSSL_PARAM kRsaPublicTypes[] = {OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_N, nullptr, 0),
                                      OSSL_PARAM_BN(OSSL_PKEY_PARAM_RSA_E, nullptr, 0),
                                      OSSL_PARAM_END};
const OSSL_PARAM kEdPublicTypes[] = {OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, nullptr, 0),
                                     OSSL_PARAM_END};
const OSSL_PARAM kNone[] = {OSSL_PARAM_END};

const OSSL_PARAM* EcExportTypes(int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 ? kNone : kEcPublicTypes;
}
const OSSL_PARAM* RsaExportTypes(int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 ? kNone : kRsaPublicTypes;
}
const OSSL_PARAM* EdExportTypes(int selection) {
  return (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0 ? kNone : kEdPublicTypes;
}

// Import refuses: a key without a reference to the key service has no private half here, and
// taking a software private key in would defeat the point of this provider.
int Import(void* /*keydata*/, int /*selection*/, const OSSL_PARAM* /*params*/) { return 0; }
const OSSL_PARAM* ImportTypes(int /*selection*/) { return kNone; }

// Load takes the key the custody store passed by reference (a RemoteKey*), adding a reference.
void* Load(const void* reference, size_t reference_size) {
  if (reference == nullptr || reference_size != sizeof(RemoteKey*)) {
    return nullptr;
  }
  RemoteKey* key = nullptr;
  std::memcpy(&key, reference, sizeof(key));
  if (key != nullptr) {
    key->Ref();
  }
  return key;
}

const char* EcOperationName(int operation_id) {
  return operation_id == OSSL_OP_SIGNATURE ? "ECDSA" : nullptr;
}

}  // namespace

const OSSL_DISPATCH kEcKeymgmt[] = {
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_NEW, NewKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_FREE, FreeKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_HAS, Has),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GET_PARAMS, GetParams),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, EcGettable),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT, Export),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT_TYPES, EcExportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT, Import),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT_TYPES, ImportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_LOAD, Load),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, EcOperationName),
    {0, nullptr}};

const OSSL_DISPATCH kRsaKeymgmt[] = {
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_NEW, NewKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_FREE, FreeKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_HAS, Has),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GET_PARAMS, GetParams),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, RsaGettable),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT, Export),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT_TYPES, RsaExportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT, Import),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT_TYPES, ImportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_LOAD, Load),
    {0, nullptr}};

const OSSL_DISPATCH kEd25519Keymgmt[] = {
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_NEW, NewKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_FREE, FreeKey),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_HAS, Has),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GET_PARAMS, GetParams),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, EdGettable),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT, Export),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_EXPORT_TYPES, EdExportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT, Import),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_IMPORT_TYPES, ImportTypes),
    CUSTODY_OSSL_FN(OSSL_FUNC_KEYMGMT_LOAD, Load),
    {0, nullptr}};

}  // namespace custody::provider
